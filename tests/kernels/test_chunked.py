"""The chunked LM head (vr1fast/kernels/chunked.py: cuBLAS logits per chunk, Triton loss kernels, cuBLAS grads) under
the Triton interpreter, against ``reference.py`` in float64; for bf16 also against torch's own bf16 error (house
rule 3). Every loss type × level × ref × old runs for both heads in ``test_linear_logprob.py``. Chunks of a few rows
make every test cross several chunks (the fp32 dW accumulator, its in-place narrowing, the per-chunk slices of the
batch's aggregation weights). The packed layout is checked against the padded one."""
from __future__ import annotations

import pytest
import torch
from test_linear_logprob import T_ODD, _grpo_batch, _inputs, _loss_and_grads, _max_err, _run

from vr1fast import kernels
from vr1fast.kernels import chunked, reference
from vr1fast.kernels._triton import aot_check


def _chunked(rows):
    def logprobs(x, w, idx, temperature, entropy):
        return chunked.linear_logprobs(x, w, idx, temperature, entropy, rows=rows)
    return logprobs


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_logprobs_entropy_and_grads_match_float64(dtype):
    x, w, idx = _inputs(37, 40, 300, dtype, seed=1)
    g = torch.Generator().manual_seed(2)
    upstream = (torch.randn(37, generator=g, dtype=torch.float64), torch.randn(37, generator=g, dtype=torch.float64))
    ours = _run(_chunked(10), x, w, idx, dtype, upstream, temperature=T_ODD)
    exact = _run(reference.linear_logprobs, x, w, idx, torch.float64, upstream, temperature=T_ODD)
    err = _max_err(ours, exact)
    assert (ours[0] <= 0).all() and all(torch.isfinite(t).all() for t in ours)
    assert err[0] < 2e-5 and err[1] < 2e-5  # fp32 logits from the 16-bit operands: never rounded
    if dtype == torch.float32:
        for got, want in zip(ours[2:], exact[2:]):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * want.abs().max().item())
        return
    torch_err = _max_err(_run(reference.linear_logprobs, x, w, idx, dtype, upstream, temperature=T_ODD), exact)
    for k in (2, 3):
        assert err[k] <= 2 * torch_err[k], (k, err[k], torch_err[k])


@pytest.mark.parametrize("rows", [3, 8, None])
def test_bf16_video_r1_defaults_within_twice_torch_error(rows):
    """The fp32 dW accumulator keeps dW (and dX, one GEMM per row chunk) within 2× torch's own bf16 error against
    float64 however many chunks the rows fall into (21 rows: 7, 3 or 1 chunks)."""
    batch = _grpo_batch(11, with_ref=True, with_old=False)
    ours = _loss_and_grads(lambda *a, **k: chunked.linear_grpo_loss(*a, rows=rows, **k), batch, torch.bfloat16)
    exact = _loss_and_grads(reference.linear_grpo_loss, batch, torch.float64)
    torch_bf16 = _loss_and_grads(reference.linear_grpo_loss, batch, torch.bfloat16)
    for i in (0, 2, 3):
        err, torch_err = ((r[i] - exact[i]).abs().max().item() for r in (ours, torch_bf16))
        assert err <= 2 * torch_err + 1e-6, (i, err, torch_err)


def _packed(batch):
    """The batch's real tokens packed: (hidden [N, H], index [N], ref [N] or None, old [N] or None, offsets)."""
    hidden, _, idx, mask, _, ref, old = batch
    keep = mask.bool()
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), mask.sum(1).cumsum(0)])
    pick = (lambda t: None if t is None else t[keep])
    return hidden[keep], idx[keep], pick(ref), pick(old), offsets


@pytest.mark.parametrize("impl", ["chunked", "fused", "reference"])
@pytest.mark.parametrize("level,loss_type", [("token", "grpo"), ("token", "bnpo"), ("token", "dapo"),
                                             ("sequence", "dr_grpo")])
def test_packed_equals_padded(impl, level, loss_type):
    """Loss, metrics and the gradients of hidden (on the real tokens) and weight agree between the padded batch and
    its real tokens packed with offsets (the all-masked row becomes an empty sequence), in float64."""
    batch = _grpo_batch(13, with_ref=True, with_old=True)
    hidden, weight, idx, mask, adv, ref, old = batch
    fn = reference.linear_grpo_loss if impl == "reference" else kernels.implementation("linear_grpo_loss", "triton",
                                                                                       head=impl)
    cfg = dict(loss_type=loss_type, importance_sampling_level=level, max_completion_length=9, temperature=T_ODD)
    dtype = torch.float32 if impl != "reference" else torch.float64
    loss, metrics, dh, dw = _loss_and_grads(fn, batch, dtype, **cfg)
    ph, pidx, pref, pold, offsets = _packed(batch)
    h = ph.to(dtype).requires_grad_()
    w = weight.to(dtype).requires_grad_()
    ploss, pmetrics = fn(h, w, pidx, None, adv, pref, pold, offsets=offsets, **cfg)
    ploss.backward()
    tol = dict(rtol=1e-6, atol=1e-7) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(ploss.double(), loss, **tol)
    for k in metrics:
        torch.testing.assert_close(pmetrics[k].double(), metrics[k], **tol)
    torch.testing.assert_close(h.grad.double(), dh[mask.bool()], **tol)
    torch.testing.assert_close(w.grad.double(), dw, **tol)


