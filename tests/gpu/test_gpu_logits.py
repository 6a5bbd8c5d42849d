"""Logits-level kernels (kernels/logprob.py, kernels/grpo.py) compiled on a CUDA GPU, against reference.py in float64.

Qwen's vocabulary (V = 152064) in bf16: extreme rows, every GRPO option family, in-place and out-of-place
gradients, N·V > 2³¹ elements (int64 offsets: the tail rows), a 70,000-token sequence (1-D grid) and bitwise
repeatability. Run by scripts/gpu_validate.sh (``TRITON_INTERPRET=0 pytest -m gpu tests/gpu``); skipped elsewhere.
"""
from __future__ import annotations

import pytest
import torch

from gpu_util import QWEN_V, gen, randn, within_torch
from vr1fast import kernels
from vr1fast.kernels import reference

pytestmark = pytest.mark.gpu


def logprob_fn():
    return kernels.implementation("selective_log_softmax", "triton")


def grpo_fn():
    return kernels.implementation("grpo_loss", "triton")


def logprob_grads(fn, logits, index, upstream, temperature):
    """logp, entropy, dlogits of ``fn`` on a leaf copy of ``logits`` with upstream (g_logp, g_entropy) (float64)."""
    leaf = logits.detach().clone().requires_grad_()
    logp, ent = fn(leaf, index, temperature, True)
    (logp.double() * upstream[0] + ent.double() * upstream[1]).sum().backward()
    return [logp.detach(), ent.detach(), leaf.grad]


def test_logprob_bf16_extreme_rows_vs_float64():
    b, t = 2, 1500
    logits = randn(b, t, QWEN_V, seed=1, scale=3.0, dtype=torch.bfloat16)
    index = torch.randint(0, QWEN_V, (b, t), generator=gen(2), device="cuda")
    logits[0, 0] = -1e4  # a row of equal, very negative logits
    logits[0, 1, index[0, 1]] = 80.0  # a spike at the target: logp ≈ 0
    logits[1, :7] -= 5000.0  # rows far below zero
    upstream = (randn(b, t, seed=3, dtype=torch.float64), randn(b, t, seed=4, dtype=torch.float64))
    ours = logprob_grads(logprob_fn(), logits, index, upstream, 0.7)
    exact = logprob_grads(reference.selective_log_softmax, logits.double(), index, upstream, 0.7)
    torch_bf16 = logprob_grads(reference.selective_log_softmax, logits, index, upstream, 0.7)
    assert (ours[0] <= 0).all()
    # fp32 math on both sides: a few fp32 ulps of the largest |z / T| (1e4 / 0.7) as the absolute floor
    within_torch(ours, exact, torch_bf16, ("logp", "entropy", "dlogits"), floor=1e-6 * 1e4 / 0.7)


def grpo_case(seed, b, t, v, dtype=torch.bfloat16):
    """logits [b, t, v], index, ragged mask (an all-masked row), advantages, ref and old log-probs near the policy's."""
    logits = randn(b, t, v, seed=seed, scale=2.5, dtype=dtype)
    index = torch.randint(0, v, (b, t), generator=gen(seed + 1), device="cuda")
    lengths = torch.randint(1, t + 1, (b,), generator=gen(seed + 2), device="cuda")
    mask = (torch.arange(t, device="cuda")[None] < lengths[:, None]).float()
    mask[-1] = 0
    adv = randn(b, seed=seed + 3)
    lp = reference.selective_log_softmax(logits, index).float()
    return logits, index, mask, adv, lp + 0.5 * randn(b, t, seed=seed + 4), lp + 0.3 * randn(b, t, seed=seed + 5)


def grpo_grads(fn, logits, index, mask, adv, ref, old, intermediate=False, **cfg):
    """loss, metrics (float64) and dlogits; with ``intermediate`` the logits are an autograd intermediate (y = 1·x),
    so the Triton kernel writes dlogits into their buffer in place."""
    leaf = logits.detach().clone().requires_grad_()
    x = leaf * 1.0 if intermediate else leaf
    loss, metrics = fn(x, index, mask, adv, ref, old, **cfg)
    loss.backward()
    return loss.detach().double(), {k: v.double() for k, v in metrics.items()}, leaf.grad


@pytest.mark.parametrize("level,with_old,loss_type", [("token", False, "grpo"), ("token", True, "bnpo"),
                                                      ("sequence", True, "dapo"), ("token", True, "dr_grpo")])
def test_grpo_loss_bf16_vs_float64(level, with_old, loss_type):
    logits, index, mask, adv, ref, old = grpo_case(10, 4, 700, QWEN_V)
    old = old if with_old else None
    cfg = dict(loss_type=loss_type, importance_sampling_level=level, temperature=0.9, epsilon_high=0.28,
               delta=1.5 if with_old else None, max_completion_length=700)
    ours = grpo_grads(grpo_fn(), logits, index, mask, adv, ref, old, **cfg)
    exact = grpo_grads(reference.grpo_loss, logits.double(), index, mask, adv, ref, old, **cfg)
    torch_bf16 = grpo_grads(reference.grpo_loss, logits, index, mask, adv, ref, old, **cfg)
    torch.testing.assert_close(ours[0], exact[0], rtol=1e-5, atol=1e-6)
    assert ours[1].keys() == exact[1].keys()
    for k in exact[1]:
        torch.testing.assert_close(ours[1][k], exact[1][k], rtol=1e-5, atol=1e-6)
    within_torch(ours[2:], exact[2:], torch_bf16[2:], ("dlogits",), floor=1e-9)
    assert (ours[2][mask == 0] == 0).all()


