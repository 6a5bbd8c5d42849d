"""The training loop with each prompt computed once per group (``model.share_prompt``, the default) and with several
optimizer updates per rollout (``loss.num_iterations``, TRL's old-policy ratio)."""
import math

import pytest
import torch

import vr1fast.train as train_mod
from runs import comparable, small
from vr1fast.cli import parse as parse_args
from vr1fast.data.synthetic import generate_synthetic
from vr1fast.errors import ConfigError
from vr1fast.kernels.reference import grpo_loss_from_logprobs
from vr1fast.model.forward import completion_rows
from vr1fast.model.load import tiny_model
from vr1fast.rl.loss import completion_logprobs
from vr1fast.train import build, close, train_step


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    out = tmp_path_factory.mktemp("synthetic")
    generate_synthetic(out, n=8, seed=0)
    return out


def _cfg(synthetic, out, *extra):
    return parse_args(small(synthetic, out, "--metrics.tensorboard=false", "--metrics.plot=false", *extra))


def _models():
    """The tiny policy and a reference of other weights: with 8 new tokens the tiny model earns equal rewards in a
    group (zero advantages), so the gradient comes from the KL term, which needs a reference that differs."""
    policy, tokenizer = tiny_model(0)
    return policy, tiny_model(1, tokenizer=tokenizer)[0], tokenizer


def _steps(synthetic, out, steps, *extra):
    run, state = build(_cfg(synthetic, out, f"--train.max_steps={steps}", *extra), _models())
    try:
        rows = [train_step(run, state) for _ in range(steps)]
        params = {n: p.detach().clone() for n, p in run.policy.model.named_parameters()}
        updates = {int(s["step"]) for s in run.policy.optimizer.state.values() if "step" in s}
    finally:
        close(run)
    return rows, params, updates


def test_demo_step_equals_the_repeated_layout(synthetic, tmp_path):
    """One T-GRPO step of the small demo run: same rollout (same seeds), rewards, loss, KL and gradient norm, and
    the same weights after the AdamW update, in the prompt-once and the repeated layouts (float32 on the CPU).
    Bars: 1e-5 relative on the metrics; 2e-6 absolute on the weights (lr 1e-3: AdamW's first step moves each
    weight by ≈ lr·sign(g), so a gradient that differed in sign anywhere would show as 2e-3)."""
    (shared,), w_shared, _ = _steps(synthetic, tmp_path / "shared", 1)
    (repeated,), w_repeated, _ = _steps(synthetic, tmp_path / "repeated", 1, "--model.share_prompt=false")
    a, b = comparable([shared])[0], comparable([repeated])[0]
    assert a.keys() == b.keys() and a["grad_norm"] > 0
    for key in a:
        assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), key
    moved = max((w_shared[n] - w_repeated[n]).abs().max().item() for n in w_shared)
    assert moved <= 2e-6


def test_share_prompt_with_eager_attention_is_refused_at_start(synthetic, tmp_path):
    with pytest.raises(ConfigError, match="model.share_prompt=true needs attention"):
        _cfg(synthetic, tmp_path, "--model.attn_implementation=eager")
    assert _cfg(synthetic, tmp_path, "--model.attn_implementation=eager", "--model.share_prompt=false")


def test_several_updates_per_rollout_follow_the_old_policy_ratio(synthetic, tmp_path, monkeypatch):
    """num_iterations = 2: after each rollout the old policy's log-probs are computed once (no grad), then two
    updates use them. Update 1 sees ratio 1 (old = current weights); update 2's loss equals the loss reference
    (``kernels.reference``) on the moved policy's log-probs with the same old log-probs; AdamW counts two updates
    per step; the demo trains (finite metrics)."""
    calls = []
    original = train_mod._policy_loss

    def spy(model, inputs, ids, lengths, advantages, ref_lp, cfg, sampled_lp=None, old_lp=None):
        with torch.no_grad():
            rows = completion_rows(model, inputs, ids, lengths, num_samples=cfg.rollout.num_generations)
            lp = completion_logprobs(rows, cfg.loss, temperature=cfg.rollout.temperature)
            want, _ = grpo_loss_from_logprobs(lp, None, advantages, ref_lp, old_lp, offsets=rows.offsets,
                                              max_completion_length=cfg.rollout.max_new_tokens,
                                              **cfg.loss.kernel_kwargs())
        loss, metrics = original(model, inputs, ids, lengths, advantages, ref_lp, cfg, sampled_lp, old_lp)
        calls.append(dict(lp=lp, old=old_lp, loss=loss.detach(), want=want, ratio=metrics["ratio"]))
        return loss, metrics

    monkeypatch.setattr(train_mod, "_policy_loss", spy)
    rows, _, updates = _steps(synthetic, tmp_path, 2, "--loss.num_iterations=2", "--optim.lr=3e-2",
                                "--optim.warmup_steps=0")
    assert len(calls) == 4 and updates == {4}
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["kl"]) for r in rows)
    for first, second in (calls[0:2], calls[2:4]):
        assert first["old"] is second["old"] is not None
        torch.testing.assert_close(first["old"], first["lp"], atol=1e-6, rtol=0)  # update 1: old = current
        assert first["ratio"].item() == pytest.approx(1.0, abs=1e-6)
        assert (second["lp"] - second["old"]).abs().max() > 1e-3  # update 2: the policy moved
        for call in (first, second):
            torch.testing.assert_close(call["loss"], call["want"], atol=1e-6, rtol=1e-5)


def test_clipped_ratio_by_hand():
    """TRL's clipped objective with old log-probs, on one completion of two tokens (ε = 0.2, β = 0):
    ratios 1.5 and 0.9. A = +1: −min(1.5, 1.2) and −min(0.9, 0.9) → mean −1.05, the first token clipped high.
    A = −1: −min(−1.5, −1.2) = 1.5 and 0.9 → mean 1.2, nothing clipped (a ratio below 0.8 would be)."""
    old = torch.tensor([[-1.0, -2.0]], dtype=torch.float64)
    lp = old + torch.log(torch.tensor([[1.5, 0.9]], dtype=torch.float64))
    mask = torch.ones_like(lp)
    for adv, loss_want, high, low in ((1.0, -1.05, 0.5, 0.0), (-1.0, 1.2, 0.0, 0.0)):
        loss, m = grpo_loss_from_logprobs(lp, mask, torch.tensor([adv], dtype=torch.float64), None, old,
                                          beta=0.0)
        assert loss.item() == pytest.approx(loss_want, abs=1e-12)
        assert (m["clip_high"].item(), m["clip_low"].item()) == pytest.approx((high, low))
    loss, m = grpo_loss_from_logprobs(old + math.log(0.7), mask, torch.tensor([-1.0], dtype=torch.float64), None,
                                      old, beta=0.0)
    assert loss.item() == pytest.approx(0.8) and m["clip_low"].item() == 1.0  # −min(−0.7, −0.8)
