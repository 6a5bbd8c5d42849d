"""Both LM heads (``head="chunked"`` and ``head="fused"``) compiled on a CUDA GPU, against reference.py in float64.

Qwen2.5-7B's head (H = 3584, V = 152064) in bf16 at a few thousand rows (house rule 3: error ≤ 2× torch's bf16
error), fp32 and fp16 inputs, N·V > 2³¹ elements (tail rows), a 70,000-token sequence, bitwise repeatability, fp32
inputs under bf16 autocast (the bf16 path's results exactly) and the packed layout (equal to the padded one).
Run by scripts/gpu_validate.sh (``TRITON_INTERPRET=0 pytest -m gpu tests/gpu``); skipped elsewhere.
"""
from __future__ import annotations

import pytest
import torch

from gpu_util import HEADS, QWEN_H, QWEN_V, gen, head_run, leaves, loss_run, randn, within_torch
from vr1fast import kernels
from vr1fast.kernels import reference

pytestmark = pytest.mark.gpu
VIDEO_R1 = dict(beta=0.04, loss_type="grpo", epsilon_low=0.2, epsilon_high=0.2, kl_clamp=10.0)


def logprobs_fn(head):
    return kernels.implementation("linear_logprobs", "triton", head=head)


def loss_fn(head):
    return kernels.implementation("linear_grpo_loss", "triton", head=head)


def head_inputs(n, h, v, seed, logit_scale=3.0):
    """hidden [n, h] ~ N(0, 1), weight [v, h] scaled so that logits have std ``logit_scale``, targets [n] (fp32)."""
    return (randn(n, h, seed=seed), randn(v, h, seed=seed + 1, scale=logit_scale * h ** -0.5),
            torch.randint(0, v, (n,), generator=gen(seed + 2), device="cuda"))


def upstream(n, seed):
    return randn(n, seed=seed, dtype=torch.float64), randn(n, seed=seed + 1, dtype=torch.float64)


def grpo_batch(b, t, h, v, seed, lengths=None):
    """(hidden [b, t, h], weight, index, mask (ragged, one row fully real), advantages, ref log-probs, old=None)."""
    hidden, weight, index = head_inputs(b * t, h, v, seed)
    if lengths is None:
        lengths = torch.randint(1, t + 1, (b,), generator=gen(seed + 3), device="cuda")
        lengths[0] = t
    mask = (torch.arange(t, device="cuda")[None] < lengths[:, None]).float()
    with torch.no_grad():
        logp = reference.linear_logprobs(hidden.bfloat16(), weight.bfloat16(), index).view(b, t)
    ref = logp + 0.5 * randn(b, t, seed=seed + 4)
    return hidden.view(b, t, h), weight, index.view(b, t), mask, randn(b, seed=seed + 5), ref, None


@pytest.mark.parametrize("head", HEADS)
def test_linear_logprobs_qwen_bf16(head):
    n = 3000
    x, w, idx = head_inputs(n, QWEN_H, QWEN_V, seed=1)
    up = upstream(n, seed=4)
    ours = head_run(logprobs_fn(head), x, w, idx, torch.bfloat16, up, temperature=0.7)
    torch_bf16 = head_run(reference.linear_logprobs, x, w, idx, torch.bfloat16, up, temperature=0.7)
    exact = head_run(reference.linear_logprobs, x.bfloat16(), w.bfloat16(), idx, torch.float64, up, temperature=0.7)
    assert (ours[0] <= 0).all()
    within_torch(ours, exact, torch_bf16, ("logp", "entropy", "dX", "dW"), floor=1e-5)
    for got, want in zip(ours[2:], exact[2:]):  # verl's gates (docs/kernels.md §7.5)
        torch.testing.assert_close(got, want, rtol=4e-2, atol=2e-2)
    with torch.no_grad():  # the no-grad (reference / old policy) path gives the same log-probs
        logp = logprobs_fn(head)(x.bfloat16(), w.bfloat16(), idx, 0.7)
    torch.testing.assert_close(logp.double(), ours[0], rtol=0, atol=1e-6)


