"""Checkpoints: atomic layout, newest-complete selection, and an exact round trip of weights, optimizer, schedule
and RNG (single process, the tiny model, a real optimizer step)."""
import random

import numpy as np
import pytest
import torch

from vr1fast import ckpt, dist
from vr1fast.config import DistConfig
from vr1fast.errors import ConfigError
from vr1fast.model.load import load_model, tiny_model
from vr1fast.precision import precision_plan


def _wrapped(model):
    info = dist.init(DistConfig(strategy="none"))
    policy = dist.wrap_policy(
        model, info, DistConfig(strategy="none"), precision=precision_plan("none", False),
        make_optimizer=lambda named: torch.optim.AdamW([p for _, p in named], lr=1e-2, weight_decay=0.1),
        make_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s)))
    return policy, info


def _train_one_step(policy) -> None:
    ids = torch.randint(0, 900, (2, 12))
    logits = policy.model(input_ids=ids, attention_mask=torch.ones_like(ids),
                          mm_token_type_ids=torch.zeros_like(ids)).logits
    torch.log_softmax(logits, -1).gather(-1, ids[..., None]).mean().neg().backward()
    policy.optimizer.step()
    policy.scheduler.step()
    policy.optimizer.zero_grad()


def test_round_trip_restores_weights_optimizer_schedule_and_rng(tmp_path):
    model, tokenizer = tiny_model(3)
    policy, info = _wrapped(model)
    _train_one_step(policy)
    root = tmp_path / "checkpoints"
    path = ckpt.save(root, 1, policy, info=info, processor=tokenizer, source_dir=None,
                     state={"data": {"epoch": 0, "index": 5}}, config_text="preset: demo\n")
    expected_draws = (random.random(), np.random.rand(), torch.rand(3))
    names = {p: n for n, p in model.named_parameters()}
    saved_optim = {names[p]: {n: t.clone() for n, t in v.items()} for p, v in policy.optimizer.state.items()}
    saved_weights = {k: v.clone() for k, v in model.state_dict().items()}
    _train_one_step(policy)  # moves weights, optimizer, schedule and RNG past the checkpoint

    fresh, _ = load_model(path / "model")
    assert fresh.state_dict().keys() == saved_weights.keys()
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in saved_weights.items())
    assert not all(torch.equal(fresh.state_dict()[k], v) for k, v in model.state_dict().items())
    restored, info = _wrapped(fresh)
    state = ckpt.load(path, restored, info=info)
    assert state == {"data": {"epoch": 0, "index": 5}, "step": 1, "world_size": 1}
    assert (random.random(), np.random.rand()) == expected_draws[:2]
    assert torch.equal(torch.rand(3), expected_draws[2])
    assert restored.scheduler.last_epoch == 1 and restored.scheduler.get_last_lr() == [pytest.approx(5e-3)]
    names = {p: n for n, p in fresh.named_parameters()}
    got = {names[p]: v for p, v in restored.optimizer.state.items()}
    assert 0 < len(saved_optim) < len(names)   # the vision tower had no gradient in this text-only step
    assert got.keys() == saved_optim.keys()
    for name, want in saved_optim.items():
        assert all(torch.equal(got[name][k], want[k]) for k in ("step", "exp_avg", "exp_avg_sq"))
    assert (path / "config.yaml").read_text() == "preset: demo\n"


def test_newest_complete_checkpoint_wins(tmp_path):
    model, tokenizer = tiny_model(0)
    policy, info = _wrapped(model)
    root = tmp_path / "checkpoints"
    assert ckpt.latest(root) is None and ckpt.resolve("auto", tmp_path) is None and ckpt.resolve("none", tmp_path) is None
    for step in (2, 10):
        ckpt.save(root, step, policy, info=info, processor=tokenizer, source_dir=None, state={}, config_text="")
    (root / ".tmp_step_000012" / "model").mkdir(parents=True)      # a save killed half-way
    (root / "step_000011").mkdir()                                  # no COMPLETE marker
    assert ckpt.latest(root) == root / "step_000010"
    assert ckpt.resolve("auto", tmp_path) == root / "step_000010"
    assert ckpt.resolve(str(root / "step_000002"), tmp_path) == root / "step_000002"
    with pytest.raises(ConfigError, match="step_000011"):
        ckpt.resolve(str(root / "step_000011"), tmp_path)


def test_saving_a_step_again_replaces_it_whole(tmp_path):
    model, tokenizer = tiny_model(0)
    policy, info = _wrapped(model)
    root = tmp_path / "checkpoints"
    ckpt.save(root, 4, policy, info=info, processor=tokenizer, source_dir=None, state={"data": {"index": 1}},
              config_text="")
    (root / ".tmp_step_000004").mkdir()  # stale temp dir of a killed earlier save
    ckpt.save(root, 4, policy, info=info, processor=tokenizer, source_dir=None, state={"data": {"index": 2}},
              config_text="")
    assert sorted(p.name for p in root.iterdir()) == ["step_000004"]
    assert ckpt.read_state(root / "step_000004")["data"] == {"index": 2}
