"""LM head + log-probs / GRPO loss by chunks of token rows: cuBLAS logits, the Triton loss kernels, cuBLAS grads.

Maths as ``linear_logprob.py`` (one token: hidden x [H], head W [V, H], target y, temperature T, z = W x,
s = z / T, ℓ = s_y − lse(s)); loss and cfg keys as ``reference.grpo_loss_from_logprobs``. Matches
``reference.linear_logprobs`` / ``reference.linear_grpo_loss`` (the float64 references of the tests).

Design (docs/kernel-audit.md F2: the recompute design does 8NHV where 6NHV is useful, so it cannot pass 75% of the
cuBLAS rate; Liger's chunked loss and FLCE compute the gradient in the forward instead). For each chunk of C rows:
  1. logits = X_c Wᵀ on cuBLAS with fp32 output [C, V] (exact products of the 16-bit operands, fp32 sums; the
     logits are never rounded to 16 bits, unlike torch eager / liger, so log-probs are fp32-exact);
  2. the GRPO loss kernel (``grpo._grpo_fwd_kernel``, token level) reads each row once for lse and ℓ and writes
     the token's loss and c_t·dL/dℓ (the aggregation weights c_t of the whole batch, so chunks are independent);
  3. the log-prob backward kernel (``logprob``) writes dz = c_t·dL/dℓ·(1[v=y] − p)/T into a dense [C, V] buffer
     in the compute dtype (rows with no gradient — padding — write zeros without reading);
  4. cuBLAS dX_c = dz W (complete for these rows: one GEMM with fp32 output into an fp32 dX) and dW += dzᵀ X_c
     into an fp32 accumulator (``_gemm.addmm_``; the first chunk's product starts it).
The backward of the loss only scales the saved fp32 dX, dW by dLoss (Liger's scheme) and rounds each once to the
inputs' dtypes: 6NHV in all, every FLOP on cuBLAS, plus three memory-bound passes over each logits chunk. Memory:
inputs + fp32 dX + the fp32 dW accumulator + one chunk (C·V·(4 + 2) bytes; C = ``chunk_rows``, 512 at Qwen's V);
the accumulator is narrowed to W's dtype in its own storage (``_narrow_in_place``), so no second V×H buffer is
allocated (the narrowed gradient keeps the fp32-sized storage until it is freed).

Sequence-level importance sampling (GSPO) needs a sequence's mean log-ratio before any of its tokens' gradients,
so it runs as log-probs (``linear_logprobs`` below) + ``reference.grpo_loss_from_logprobs`` with autograd; that
backward recomputes the logits chunk by chunk (8NHV), as does any backward through ``linear_logprobs``.
fp16 inputs run every GEMM on fp32 operands (dz ~ g·p ~ 1e-10 underflows fp16). Under autocast the head computes
on copies of hidden and weight in its dtype, made inside the autograd Functions, so the gradients come back in the
inputs' own dtypes without a 16-bit rounding: dX of fp32 hidden states from an fp32-output GEMM, dW of fp32 master
weights straight from the fp32 accumulator.

Shapes: hidden [..., H] (padded [B, T, H] or packed [N, H] with ``offsets``), weight [V, H], index [...] ints in
[0, V) → fp32 log-probs [...]; GRPO: mask / ref / old like index, advantages [B] → (loss fp32 0-dim, metrics).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from vr1fast.kernels import _gemm, grpo, logprob, reference
from vr1fast.kernels._triton import Launch, autocast_dtype, check_device, check_head
from vr1fast.kernels.linear_logprob import DTYPES

# Logits per chunk: 551 → 512 rows at V = 152064 (fp32 logits 0.31 GB + bf16 dz 0.16 GB; peak ≈ 1.16 × the bar
# at N = 8192). Each chunk's dW update reads and writes the fp32 accumulator (8·V·H bytes for 2·C·V·H FLOPs:
# 128 FLOP/B at C = 512, under an H100/H200's ~170 ridge), so larger chunks trade memory for speed; benchmarks/
# decides.
CHUNK_ELEMENTS = 5 << 24


def chunk_rows(v: int, rows: Optional[int] = None) -> int:
    """Token rows per chunk: ``rows`` if given, else CHUNK_ELEMENTS // V rounded down to a multiple of 64."""
    if rows is not None:
        return max(1, rows)
    r = max(1, CHUNK_ELEMENTS // v)
    return r // 64 * 64 if r >= 64 else r


def _chunks(n: int, rows: int):
    """Row slices of ``rows`` rows (the last one shorter) covering [0, n)."""
    return (slice(r0, min(r0 + rows, n)) for r0 in range(0, n, rows))


def _gemm_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype == torch.float16 else dtype


def _logits(x_c: Tensor, w: Tensor) -> Tensor:
    """[C, V] fp32 logits X_c Wᵀ with fp32 accumulation (16-bit operands multiplied exactly)."""
    return _gemm.mm(x_c, w.t(), torch.float32)


def _grads(dz: Tensor, x_c: Tensor, w: Tensor, dx: Optional[Tensor], rows: slice, dw: Optional[Tensor],
           need_dw: bool) -> Optional[Tensor]:
    """dX[rows] = dz W into the fp32 ``dx`` (complete for these rows: fp32 output, never a 16-bit GEMM output,
    which cuBLAS may reduce in 16 bits); returns dW + dzᵀ X_c in fp32 (the first chunk's product when ``dw`` is
    None: no zero-filled accumulator)."""
    if dx is not None:
        dx[rows] = _gemm.mm(dz, w, torch.float32)
    if not need_dw:
        return None
    return _gemm.mm(dz.t(), x_c, torch.float32) if dw is None else _gemm.addmm_(dw, dz.t(), x_c)


def _narrow_in_place(acc: Tensor, dtype: torch.dtype) -> Tensor:
    """The fp32 accumulator [V, H] converted to ``dtype`` (16-bit) inside its own storage: row block [a, 2a)
    is written over bytes that rows < a held, which are already converted, so no second V×H buffer exists."""
    if acc.dtype == dtype:
        return acc
    v, h = acc.shape
    out = acc.reshape(-1).view(dtype)[:v * h].view(v, h)
    out[:1] = acc[:1].to(dtype)  # row 0's target overlaps its source: through a temporary
    a = 1
    while a < v:
        b = min(2 * a, v)
        out[a:b].copy_(acc[a:b])
        a = b
    return out


def _autocast_off(fn):
    """Run ``fn`` with autocast off on every device: the head picks its own GEMM dtypes (under CPU autocast
    ``torch.mm`` of fp32 operands would return bf16 and round the logits)."""
    def run(*args):
        with torch.autocast("cpu", enabled=False), torch.autocast("cuda", enabled=False):
            return fn(*args)
    return run


def _new_dx(x: Tensor, need_dx: bool) -> Optional[Tensor]:
    """The fp32 dX buffer [N, H] (cast to x's dtype once, at the end)."""
    return torch.empty(x.shape, device=x.device, dtype=torch.float32) if need_dx else None


def _finish(dx: Optional[Tensor], dw: Optional[Tensor], x_dtype: torch.dtype, w_dtype: torch.dtype):
    """fp32 dX, dW → the inputs' dtypes, each rounded once (dW inside its own storage)."""
    return (None if dx is None else dx.to(x_dtype)), (None if dw is None else _narrow_in_place(dw, w_dtype))


class _Logprob(torch.autograd.Function):
    """(x [N, H], w [V, H], idx [N], T, rows, entropy, compute dtype) → (logp [N], entropy [N] or [0]) fp32."""

    @staticmethod
    @_autocast_off
    def forward(ctx, x, w, idx, temperature, rows, entropy, dtype):
        xc, wc = x.to(dtype), w.to(dtype)
        n = x.shape[0]
        out = torch.empty(3, n, device=x.device, dtype=torch.float32)
        for r in _chunks(n, rows):
            launch = logprob.forward_launch(_logits(xc[r], wc), idx[r], temperature, entropy)
            launch()
            out[0, r], out[1, r] = launch.args["logp"], launch.args["lse"]
            if entropy:
                out[2, r] = launch.args["entropy"]
        ent = out[2] if entropy else out.new_empty(0)
        ctx.save_for_backward(x, w, idx, out[1], ent)
        ctx.temperature, ctx.rows, ctx.dtype = temperature, rows, dtype
        ctx.set_materialize_grads(False)
        if not entropy:
            ctx.mark_non_differentiable(ent)
        return out[0], ent

    @staticmethod
    @torch.autograd.function.once_differentiable
    @_autocast_off
    def backward(ctx, g_logp, g_ent):
        x, w, idx, lse, ent = ctx.saved_tensors
        xc, wc, n = x.to(ctx.dtype), w.to(ctx.dtype), x.shape[0]
        g_logp = torch.zeros_like(lse) if g_logp is None else g_logp.float().contiguous()
        g_ent = None if g_ent is None or ent.numel() == 0 else g_ent.float().contiguous()
        dx, dw = _new_dx(x, ctx.needs_input_grad[0]), None
        for r in _chunks(n, ctx.rows):
            logits = _logits(xc[r], wc)
            dz = torch.empty(logits.shape, device=x.device, dtype=ctx.dtype)
            logprob.backward_launch(dz, logits, idx[r], lse[r], g_logp[r], ctx.temperature,
                                    None if g_ent is None else ent[r], None if g_ent is None else g_ent[r])()
            del logits
            dw = _grads(dz, xc[r], wc, dx, r, dw, ctx.needs_input_grad[1])
        return (*_finish(dx, dw, x.dtype, w.dtype), None, None, None, None, None)


class _TokenGrpo(torch.autograd.Function):
    """Token-level GRPO through the head, gradients computed in the forward: (x [N, H], w [V, H], idx [N], per-token
    m, c_t, advantage, ref, old [N]) → (loss, stats [4] = Σ kl·m, w·m, clip_low, clip_high). The fp32 dX, dW are
    saved and scaled by dLoss in place in the backward, so one backward per forward (``retain_graph`` and double
    backward raise)."""

    @staticmethod
    @_autocast_off
    def forward(ctx, x, w, idx, m, c, adv, ref, old, cfg, rows, dtype, need_dx, need_dw):
        xc, wc, n = x.to(dtype), w.to(dtype), x.shape[0]
        dx, dw = _new_dx(x, need_dx), None
        loss, stats = torch.zeros((), device=x.device), torch.zeros(4, device=x.device)
        for r in _chunks(n, rows):
            logits = _logits(xc[r], wc)
            col = (lambda t: None if t is None else t[r].unsqueeze(1))  # [C, 1]: advantage per row (T = 1)
            fwd = grpo.forward_launch(logits.unsqueeze(1), col(idx), col(m), adv[r], col(ref), col(old), cfg,
                                      weights=c[r])
            fwd()
            loss += fwd.args["wloss"].sum()
            stats += fwd.args["stats"].sum(1)
            if need_dx or need_dw:
                dz = torch.empty(logits.shape, device=x.device, dtype=dtype)
                logprob.backward_launch(dz, logits, idx[r], fwd.args["lse"], fwd.args["dlogp"], cfg["temperature"])()
                del logits
                dw = _grads(dz, xc[r], wc, dx, r, dw, need_dw)
        ctx.save_for_backward(dx, dw)
        ctx.dtypes = x.dtype, w.dtype
        ctx.mark_non_differentiable(stats)
        return loss, stats

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dloss, _dstats):
        dx, dw = ctx.saved_tensors  # fp32, scaled in place (a second V×H buffer would break the memory bound)
        dx, dw = (None if g is None else g.mul_(dloss.float()) for g in (dx, dw))
        return (*_finish(dx, dw, *ctx.dtypes), *([None] * 11))


