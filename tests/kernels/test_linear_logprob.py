"""The fused LM-head log-prob kernels (vr1fast/kernels/linear_logprob.py) under the Triton interpreter.

Every value is checked against ``reference.py`` run in float64 on the same inputs (upcast), and, for 16-bit inputs,
against what the reference gets in that dtype (house rule 3: our error ≤ 2× torch's). The sm_90 AOT compile runs
in a subprocess without the interpreter, because interpreted kernels cannot be compiled.
"""
from __future__ import annotations

import pytest
import torch

from vr1fast import kernels
from vr1fast.kernels import linear_logprob as fused
from vr1fast.kernels import reference
from vr1fast.kernels._triton import aot_check

T_ODD = 0.7


def _inputs(n, h, v, dtype, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(n, h, generator=g) * scale).to(dtype)
    w = (torch.randn(v, h, generator=g) * 0.3).to(dtype)
    return x, w, torch.randint(0, v, (n,), generator=g)


def _run(fn, x, w, idx, dtype, upstream, **kw):
    """logp, entropy, dX, dW (float64) of fn on (x, w) cast to dtype, for upstream grads (g_logp, g_entropy)."""
    x = x.to(dtype).detach().requires_grad_()
    w = w.to(dtype).detach().requires_grad_()
    logp, ent = fn(x, w, idx, kw.pop("temperature", 1.0), True, **kw)
    (logp.double() * upstream[0] + ent.double() * upstream[1]).sum().backward()
    return [t.detach().double() for t in (logp, ent, x.grad, w.grad)]


def _max_err(a, b):
    return [(u - v).abs().max().item() for u, v in zip(a, b)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_logprobs_entropy_and_grads_match_float64(dtype):
    # N=37 (3 token blocks), H=40 (masked K tail), V=300 (2 vocab splits, last partial), 3 backward chunks.
    x, w, idx = _inputs(37, 40, 300, dtype, seed=1)
    g = torch.Generator().manual_seed(2)
    upstream = (torch.randn(37, generator=g, dtype=torch.float64), torch.randn(37, generator=g, dtype=torch.float64))
    ours = _run(fused.linear_logprobs, x, w, idx, dtype, upstream, temperature=T_ODD, vocab_chunk=100)
    exact = _run(reference.linear_logprobs, x, w, idx, torch.float64, upstream, temperature=T_ODD)
    err = _max_err(ours, exact)
    assert (ours[0] <= 0).all() and all(torch.isfinite(t).all() for t in ours)
    if dtype == torch.float32:
        assert err[0] < 2e-5 and err[1] < 2e-5
        for got, want in zip(ours[2:], exact[2:]):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * want.abs().max().item())
        return
    # bf16/fp16: the fused head never rounds logits, so log-probs are fp32-exact on the 16-bit inputs ...
    assert err[0] < 2e-5 and err[1] < 2e-5
    torch_err = _max_err(_run(reference.linear_logprobs, x, w, idx, dtype, upstream, temperature=T_ODD), exact)
    assert err[0] < torch_err[0] and err[1] < torch_err[1]
    # ... and gradients (rounded to the input dtype) stay within 2x torch's error and verl's gates
    # (docs/kernels.md §7.5).
    for k in (2, 3):
        assert err[k] <= 2 * torch_err[k], (k, err[k], torch_err[k])
        torch.testing.assert_close(ours[k], exact[k], rtol=4e-2, atol=2e-2)


@pytest.mark.parametrize("seed", [3, 4, 5, None])
def test_random_shapes(seed):
    """Random non-power-of-two shapes; seed None: 10 token blocks, more than one L2 group of GROUP_M blocks."""
    g = torch.Generator().manual_seed(seed or 0)
    if seed is None:
        n, h, v = 150, 20, 130
        assert n > fused.GROUP_M * fused.CONFIGS[0].kwargs["BLOCK_M"]
    else:
        n, h, v = (int(torch.randint(lo, hi, (1,), generator=g)) for lo, hi in ((1, 64), (17, 64), (65, 1000)))
    x, w, idx = _inputs(n, h, v, torch.float32, seed or 0)
    upstream = (torch.rand(n, dtype=torch.float64, generator=g) - 0.5, torch.zeros(n, dtype=torch.float64))
    ours = _run(fused.linear_logprobs, x, w, idx, torch.float32, upstream)
    exact = _run(reference.linear_logprobs, x, w, idx, torch.float64, upstream)
    for got, want in zip(ours, exact):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * max(1.0, want.abs().max().item()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_extreme_logits(dtype):
    """Logits of ±thousands, and rows whose logits are all very negative (verl #2656/#7439: positive or NaN logps)."""
    x, w, idx = _inputs(24, 32, 150, torch.float32, seed=6, scale=300.0)
    x[12:] = x[12:].abs()
    w = -(w.abs() + 0.1)
    x, w = x.to(dtype), w.to(dtype)
    ours = fused.linear_logprobs(x, w, idx, T_ODD, return_entropy=True)
    exact = reference.linear_logprobs(x.double(), w.double(), idx, T_ODD, return_entropy=True)
    assert (x[12:].double() @ w.double().T).max().item() < -1000  # the all-negative rows really are
    assert all(torch.isfinite(t).all() for t in ours) and (ours[0] <= 0).all()
    logits = (x.double() @ w.double().T).abs().max().item() / T_ODD
    for got, want in zip(ours, exact):
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=4e-7 * logits)