def test_grpo_in_place_equals_out_of_place():
    logits, index, mask, adv, ref, _ = grpo_case(20, 3, 500, QWEN_V)
    out_of_place = grpo_grads(grpo_fn(), logits, index, mask, adv, ref, None)
    in_place = grpo_grads(grpo_fn(), logits, index, mask, adv, ref, None, intermediate=True)
    assert torch.equal(out_of_place[0], in_place[0]) and torch.equal(out_of_place[2], in_place[2])


def test_more_than_2_31_elements_tail_rows():
    """N·V > 2³¹ (one sequence of 14,400 rows at V = 152064): rows past element 2³¹ are read and written right.
    dr_grpo makes each row's gradient depend on its row alone, so the tail rows' reference is the tail alone."""
    t, tail = 14_400, 256
    assert t * QWEN_V > 2**31 and (t - tail) * QWEN_V > 2**31
    logits = randn(1, t, QWEN_V, seed=30, scale=2.0, dtype=torch.bfloat16)
    index = torch.randint(0, QWEN_V, (1, t), generator=gen(31), device="cuda")
    upstream = (randn(1, t, seed=32, dtype=torch.float64), randn(1, t, seed=33, dtype=torch.float64))
    ours = logprob_grads(logprob_fn(), logits, index, upstream, 1.0)
    cut = (slice(None), slice(t - tail, None))
    up_tail = (upstream[0][cut], upstream[1][cut])
    exact = logprob_grads(reference.selective_log_softmax, logits[cut].double(), index[cut], up_tail, 1.0)
    torch_bf16 = logprob_grads(reference.selective_log_softmax, logits[cut], index[cut], up_tail, 1.0)
    within_torch([o[cut] for o in ours], exact, torch_bf16, ("logp", "entropy", "dlogits"), floor=2e-5)
    del ours
    mask, adv = torch.ones(1, t, device="cuda"), randn(1, seed=34)
    ref = reference.selective_log_softmax(logits[cut], index[cut])
    ref = torch.cat([torch.zeros(1, t - tail, device="cuda"), ref + 0.3], 1)
    cfg = dict(loss_type="dr_grpo", max_completion_length=t)
    grads = grpo_grads(grpo_fn(), logits, index, mask, adv, ref, None, **cfg)[2][cut]
    # B·max_completion_length unchanged (1·t): the tail rows alone keep their weight 1/t
    exact = grpo_grads(reference.grpo_loss, logits[cut].double(), index[cut], mask[cut], adv, ref[cut], None,
                       **cfg)[2]
    torch_bf16 = grpo_grads(reference.grpo_loss, logits[cut], index[cut], mask[cut], adv, ref[cut], None, **cfg)[2]
    within_torch([grads], [exact], [torch_bf16], ("grpo dlogits",), floor=1e-9)


def test_70k_token_sequence():
    """One 70,000-token sequence (more than CUDA's 65,535 grid rows): log-probs and GRPO loss vs float64."""
    t, v = 70_000, 2_048
    logits, index, mask, adv, ref, _ = grpo_case(40, 1, t, v)
    mask[-1] = 1.0
    upstream = (randn(1, t, seed=41, dtype=torch.float64), randn(1, t, seed=42, dtype=torch.float64))
    ours = logprob_grads(logprob_fn(), logits, index, upstream, 1.0)
    exact = logprob_grads(reference.selective_log_softmax, logits.double(), index, upstream, 1.0)
    torch_bf16 = logprob_grads(reference.selective_log_softmax, logits, index, upstream, 1.0)
    within_torch(ours, exact, torch_bf16, ("logp", "entropy", "dlogits"), floor=2e-5)
    ours = grpo_grads(grpo_fn(), logits, index, mask, adv, ref, None)
    exact = grpo_grads(reference.grpo_loss, logits.double(), index, mask, adv, ref, None)
    torch_bf16 = grpo_grads(reference.grpo_loss, logits, index, mask, adv, ref, None)
    torch.testing.assert_close(ours[0], exact[0], rtol=1e-5, atol=1e-6)
    within_torch(ours[2:], exact[2:], torch_bf16[2:], ("grpo dlogits",), floor=1e-9)


def test_bitwise_repeatable():
    logits, index, mask, adv, ref, old = grpo_case(50, 4, 1000, QWEN_V)
    upstream = (randn(4, 1000, seed=51, dtype=torch.float64), randn(4, 1000, seed=52, dtype=torch.float64))
    first, second = (logprob_grads(logprob_fn(), logits, index, upstream, 1.0) for _ in range(2))
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    first, second = (grpo_grads(grpo_fn(), logits, index, mask, adv, ref, old) for _ in range(2))
    assert torch.equal(first[0], second[0]) and torch.equal(first[2], second[2])