@pytest.mark.parametrize("head", HEADS)
def test_linear_grpo_loss_qwen_bf16(head):
    batch = grpo_batch(4, 800, QWEN_H, QWEN_V, seed=10)
    ours = loss_run(loss_fn(head), batch, torch.bfloat16, **VIDEO_R1)
    torch_bf16 = loss_run(reference.linear_grpo_loss, batch, torch.bfloat16, **VIDEO_R1)
    exact_batch = (batch[0].bfloat16(), batch[1].bfloat16(), *batch[2:])
    exact = loss_run(reference.linear_grpo_loss, exact_batch, torch.float64, **VIDEO_R1)
    within_torch(ours, exact, torch_bf16, ("loss", "dX", "dW"), floor=1e-9)
    assert (ours[1][batch[3] == 0] == 0).all()  # padded rows get no gradient


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("head", HEADS)
def test_fp32_and_fp16_inputs(head, dtype):
    n, h, v = 1000, 1024, 32_000
    x, w, idx = head_inputs(n, h, v, seed=20)
    up = upstream(n, seed=23)
    ours = head_run(logprobs_fn(head), x, w, idx, dtype, up)
    exact = head_run(reference.linear_logprobs, x.to(dtype), w.to(dtype), idx, torch.float64, up)
    if dtype == torch.float32:
        for got, want in zip(ours, exact):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * max(1.0, want.abs().max().item()))
        return
    torch_fp16 = head_run(reference.linear_logprobs, x, w, idx, dtype, up)
    within_torch(ours, exact, torch_fp16, ("logp", "entropy", "dX", "dW"), floor=1e-5)


@pytest.mark.parametrize("head", HEADS)
def test_more_than_2_31_elements_tail_rows(head):
    """N·V > 2³¹ logits (14,400 rows at V = 152064; the chunked head in one chunk, so its log-prob kernels index a
    [14400, V] logits buffer past 2³¹ elements): the tail rows' log-probs, entropies and dX (row-local for given
    upstream gradients) match the float64 reference run on the tail rows alone."""
    n, h, tail = 14_400, 128, 256
    assert (n - tail) * QWEN_V > 2**31
    x, w, idx = head_inputs(n, h, QWEN_V, seed=30)
    up = upstream(n, seed=33)
    ours = head_run(logprobs_fn(head), x, w, idx, torch.bfloat16, up, **(dict(rows=n) if head == "chunked" else {}))
    up_tail = (up[0][-tail:], up[1][-tail:])
    args = (x[-tail:], w, idx[-tail:])
    torch_bf16 = head_run(reference.linear_logprobs, *args, torch.bfloat16, up_tail)
    exact = head_run(reference.linear_logprobs, args[0].bfloat16(), w.bfloat16(), args[2], torch.float64, up_tail)
    within_torch([t[-tail:] for t in ours[:3]], exact[:3], torch_bf16[:3], ("logp", "entropy", "dX"), floor=1e-5)
    assert torch.isfinite(ours[3]).all()


@pytest.mark.parametrize("head", HEADS)
def test_70k_token_sequence(head):
    batch = grpo_batch(1, 70_000, 256, 4096, seed=40, lengths=torch.tensor([69_000], device="cuda"))
    ours = loss_run(loss_fn(head), batch, torch.bfloat16, **VIDEO_R1)
    torch_bf16 = loss_run(reference.linear_grpo_loss, batch, torch.bfloat16, **VIDEO_R1)
    exact_batch = (batch[0].bfloat16(), batch[1].bfloat16(), *batch[2:])
    exact = loss_run(reference.linear_grpo_loss, exact_batch, torch.float64, **VIDEO_R1)
    within_torch(ours, exact, torch_bf16, ("loss", "dX", "dW"), floor=1e-9)
    assert (ours[1][0, 69_000:] == 0).all()