def test_frozen_weight_and_no_grad():
    x, w, idx = _inputs(20, 24, 130, torch.float32, seed=7)
    x.requires_grad_()
    fused.linear_logprobs(x, w, idx.view(4, 5).reshape(20)).sum().backward()
    assert w.grad is None
    xd = x.detach().double().requires_grad_()
    reference.linear_logprobs(xd, w.double(), idx).sum().backward()
    torch.testing.assert_close(x.grad.double(), xd.grad, rtol=1e-4, atol=1e-6)
    with torch.no_grad():  # int32 ids are accepted (the kernels read int64)
        logp = fused.linear_logprobs(x.view(4, 5, 24), w, idx.view(4, 5).int())
    assert logp.shape == (4, 5) and not logp.requires_grad
    torch.testing.assert_close(logp.double(), reference.linear_logprobs(xd.detach(), w.double(), idx).view(4, 5),
                               rtol=0, atol=1e-5)


def test_bad_inputs_and_empty():
    x, w, idx = _inputs(4, 16, 70, torch.float32, seed=8)
    with pytest.raises(ValueError, match="dtype"):
        fused.linear_logprobs(x.bfloat16(), w, idx)
    with pytest.raises(ValueError, match="index values"):
        fused.linear_logprobs(x, w, idx + 70)
    with pytest.raises(ValueError, match="do not fit"):
        fused.linear_logprobs(x, w[:, :8], idx)
    with pytest.raises(ValueError, match="temperature"):
        fused.linear_logprobs(x, w, idx, 0.0)
    empty = fused.linear_logprobs(x[:0].requires_grad_(), w, idx[:0])
    assert empty.shape == (0,)


def test_dispatch_runs_the_fused_kernel(monkeypatch):
    assert kernels.implementation("linear_logprobs", "triton", head="fused") is fused.linear_logprobs
    assert kernels.implementation("linear_grpo_loss", "triton", head="fused") is fused.linear_grpo_loss
    assert kernels.implementation("linear_logprobs", device="cpu") is reference.linear_logprobs
    assert kernels.implementation("linear_logprobs", device="cuda", head="fused") is fused.linear_logprobs
    monkeypatch.setenv("VR1FAST_IMPL", "triton")
    monkeypatch.setenv("VR1FAST_HEAD", "fused")
    x, w, idx = _inputs(6, 16, 70, torch.float32, seed=9)
    torch.testing.assert_close(kernels.linear_logprobs(x, w, idx), reference.linear_logprobs(x, w, idx))


def _grpo_batch(seed: int, with_ref: bool, with_old: bool):
    """B=3 rows (full, partial, fully masked), T=7, H=24, V=200; old log-probs shifted per row so ratios clip."""
    g = torch.Generator().manual_seed(seed)
    b, t, h, v = 3, 7, 24, 200
    hidden = torch.randn(b, t, h, generator=g)
    weight = torch.randn(v, h, generator=g) * 0.3
    idx = torch.randint(0, v, (b, t), generator=g)
    mask = torch.tensor([[1] * 7, [1, 1, 1, 1, 0, 0, 0], [0] * 7])
    adv = torch.tensor([0.9, -1.3, 0.4])
    with torch.no_grad():
        logp = reference.linear_logprobs(hidden, weight, idx, T_ODD)
    ref = logp + 0.5 * torch.randn(b, t, generator=g) if with_ref else None
    old = logp + torch.tensor([[-0.35], [0.3], [0.1]]) + 0.2 * torch.randn(b, t, generator=g) if with_old else None
    return hidden, weight, idx, mask, adv, ref, old