def _flat(hidden: Tensor, weight: Tensor, index: Tensor, temperature: float):
    """(x [N, H], w [V, H] with unit last strides, the GEMM dtype): the active autocast dtype (the Functions cast
    their inputs to it) or the inputs' own."""
    cast = autocast_dtype(hidden.device)
    check_head(hidden, weight, index, temperature, DTYPES, cast=cast is not None)
    x = hidden.reshape(-1, hidden.shape[-1])
    w = weight if weight.stride(-1) == 1 else weight.contiguous()
    return (x if x.stride(-1) == 1 else x.contiguous()), w, _gemm_dtype(cast or x.dtype)


def linear_logprobs(hidden: Tensor, weight: Tensor, index: Tensor, temperature: float = 1.0,
                    return_entropy: bool = False, *, rows: Optional[int] = None):
    """Log-probs (and entropy) of ``index`` under softmax(hidden @ weight.T / T), one chunk of logits at a time.

    hidden [..., H], weight [V, H], index [...] → fp32 log-probs [...] (and entropy [...]); differentiable w.r.t.
    hidden and weight (the backward recomputes each chunk's logits). ``rows``: rows per chunk (``chunk_rows``).
    """
    x, w, dtype = _flat(hidden, weight, index, temperature)
    logp, ent = _Logprob.apply(x, w, index.reshape(-1).long(), float(temperature), chunk_rows(w.shape[0], rows),
                               return_entropy, dtype)
    if not return_entropy:
        return logp.reshape(index.shape)
    return logp.reshape(index.shape), ent.reshape(index.shape)