@pytest.mark.parametrize("head", HEADS)
def test_bitwise_repeatable(head):
    batch = grpo_batch(4, 1024, 1024, 32_000, seed=50)
    first, second = (loss_run(loss_fn(head), batch, torch.bfloat16, **VIDEO_R1) for _ in range(2))
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    x, w, idx = (t.bfloat16() if t.is_floating_point() else t for t in batch[:3])
    with torch.no_grad():
        a, b = (logprobs_fn(head)(x, w, idx, 1.0, True) for _ in range(2))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@pytest.mark.parametrize("head", HEADS)
def test_fp32_under_autocast_is_the_bf16_path(head):
    """fp32 master hidden/weight under bf16 autocast: the head casts them, so loss and log-probs are the bf16
    inputs' bit for bit, and the fp32 gradients round to the bf16 path's bit for bit (the chunked head returns the
    fp32 sums it would round for bf16 inputs, the fused one casts its bf16 gradients back)."""
    batch = grpo_batch(2, 600, 1024, 32_000, seed=60)
    hidden, weight = leaves(torch.float32, *batch[:2])
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss, _ = loss_fn(head)(hidden, weight, *batch[2:], **VIDEO_R1)
        with torch.no_grad():
            logp = logprobs_fn(head)(hidden, weight, batch[2])
    loss.backward()
    bf16 = loss_run(loss_fn(head), batch, torch.bfloat16, **VIDEO_R1)
    assert hidden.grad.dtype == weight.grad.dtype == torch.float32
    assert torch.equal(loss.double(), bf16[0])
    for got, want in ((hidden.grad, bf16[1]), (weight.grad, bf16[2])):
        assert torch.equal(got.bfloat16().double(), want)
    with torch.no_grad():
        want = logprobs_fn(head)(batch[0].bfloat16(), batch[1].bfloat16(), batch[2])
    assert torch.equal(logp, want)


@pytest.mark.parametrize("head", HEADS)
def test_packed_equals_padded(head):
    """Real rows packed with sequence offsets give the padded layout's loss, metrics and gradients (fp32)."""
    b, t, h, v = 5, 300, 512, 8000
    lengths = torch.tensor([t, 1, 123, 299, 40], device="cuda")
    hidden, weight, index, mask, adv, ref, _ = grpo_batch(b, t, h, v, seed=70, lengths=lengths)
    keep = mask.bool()
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cpu().cumsum(0)])
    padded_h, packed_h, w_pad, w_pack = leaves(torch.float32, hidden, hidden[keep], weight, weight)
    loss, metrics = loss_fn(head)(padded_h, w_pad, index, mask, adv, ref, **VIDEO_R1)
    loss.backward()
    p_loss, p_metrics = loss_fn(head)(packed_h, w_pack, index[keep], mask[keep], adv, ref[keep], offsets=offsets,
                                      **VIDEO_R1)
    p_loss.backward()
    torch.testing.assert_close(p_loss, loss, rtol=1e-5, atol=1e-7)
    assert p_metrics.keys() == metrics.keys()
    for k in metrics:
        torch.testing.assert_close(p_metrics[k], metrics[k], rtol=1e-5, atol=1e-7)
    assert (padded_h.grad[~keep] == 0).all()
    for got, want in ((packed_h.grad, padded_h.grad[keep]), (w_pack.grad, w_pad.grad)):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * want.abs().max().item())


@pytest.mark.parametrize("head", HEADS)
def test_reference_logprobs_of_the_policy_give_kl_exactly_zero(head):
    """Training step 1 at Qwen's head shape: the reference's no-grad log-probs (``linear_logprobs``) equal the ones
    inside the loss bit for bit on the GPU too (separately compiled kernels could contract ``a·b − c`` into an FMA
    differently), so the first KL is exactly 0 as in Video-R1."""
    hidden, weight, index, mask, adv, _, _ = grpo_batch(4, 500, QWEN_H, QWEN_V, seed=40)
    h, w = hidden.bfloat16(), weight.bfloat16()
    with torch.no_grad():
        ref = logprobs_fn(head)(h, w, index, 0.7)
    _, metrics = loss_fn(head)(*leaves(torch.bfloat16, h, w), index, mask, adv, ref, **dict(VIDEO_R1, temperature=0.7))
    assert metrics["kl"].item() == 0.0