def _loss_and_grads(fn, batch, dtype, **cfg):
    hidden, weight, idx, mask, adv, ref, old = batch
    h = hidden.detach().to(dtype).requires_grad_()
    w = weight.detach().to(dtype).requires_grad_()
    loss, metrics = fn(h, w, idx, mask, adv, ref, old, **cfg)
    loss.backward()
    return loss.double(), {k: v.double() for k, v in metrics.items()}, h.grad.double(), w.grad.double()


def _chunked_loss(*args, **cfg):
    """The chunked head in chunks of 4 rows: every batch below crosses several chunks."""
    from vr1fast.kernels import chunked

    return chunked.linear_grpo_loss(*args, rows=4, **cfg)


@pytest.mark.parametrize("with_old", [False, True])
@pytest.mark.parametrize("with_ref", [False, True])
@pytest.mark.parametrize("level", reference.IS_LEVELS)
@pytest.mark.parametrize("loss_type", reference.LOSS_TYPES)
@pytest.mark.parametrize("head", ["fused", "chunked"])
def test_grpo_loss_matches_float64(head, loss_type, level, with_ref, with_old):
    batch = _grpo_batch(10, with_ref, with_old)
    cfg = dict(loss_type=loss_type, importance_sampling_level=level, beta=0.04 if with_ref else 0.0,
               epsilon_high=0.28, delta=1.25 if with_old else None, temperature=T_ODD, max_completion_length=9)
    fn = fused.linear_grpo_loss if head == "fused" else _chunked_loss
    loss, metrics, dh, dw = _loss_and_grads(fn, batch, torch.float32, **cfg)
    loss64, metrics64, dh64, dw64 = _loss_and_grads(reference.linear_grpo_loss, batch, torch.float64, **cfg)
    torch.testing.assert_close(loss, loss64, rtol=1e-5, atol=1e-7)
    assert metrics.keys() == metrics64.keys()
    for k in metrics:
        torch.testing.assert_close(metrics[k], metrics64[k], rtol=1e-5, atol=1e-7)
    assert dh[2].abs().max() == 0 and dh[1, 4:].abs().max() == 0  # masked rows get no gradient
    torch.testing.assert_close(dh, dh64, rtol=1e-4, atol=1e-5 * dh64.abs().max().item())
    torch.testing.assert_close(dw, dw64, rtol=1e-4, atol=1e-5 * dw64.abs().max().item())
    if with_old:
        assert metrics["clip_region"] > 0  # the case exercises clipping