def linear_grpo_loss(hidden: Tensor, weight: Tensor, index: Tensor, mask: Optional[Tensor], advantages: Tensor,
                     ref_logprobs: Optional[Tensor] = None, old_logprobs: Optional[Tensor] = None, *,
                     offsets: Optional[Tensor] = None, rows: Optional[int] = None,
                     **cfg) -> tuple[Tensor, dict[str, Tensor]]:
    """GRPO loss on hidden [B, T, H] (or packed [N, H] with ``offsets``) through the head weight [V, H] →
    (loss, metrics); same contract as ``reference.linear_grpo_loss``. ``rows``: rows per chunk."""
    cfg = reference.resolve_cfg(cfg)
    if cfg["importance_sampling_level"] == "sequence":
        logp = linear_logprobs(hidden, weight, index, cfg["temperature"], rows=rows)
        return reference.grpo_loss_from_logprobs(logp, mask, advantages, ref_logprobs, old_logprobs,
                                                 offsets=offsets, **cfg)
    if offsets is None:
        reference.check_loss_shapes(index, mask, advantages, ref_logprobs, old_logprobs)
    else:
        offsets = reference.check_offsets(offsets, index.numel(), advantages.shape[0])
    if cfg["beta"] != 0 and ref_logprobs is None:
        raise ValueError("grpo_loss: beta != 0 needs ref_logprobs")
    x, w, dtype = _flat(hidden, weight, index, cfg["temperature"])
    check_device("linear_grpo_loss", *(t for t in (x, advantages, mask, ref_logprobs, old_logprobs) if t is not None))
    m, c, adv = reference.token_rows(mask, advantages, cfg, x.shape[0], offsets)
    flat = (lambda t: None if t is None else t.reshape(-1).float().contiguous())
    need_dx, need_dw = (torch.is_grad_enabled() and t.requires_grad for t in (x, w))
    loss, stats = _TokenGrpo.apply(x, w, index.reshape(-1).long().contiguous(), m, c, adv, flat(ref_logprobs),
                                   flat(old_logprobs), cfg, chunk_rows(w.shape[0], rows), dtype,
                                   need_dx, need_dw)
    metrics = dict(zip(grpo.STATS, stats / m.sum().clamp(min=1)))
    metrics["clip_region"] = metrics["clip_low"] + metrics["clip_high"]
    if ref_logprobs is None:
        del metrics["kl"]
    return loss, metrics


def aot_variants() -> list[Launch]:
    """The launches this head makes at the Qwen-7B shape (one chunk of fp32 logits, bf16 dz): the GRPO forward in
    the Video-R1 setting and the log-prob forward / backward, with and without entropy."""
    v = 152064
    rows = chunk_rows(v)
    logits = torch.empty(rows, 1, v, device="meta")
    idx = torch.empty(rows, 1, device="meta", dtype=torch.long)
    per_row = torch.empty(rows, device="meta")
    cfg = reference.resolve_cfg({})
    out = [grpo.forward_launch(logits, idx, per_row, per_row, per_row, None, cfg, weights=per_row)]
    dz = torch.empty(rows, v, device="meta", dtype=torch.bfloat16)
    for entropy in (False, True):
        fwd = logprob.forward_launch(logits[:, 0], idx[:, 0], 1.0, entropy)
        a = fwd.args
        out += [fwd, logprob.backward_launch(dz, logits[:, 0], idx[:, 0], a["lse"], a["logp"], 1.0,
                                             a["entropy"] if entropy else None, a["logp"] if entropy else None)]
    return out