def test_bad_offsets():
    ph, pidx, pref, _, offsets = _packed(_grpo_batch(14, with_ref=True, with_old=False))
    w = torch.randn(200, ph.shape[1])
    adv = torch.zeros(3)
    with pytest.raises(ValueError, match="offsets"):
        chunked.linear_grpo_loss(ph, w, pidx, None, adv, pref, offsets=offsets[:-1])
    with pytest.raises(ValueError, match="offsets"):
        chunked.linear_grpo_loss(ph, w, pidx, None, adv, pref, offsets=offsets.flip(0))


def test_poisoned_buffers_one_thread_dense_gemms():
    from poison import poisoned

    batch = _grpo_batch(15, with_ref=True, with_old=False)
    with poisoned(threads=1):
        ours = _loss_and_grads(lambda *a, **k: chunked.linear_grpo_loss(*a, rows=5, **k), batch, torch.bfloat16)
        x, w, idx = _inputs(13, 24, 130, torch.bfloat16, seed=16)
        up = (torch.randn(13, dtype=torch.float64), torch.randn(13, dtype=torch.float64))
        lp = _run(_chunked(4), x, w, idx, torch.bfloat16, up)
    assert all(torch.isfinite(t).all() for t in (*ours[2:], *lp))
    exact = _loss_and_grads(reference.linear_grpo_loss, batch, torch.float64)
    torch.testing.assert_close(ours[2], exact[2], rtol=4e-2, atol=2e-3)


def test_fp32_masters_under_cpu_autocast():
    """fp32 hidden and head weight under bf16 autocast: the head computes on bf16 copies exactly as with bf16 inputs
    (same loss, bit for bit), and both gradients come back in fp32 without a bf16 rounding (fp32-output GEMM for dX,
    the fp32 accumulator for dW): closer to the float64 gradients of the bf16 copies than the bf16 path's (measured:
    dX 2.8e-4 vs 4.4e-4, dW 1.2e-3 vs 1.4e-3; dz itself is bf16 in both)."""
    batch = _grpo_batch(17, with_ref=True, with_old=False)
    hidden, weight, idx, mask, adv, ref, _ = batch
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = chunked.linear_grpo_loss(h, w, idx, mask, adv, ref, rows=6)
    loss.backward()
    hb, wb = hidden.bfloat16().requires_grad_(), weight.bfloat16().requires_grad_()
    want, _ = chunked.linear_grpo_loss(hb, wb, idx, mask, adv, ref, rows=6)
    want.backward()
    assert torch.equal(loss, want) and h.grad.dtype == w.grad.dtype == torch.float32
    rounded = (hidden.bfloat16().float(), weight.bfloat16().float(), *batch[2:])
    exact = _loss_and_grads(reference.linear_grpo_loss, rounded, torch.float64)
    for ours, bf16_path, want64 in ((h.grad, hb.grad, exact[2]), (w.grad, wb.grad, exact[3])):
        assert not torch.equal(ours, bf16_path.float())  # not rounded to bf16 on the way ...
        assert torch.equal(ours.bfloat16(), bf16_path)  # ... but the same fp32 sums the bf16 path rounds once
        assert _max_err([ours.double()], [want64])[0] < _max_err([bf16_path.double()], [want64])[0]
    fp32, _ = chunked.linear_grpo_loss(hidden, weight, idx, mask, adv, ref, rows=6)
    assert not torch.equal(fp32, loss)


def test_frozen_weight_and_no_grad():
    batch = _grpo_batch(18, with_ref=True, with_old=False)
    hidden, weight, idx, mask, adv, ref, _ = batch
    h = hidden.clone().requires_grad_()
    loss, _ = chunked.linear_grpo_loss(h, weight, idx, mask, adv, ref, rows=4)
    loss.backward()
    assert weight.grad is None
    exact = _loss_and_grads(reference.linear_grpo_loss, batch, torch.float64)
    torch.testing.assert_close(h.grad.double(), exact[2], rtol=1e-4, atol=1e-7)
    with torch.no_grad():
        nograd, _ = chunked.linear_grpo_loss(hidden, weight, idx, mask, adv, ref, rows=4)
        logp = chunked.linear_logprobs(hidden, weight, idx.int(), rows=4)
    assert not nograd.requires_grad and torch.equal(nograd, loss.detach())
    torch.testing.assert_close(logp.double(), reference.linear_logprobs(hidden.double(), weight.double(), idx),
                               rtol=0, atol=1e-5)