def test_grpo_loss_bf16_video_r1_defaults():
    batch = _grpo_batch(11, with_ref=True, with_old=False)
    cfg = dict(temperature=1.0)
    ours = _loss_and_grads(fused.linear_grpo_loss, batch, torch.bfloat16, **cfg)
    exact = _loss_and_grads(reference.linear_grpo_loss, batch, torch.float64, **cfg)
    torch_bf16 = _loss_and_grads(reference.linear_grpo_loss, batch, torch.bfloat16, **cfg)
    for i in (0, 2, 3):
        err, torch_err = ((r[i] - exact[i]).abs().max().item() for r in (ours, torch_bf16))
        assert err <= 2 * torch_err + 1e-6, (i, err, torch_err)
    torch.testing.assert_close(ours[0], exact[0], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("with_old", [False, True])
@pytest.mark.parametrize("loss_type", reference.LOSS_TYPES)
def test_parity_with_liger(loss_type, with_old):
    """liger's LigerFusedLinearGRPOLoss (TRL's maths; unclamped k3 → kl_clamp=None) on the same inputs."""
    from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

    hidden, weight, idx, mask, adv, ref, old = _grpo_batch(12, with_ref=True, with_old=with_old)
    cfg = dict(beta=0.04, epsilon_low=0.2, epsilon_high=0.28, loss_type=loss_type, max_completion_length=9,
               temperature=T_ODD)
    results = []
    for run in ("liger", "ours"):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        if run == "liger":
            liger = LigerFusedLinearGRPOLoss(compiled=False, use_ref_model=True, **cfg)
            loss, (kl, clip) = liger(h, w, idx, mask, adv, ref_per_token_logps=ref, old_per_token_logps=old)
        else:
            loss, metrics = fused.linear_grpo_loss(h, w, idx, mask, adv, ref, old, kl_clamp=None, **cfg)
            kl, clip = metrics["kl"], metrics["clip_region"]
        results.append((loss, kl, clip, *torch.autograd.grad(loss, (h, w))))
    for want, got in zip(*results):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_sm90_aot_compile_of_every_variant():
    """Both kernels × every tile config × every dtype × entropy on/off the launchers can pick, compiled for sm_90 at
    the Qwen-7B head shape (as the JIT specialises it): a cubin each, inside the 227 KB of shared memory, with
    pipelined loads and no register spills (the forward's 128×256 tile spilled 117 registers: it is gone)."""
    compiled = aot_check("vr1fast.kernels.linear_logprob")
    names = {torch.float32: "*fp32", torch.bfloat16: "*bf16", torch.float16: "*fp16"}
    expected = {(k, names[d], c.kwargs["BLOCK_N"], e) for k, kind in (("_fwd_kernel", "fwd"), ("_dlogits_kernel",
                "dlogits")) for d in fused.DTYPES for c in fused.tiles(kind, d) for e in (False, True)}
    got = {(c["kernel"], c["signature"]["x_ptr"], c["constexprs"]["BLOCK_N"], c["constexprs"]["ENTROPY"])
           for c in compiled}
    assert got == expected and len(compiled) == len(expected)
    for c in compiled:
        assert c["cubin"] > 0 and 0 < c["shared"] <= 227 * 1024 and c["async_copies"] > 0, c
        assert c["local"] == 0 and c["registers"] <= 255, c


@pytest.mark.parametrize("vocab_chunk", [None, 150])
def test_poisoned_buffers_one_thread_bf16(vocab_chunk):
    """Regression: the backward's dz buffer was wider than the columns written (≥ SPLIT_V at V=200) and the GEMMs got
    a strided view of it; with one intra-op thread oneDNN's bf16 GEMM read the unwritten padding (NaN·0 = NaN in
    dX). Every fresh buffer starts as NaN here, so any read of an unwritten element shows up."""
    from poison import poisoned

    batch = _grpo_batch(11, with_ref=True, with_old=False)
    with poisoned(threads=1):
        hidden, weight, idx, mask, adv, ref, _ = batch
        h = hidden.to(torch.bfloat16).requires_grad_()
        w = weight.to(torch.bfloat16).requires_grad_()
        logp = fused.linear_logprobs(h, w, idx, vocab_chunk=vocab_chunk)
        loss, _ = reference.grpo_loss_from_logprobs(logp, mask, adv, ref)
        loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(h.grad).all() and torch.isfinite(w.grad).all()
    exact = _loss_and_grads(reference.linear_grpo_loss, batch, torch.float64)
    torch.testing.assert_close(h.grad.double(), exact[2], rtol=4e-2, atol=2e-3)


def test_entropy_only_when_asked_for():
    """Without return_entropy the second output is empty and the backward applies no entropy term: same dX/dW as
    the float64 reference of the log-probs alone."""
    x, w, idx = _inputs(19, 24, 130, torch.float32, seed=20)
    h, wt = x.clone().requires_grad_(), w.clone().requires_grad_()
    logp, ent = fused.LinearLogprob.apply(h, wt, idx, 1.0, None, False)
    assert ent.numel() == 0 and not ent.requires_grad
    g = torch.randn(19, generator=torch.Generator().manual_seed(21))
    (logp * g).sum().backward()
    hd, wd = x.double().requires_grad_(), w.double().requires_grad_()
    (reference.linear_logprobs(hd, wd, idx) * g.double()).sum().backward()
    torch.testing.assert_close(h.grad.double(), hd.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(wt.grad.double(), wd.grad, rtol=1e-4, atol=1e-6)


def test_fp32_inputs_under_cpu_autocast_run_the_bf16_head():
    """fp32 master weights under bf16 autocast (one GPU / DDP): the head runs on bf16 copies
    (docs/kernel-audit.md F1), as cuBLAS calls under autocast would, and the gradients come back in fp32."""
    x, w, idx = _inputs(17, 24, 130, torch.float32, seed=22)
    h, wt = x.clone().requires_grad_(), w.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logp = fused.linear_logprobs(h, wt, idx)
    logp.sum().backward()
    want = fused.linear_logprobs(x.bfloat16(), w.bfloat16(), idx)
    assert torch.equal(logp, want)
    assert not torch.equal(logp, fused.linear_logprobs(x, w, idx))  # the fp32 path differs: the cast happened
    assert h.grad.dtype == wt.grad.dtype == torch.float32
