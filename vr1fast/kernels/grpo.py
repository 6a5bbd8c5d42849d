"""Triton GRPO loss on materialised logits, forward and backward; matches ``reference.grpo_loss``.

Per token (s = z / T, ℓ = s_y - lse(s), A the row's advantage; maths and cfg keys in ``reference.py``):
    w = exp(ℓ - ℓ_old) (1 on-policy: ℓ_old = sg ℓ),  w1 = min(w, δ),  w2 = clamp(w, 1-ε_low, 1+ε_high)
    L = -min(w1·A, w2·A) + β·k3(clamp(ℓ_ref - ℓ, ±c))
    dL/dℓ = -A·w·(1[w ≤ δ] if branch 1 is the min, else 1[w in bounds]) (ties: half each, as torch.minimum)
            + β·(1 - e^x)·1[|ℓ_ref - ℓ| ≤ c]
The loss is Σ_t c_t·L_t with the aggregation weight c_t of the loss type (``reference.token_weights``: grpo
m/(B·max(n_i,1)), bnpo m/max(Σm,1), dr_grpo m/(B·max_completion_length), dapo m/num_items), so
dLoss/dℓ_t = c_t·dL/dℓ_t.

Token level: one fused forward pass over the logits per token computes lse, ℓ, L, c_t·dL/dℓ and the metric terms;
masked tokens read no logits. Sequence level (GSPO) needs the row's mean log-ratio before any token's loss, so
its forward is the log-prob kernel followed by the reference maths on the [B, T] log-probs (O(B·T), autograd gives
dLoss/dℓ). Backward (both levels): one pass per row writes dz = dLoss/dℓ·(1[v=y] - p)/T, in place over the logits
when they (or the tensor they view) are an autograd intermediate (Liger's ``inplace``; their version counter is
bumped, so any other use of them in backward fails loudly instead of reading gradients), else into a new tensor.
Grid: 1-D over tokens (``logprob.grid``). Shapes: logits [B, T, V] (bf16/fp16/fp32, unit vocab stride),
index / mask / ref / old [B, T], advantages [B]. Returns (loss fp32 0-dim, metrics dict of fp32 0-dim tensors).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from vr1fast.kernels import logprob, reference
from vr1fast.kernels._triton import Launch, check_device
from vr1fast.kernels.logprob import row_pointers, rows_lse

STATS = ("kl", "ratio", "clip_low", "clip_high")  # rows of the per-token metric buffer [4, N]


@triton.jit
def _grpo_fwd_kernel(logits, index, weight, mask, adv, ref, old, wloss, dlogp, lse, stats,
                     N, T, stride_b, stride_t, V, inv_temp, beta, lo, hi, delta, kl_clamp,
                     BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, HAS_REF: tl.constexpr, HAS_OLD: tl.constexpr,
                     HAS_DELTA: tl.constexpr, CLAMP_KL: tl.constexpr, USE_KL: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    in_range = rows < N
    m = tl.load(mask + rows, mask=in_range, other=0.0)
    live = in_range & (m != 0.0)
    base = row_pointers(logits, rows, T, stride_b, stride_t)
    log_z, _ = rows_lse(base, live, V, inv_temp, BLOCK_N, BLOCK_V, False)
    y = tl.load(index + rows, mask=live, other=0)
    z_y = tl.load(base + y, mask=live, other=0.0).to(tl.float32) * inv_temp
    log_z = tl.where(live, log_z, 0.0)
    lp = tl.where(live, z_y - log_z, 0.0)
    a = tl.load(adv + rows // T, mask=live, other=0.0)
    w = tl.full((BLOCK_N,), 1.0, tl.float32)
    if HAS_OLD:
        w = tl.exp(lp - tl.load(old + rows, mask=live, other=0.0))
    g1 = -a * w
    w1 = w
    if HAS_DELTA:
        w1 = tl.minimum(w, delta)
        g1 = tl.where(w <= delta, g1, 0.0)
    w2 = tl.minimum(tl.maximum(w, lo), hi)
    g2 = tl.where((w >= lo) & (w <= hi), -a * w, 0.0)
    u1 = w1 * a
    u2 = w2 * a
    loss = -tl.minimum(u1, u2)
    g = tl.where(u1 < u2, g1, tl.where(u2 < u1, g2, 0.5 * (g1 + g2)))
    kl = tl.zeros((BLOCK_N,), tl.float32)
    if HAS_REF:
        x = tl.load(ref + rows, mask=live, other=0.0) - lp
        live_x = tl.full((BLOCK_N,), 1.0, tl.float32)
        if CLAMP_KL:
            live_x = tl.where((x >= -kl_clamp) & (x <= kl_clamp), 1.0, 0.0)
            x = tl.minimum(tl.maximum(x, -kl_clamp), kl_clamp)
        ex = tl.exp(x)
        kl = ex - x - 1.0
        if USE_KL:
            loss += beta * kl
            g += beta * (1.0 - ex) * live_x
    c = tl.load(weight + rows, mask=live, other=0.0)
    tl.store(wloss + rows, tl.where(live, c * loss, 0.0), mask=in_range)
    tl.store(dlogp + rows, tl.where(live, c * g, 0.0), mask=in_range)
    tl.store(lse + rows, log_z, mask=in_range)
    tl.store(stats + rows, tl.where(live, kl * m, 0.0), mask=in_range)
    tl.store(stats + N + rows, tl.where(live, w * m, 0.0), mask=in_range)
    tl.store(stats + 2 * N + rows, tl.where(live & (w < lo) & (a < 0.0), m, 0.0), mask=in_range)
    tl.store(stats + 3 * N + rows, tl.where(live & (w > hi) & (a > 0.0), m, 0.0), mask=in_range)


def forward_launch(logits: Tensor, index: Tensor, mask: Tensor, advantages: Tensor, ref: Optional[Tensor],
                   old: Optional[Tensor], cfg: dict, weights: Optional[Tensor] = None) -> Launch:
    """Token-level forward: fills args wloss (c_t·L_t), dlogp (c_t·dL/dℓ_t), lse [N] and stats [4, N].

    ``weights``: the aggregation weights c_t (default ``reference.token_weights(mask, cfg)``); a caller that
    launches on a slice of the batch passes the slice of the whole batch's weights (bnpo, dapo and grpo normalise
    over tokens outside the slice)."""
    x3, T, sb, st = logprob.as_rows(logits)
    n, dev = index.numel(), logits.device
    m = mask.to(device=dev, dtype=torch.float32)
    out = torch.empty(3, n, device=dev, dtype=torch.float32)
    has_ref, has_old = ref is not None, old is not None

    def flat(t: Tensor) -> Tensor:
        return t.reshape(-1).to(device=dev, dtype=torch.float32).contiguous()

    c = reference.token_weights(m, cfg) if weights is None else weights.to(device=dev, dtype=torch.float32)
    args = dict(logits=x3, index=index.reshape(-1).long().contiguous(), weight=c.reshape(-1).contiguous(),
                mask=m.reshape(-1).contiguous(), adv=advantages.to(device=dev, dtype=torch.float32).contiguous(),
                ref=flat(ref) if has_ref else out[0], old=flat(old) if has_old else out[0], wloss=out[0],
                dlogp=out[1], lse=out[2], stats=torch.empty(4, n, device=dev, dtype=torch.float32), N=n, T=T,
                stride_b=sb, stride_t=st, V=logits.shape[-1], inv_temp=1.0 / cfg["temperature"],
                beta=float(cfg["beta"]), lo=1.0 - cfg["epsilon_low"], hi=1.0 + cfg["epsilon_high"],
                delta=float(cfg["delta"] or 0.0), kl_clamp=float(cfg["kl_clamp"] or 0.0))
    flags = dict(HAS_REF=has_ref, HAS_OLD=has_old, HAS_DELTA=cfg["delta"] is not None,
                 CLAMP_KL=has_ref and cfg["kl_clamp"] is not None, USE_KL=has_ref and cfg["beta"] != 0)
    b = logprob.blocks(logits.shape[-1])
    return Launch(_grpo_fwd_kernel, logprob.grid(n, b), args, dict(**b, **flags), num_warps=8, num_stages=2)


def _token_forward(logits, index, mask, advantages, ref, old, cfg):
    launch = forward_launch(logits, index, mask, advantages, ref, old, cfg)
    launch()
    a = launch.args
    stats = a["stats"].sum(1) / a["mask"].sum().clamp(min=1)
    return a["wloss"].sum(), stats, a["lse"], a["dlogp"]


def _sequence_forward(logits, index, mask, advantages, ref, old, cfg):
    fwd = logprob.forward_launch(logits, index.masked_fill(mask == 0, 0), cfg["temperature"], False)
    fwd()
    with torch.enable_grad():
        lp = fwd.args["logp"].reshape(index.shape).requires_grad_()
        loss, metrics = reference.grpo_loss_from_logprobs(lp, mask, advantages, ref, old, **cfg)
        (dlogp,) = torch.autograd.grad(loss, lp)
    kl = metrics.get("kl", torch.zeros_like(loss))
    stats = torch.stack([kl, metrics["ratio"], metrics["clip_low"], metrics["clip_high"]])
    return loss.detach(), stats, fwd.args["lse"], dlogp.reshape(-1)


class _GrpoLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, index, mask, advantages, ref, old, cfg):
        level_forward = _token_forward if cfg["importance_sampling_level"] == "token" else _sequence_forward
        loss, stats, lse, dlogp = level_forward(logits, index, mask, advantages, ref, old, cfg)
        ctx.save_for_backward(logits, index, lse, dlogp)
        ctx.temperature = cfg["temperature"]
        root = logits if logits._base is None else logits._base  # a view of a leaf must not be overwritten
        ctx.inplace = not root.is_leaf and logits.stride(-1) == 1
        ctx.mark_non_differentiable(stats)
        return loss, stats

    @staticmethod
    def backward(ctx, dloss, _dstats):
        logits, index, lse, dlogp = ctx.saved_tensors
        dlogits = logits if ctx.inplace else torch.empty(logits.shape, device=logits.device, dtype=logits.dtype)
        logprob.backward_launch(dlogits, logits, index, lse, dlogp * dloss, ctx.temperature)()
        if ctx.inplace:
            torch.autograd.graph.increment_version(logits)
        return dlogits, None, None, None, None, None, None


def grpo_loss(logits: Tensor, index: Tensor, mask: Tensor, advantages: Tensor,
              ref_logprobs: Optional[Tensor] = None, old_logprobs: Optional[Tensor] = None,
              **cfg) -> tuple[Tensor, dict[str, Tensor]]:
    """GRPO loss on logits [B, T, V] → (loss, metrics); same contract as ``reference.grpo_loss``."""
    cfg = reference.resolve_cfg(cfg)
    if logits.dim() != 3:
        raise ValueError(f"grpo_loss: logits must be [B, T, V], got {tuple(logits.shape)}")
    reference.check_loss_shapes(index, mask, advantages, ref_logprobs, old_logprobs)
    if logits.shape[:2] != index.shape:
        raise ValueError(f"grpo_loss: index shape {tuple(index.shape)} does not match logits {tuple(logits.shape)}")
    if cfg["beta"] != 0 and ref_logprobs is None:
        raise ValueError("grpo_loss: beta != 0 needs ref_logprobs")
    tensors = [t for t in (logits, index, mask, advantages, ref_logprobs, old_logprobs) if t is not None]
    check_device("grpo_loss", *tensors)
    loss, stats = _GrpoLoss.apply(logits, index, mask, advantages, ref_logprobs, old_logprobs, cfg)
    metrics = dict(zip(STATS, stats))
    metrics["clip_region"] = metrics["clip_low"] + metrics["clip_high"]
    if ref_logprobs is None:
        del metrics["kl"]
    return loss, metrics


def aot_variants() -> list[Launch]:
    """Every flag combination of the forward (tile shapes and dtypes on the Video-R1 one), for the AOT test."""
    x = torch.empty(2, 3, 152064, device="meta", dtype=torch.bfloat16)
    idx = torch.empty(2, 3, device="meta", dtype=torch.long)
    lp, adv = torch.empty(2, 3, device="meta"), torch.empty(2, device="meta")
    base = dict(reference.DEFAULTS, loss_type="bnpo")
    out = []
    for has_ref, beta, clamp in ((False, 0.0, None), (True, 0.0, 10.0), (True, 0.04, 10.0), (True, 0.04, None)):
        for old in (None, lp):
            for delta in (None, 1.5):
                cfg = dict(base, beta=beta, kl_clamp=clamp, delta=delta)
                out.append(forward_launch(x, idx, lp, adv, lp if has_ref else None, old, cfg))
    for dtype, V in ((torch.float32, 1000), (torch.float16, 8), (torch.bfloat16, 8)):
        x = torch.empty(2, 3, V, device="meta", dtype=dtype)
        out.append(forward_launch(x, idx, lp, adv, lp, None, base))
    return out
