"""The demo's warm start (a short cached run of vr1fast.sft) on real synthetic videos and images with the real tiny
model."""
import random
import time
from pathlib import Path

import pytest
import torch

from vr1fast.cli import parse as parse_args
from vr1fast.data.synthetic import generate_synthetic
from vr1fast.errors import ConfigError
from vr1fast.model.load import load_weights, tiny_model
from vr1fast.warmstart import cache_key, cached_warm_start, configured_warm_start, warm_start, warm_start_config


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> Path:
    """A set of this module's own: the cache tests list the warm_* folders beside it."""
    out = tmp_path_factory.mktemp("synthetic")
    generate_synthetic(out, n=8, seed=0)
    return out


def _cfg(synthetic: Path, *extra: str):
    return parse_args([f"--data.synthetic_dir={synthetic}", "--data.synthetic_size=8", "--model.warmstart_lr=1e-2",
                       "--model.warmstart_batch_size=3", *extra])


def _weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_the_warm_start_is_a_run_of_vr1fast_sft(synthetic):
    cfg = _cfg(synthetic, "--model.warmstart_steps=7", "--train.seed=5", "--data.path=/elsewhere.json",
               "--model.tiny_seed=3")
    sft = warm_start_config(cfg)
    assert (sft.train.max_steps, sft.train.prompts_per_rank, sft.train.grad_accum, sft.train.seed) == (7, 3, 1, 5)
    assert (sft.optim.lr, sft.optim.scheduler, sft.optim.warmup_steps, sft.optim.weight_decay,
            sft.optim.max_grad_norm) == (1e-2, "cosine", 0, 0.0, 1.0)
    assert sft.data.path is None and sft.data.synthetic_dir == str(synthetic) and sft.video == cfg.video
    assert (sft.model.path, sft.model.tiny_seed, sft.model.warmstart_steps, sft.train.bf16) == (None, 3, 0, False)
    assert sft.sft.labels == "completion" and sft.dist.strategy == "auto"


def test_loss_falls_the_weights_move_and_global_rngs_are_left_alone(synthetic):
    cfg = warm_start_config(_cfg(synthetic, "--model.warmstart_steps=12"))
    torch.manual_seed(123)
    random.seed(123)
    before = (torch.get_rng_state(), random.getstate())
    model, _, stats = warm_start(cfg)
    assert torch.equal(torch.get_rng_state(), before[0]) and random.getstate() == before[1]
    assert (stats["steps"], stats["examples"]) == (12, 8) and stats["supervised_tokens"] > 12 * 3 * 20
    assert stats["loss_last"] < stats["loss_first"], stats  # means of the first and last 10 steps
    initial = _weights(tiny_model(0)[0])
    assert max((v - initial[k]).abs().max().item() for k, v in _weights(model).items()) > 1e-3


def test_same_seed_same_weights(synthetic):
    runs = [_weights(warm_start(warm_start_config(_cfg(synthetic, "--model.warmstart_steps=2",
                                                       f"--train.seed={seed}")))[0]) for seed in (0, 0, 1)]
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])
    assert any(not torch.equal(runs[0][k], runs[2][k]) for k in runs[0])  # another order of records


def test_cache_is_reused_and_keyed(synthetic):
    cfg = _cfg(synthetic, "--model.warmstart_steps=2")
    first = configured_warm_start(cfg)
    started = time.perf_counter()
    again = configured_warm_start(cfg)
    assert (first.reused, again.reused, again.path, again.stats) == (False, True, first.path, first.stats)
    assert time.perf_counter() - started < 1.0
    assert set(first.stats) == {"steps", "examples", "supervised_tokens", "loss_first", "loss_last", "seconds"}
    assert (first.path / "config.json").is_file() and first.path.parent == synthetic
    model = load_weights(tiny_model(0)[0], first.path)
    initial = _weights(tiny_model(0)[0])
    assert max((v - initial[k]).abs().max().item() for k, v in _weights(model).items()) > 1e-3
    other = cached_warm_start(warm_start_config(_cfg(synthetic, "--model.warmstart_steps=3")))
    assert not other.reused and other.path != first.path and other.stats["steps"] == 3
    assert sorted(p.name for p in synthetic.iterdir() if p.name.startswith((".tmp", ".warm", "warm"))) == sorted(
        [first.path.name, other.path.name])  # no temporary folders left behind
    sft_json = synthetic / "sft.json"
    keys = {cache_key(warm_start_config(_cfg(synthetic, "--model.warmstart_steps=2", *extra)), sft_json)
            for extra in ((), ("--video.max_frames=4",), ("--model.rope_positions=transformers",),
                          ("--model.warmstart_lr=1e-3",), ("--train.output_dir=/other",), ("--train.seed=1",))}
    assert len(keys) == 5  # the RL run's output folder is no part of the warm start


def test_warm_start_needs_the_tiny_model():
    with pytest.raises(ConfigError, match="model.warmstart_steps"):
        parse_args(["--model.path=/some/checkpoint"])
    assert parse_args(["--model.path=/some/checkpoint", "--model.warmstart_steps=0"]).model.warmstart_steps == 0
    assert parse_args(["--preset=videor1", "--model.path=/some/checkpoint"]).model.warmstart_steps == 0
    with pytest.raises(ConfigError, match="model.warmstart_steps"):
        parse_args(["--model.warmstart_steps=-1"])


def test_train_starts_policy_and_reference_from_the_warm_start(synthetic, tmp_path):
    from vr1fast.train import build, close

    cfg = parse_args([f"--data.synthetic_dir={synthetic}", "--data.synthetic_size=8", "--model.warmstart_steps=2",
                      f"--train.output_dir={tmp_path / 'run'}", "--metrics.progress_bar=false"])
    run, _ = build(cfg)
    try:
        policy, ref = _weights(run.policy.model), _weights(run.ref.model)
    finally:
        close(run)
    warm = configured_warm_start(cfg)
    assert warm.reused
    saved = _weights(load_weights(tiny_model(0)[0], warm.path))
    initial = _weights(tiny_model(0)[0])
    assert all(torch.equal(policy[k], saved[k]) and torch.equal(ref[k], saved[k]) for k in saved)
    assert any(not torch.equal(saved[k], initial[k]) for k in saved)