def test_narrow_in_place_keeps_values_and_storage():
    acc = torch.randn(37, 5, dtype=torch.float32)
    want = acc.bfloat16()
    ptr = acc.data_ptr()
    out = chunked._narrow_in_place(acc, torch.bfloat16)
    assert out.dtype == torch.bfloat16 and out.shape == (37, 5) and out.data_ptr() == ptr and torch.equal(out, want)


def test_dispatch_picks_the_head(monkeypatch):
    from vr1fast.kernels import linear_logprob

    assert kernels.implementation("linear_grpo_loss", "triton") is chunked.linear_grpo_loss
    assert kernels.implementation("linear_logprobs", "triton", head="fused") is linear_logprob.linear_logprobs
    monkeypatch.setenv("VR1FAST_HEAD", "fused")
    assert kernels.implementation("linear_grpo_loss", "triton") is linear_logprob.linear_grpo_loss
    monkeypatch.setenv("VR1FAST_HEAD", "split")
    with pytest.raises(ValueError, match="VR1FAST_HEAD"):
        kernels.implementation("linear_grpo_loss", "triton")


def test_sm90_aot_compile():
    """The launches the chunked head makes at the Qwen-7B shape compile for sm_90, without register spills."""
    compiled = aot_check("vr1fast.kernels.chunked")
    assert len(compiled) == len(chunked.aot_variants()) == 5
    for c in compiled:
        assert c["cubin"] > 0 and c["shared"] <= 227 * 1024 and c["local"] == 0, c


@pytest.mark.parametrize("impl", ["chunked", "fused", "reference"])
def test_reference_logprobs_of_the_policy_give_kl_exactly_zero(impl):
    """Step 1 of training: the reference model is the policy, so its no-grad log-probs (``linear_logprobs``) must
    equal the ones inside the loss bit for bit (k3 = 0 exactly, as in Video-R1), on either layout."""
    hidden, weight, idx, mask, adv, _, _ = _grpo_batch(19, with_ref=False, with_old=False)
    h, w = hidden.bfloat16(), weight.bfloat16()
    fns = {name: (reference.__dict__[name] if impl == "reference"
                  else kernels.implementation(name, "triton", head=impl)) for name in ("linear_logprobs",
                                                                                        "linear_grpo_loss")}
    with torch.no_grad():
        ref = fns["linear_logprobs"](h, w, idx, T_ODD)
    _, metrics = fns["linear_grpo_loss"](h.requires_grad_(), w.requires_grad_(), idx, mask, adv, ref,
                                         temperature=T_ODD)
    assert metrics["kl"].item() == 0.0
    ph, pidx, _, _, offsets = _packed((h.detach(), w, idx, mask, adv, None, None))
    with torch.no_grad():
        pref = fns["linear_logprobs"](ph, w, pidx, T_ODD)
    _, metrics = fns["linear_grpo_loss"](ph.requires_grad_(), w, pidx, None, adv, pref, offsets=offsets,
                                         temperature=T_ODD)
    assert metrics["kl"].item() == 0.0


def test_loss_scale_applied_in_fp32_before_rounding():
    """(loss / 3).backward() on bf16 inputs: the saved fp32 dX, dW are scaled by dLoss in fp32 and rounded once,
    so the gradients equal the fp32 gradients / 3 rounded to bf16 (scaling bf16 gradients by bf16(1/3) = 0.33398
    would bias every element by +0.2%). The fp32 gradients come from the autocast path, which accumulates the same
    bf16 products in fp32."""
    batch = _grpo_batch(23, with_ref=True, with_old=False)
    hidden, weight, idx, mask, adv, ref, _ = batch
    hb, wb = hidden.bfloat16().requires_grad_(), weight.bfloat16().requires_grad_()
    loss, _ = chunked.linear_grpo_loss(hb, wb, idx, mask, adv, ref, rows=6)
    (loss / 3).backward()
    h32, w32 = hidden.bfloat16().float().requires_grad_(), weight.bfloat16().float().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss32, _ = chunked.linear_grpo_loss(h32, w32, idx, mask, adv, ref, rows=6)
    loss32.backward()
    for got, full in ((hb.grad, h32.grad), (wb.grad, w32.grad)):
        want = (full / 3).bfloat16()
        assert abs(got.float().abs().sum() / want.float().abs().sum() - 1) < 2e-4
        torch.testing.assert_close(got, want, rtol=2 ** -7, atol=0)
