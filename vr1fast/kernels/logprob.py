"""Triton log softmax + gather (+ entropy) on materialised logits; matches ``reference.selective_log_softmax``.

Per token row z [V] (bf16 / fp16 / fp32, math in fp32), s = z / T, target y:
    lse = log Σ_v e^{s_v}   (online over vocab tiles: running max m and Σ e^{s - m}, -inf identity)
    logp = s_y - lse        entropy H = lse - Σ_v p_v s_v       (p = softmax(s))
Backward (one pass over the row, recomputing p from the saved lse), with upstream g = dL/dlogp, g_H = dL/dH:
    dz_v = [ g·(1[v = y] - p_v) - g_H·p_v·(s_v - E_p[s]) ] / T,      E_p[s] = lse - H
Rows whose upstream gradients are both 0 (masked tokens) write zeros without reading their logits.

Grid: 1-D, one program per token row (Liger's (B, L) grid fails at L ≥ 65,536 on the CUDA y-dimension). Logits
may be any [..., V] view with a unit vocab stride; a [B, T, V] slice such as ``logits[:, :-1]`` is read in place
through its (batch, time) strides. Outputs are fp32 [...]. Indices must lie in [0, V).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from vr1fast.kernels._triton import Launch, check_device

MAX_BLOCK_V = 4096   # vocab tile
MAX_TILE = 4096      # rows per program = MAX_TILE // BLOCK_V (1 at a real vocab; many rows for a tiny one)


@triton.jit
def row_pointers(logits, rows, T, stride_b, stride_t):
    """Start of each token row of a (B', T', V) view with unit vocab stride; rows are int64."""
    return logits + (rows // T) * stride_b + (rows % T) * stride_t


@triton.jit
def rows_lse(base, live, V, inv_temp, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, ENTROPY: tl.constexpr):
    """Online log-sum-exp of s = z·inv_temp for BLOCK_N rows (dead rows: -inf); also E_p[s] when ENTROPY."""
    m = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    acc = tl.zeros((BLOCK_N,), tl.float32)
    acc_s = tl.zeros((BLOCK_N,), tl.float32)
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        ok = live[:, None] & (cols < V)[None, :]
        s = tl.load(base[:, None] + cols[None, :], mask=ok, other=float("-inf")).to(tl.float32) * inv_temp
        m_new = tl.maximum(m, tl.max(s, 1))
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        scale = tl.exp(m - shift)
        e = tl.exp(s - shift[:, None])
        acc = acc * scale + tl.sum(e, 1)
        if ENTROPY:
            acc_s = acc_s * scale + tl.sum(e * tl.where(ok, s, 0.0), 1)
        m = m_new
    acc = tl.where(live, acc, 1.0)
    return m + tl.log(acc), acc_s / acc


@triton.jit
def _logprob_fwd_kernel(logits, index, logp, lse, entropy, N, T, stride_b, stride_t, V, inv_temp,
                        BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, ENTROPY: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    live = rows < N
    base = row_pointers(logits, rows, T, stride_b, stride_t)
    log_z, mean_s = rows_lse(base, live, V, inv_temp, BLOCK_N, BLOCK_V, ENTROPY)
    y = tl.load(index + rows, mask=live, other=0)
    z_y = tl.load(base + y, mask=live, other=0.0).to(tl.float32) * inv_temp
    tl.store(logp + rows, z_y - log_z, mask=live)
    tl.store(lse + rows, log_z, mask=live)
    if ENTROPY:
        tl.store(entropy + rows, log_z - mean_s, mask=live)


@triton.jit
def logprob_bwd_tiles(dbase, base, y, log_z, g, g_h, mean_s, live, V, inv_temp,
                      BLOCK_V: tl.constexpr, ENTROPY: tl.constexpr):
    """Write dz = [g·(1[v=y] - p) - g_h·p·(s - mean_s)]·inv_temp for BLOCK_N rows; rows that are dead or have
    zero upstream gradient read no logits and get zeros."""
    active = live & (g != 0.0)
    if ENTROPY:
        active = live & ((g != 0.0) | (g_h != 0.0))
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        in_v = (cols < V)[None, :]
        ok = active[:, None] & in_v
        s = tl.load(base[:, None] + cols[None, :], mask=ok, other=float("-inf")).to(tl.float32) * inv_temp
        p = tl.exp(s - tl.where(active, log_z, 0.0)[:, None])
        d = g[:, None] * (tl.where(cols[None, :] == y[:, None], 1.0, 0.0) - p)
        if ENTROPY:
            d -= g_h[:, None] * p * (tl.where(ok, s, 0.0) - mean_s[:, None])
        d = tl.where(ok, d * inv_temp, 0.0)
        tl.store(dbase[:, None] + cols[None, :], d, mask=live[:, None] & in_v)


@triton.jit
def _logprob_bwd_kernel(dlogits, logits, index, lse, dlogp, entropy, dentropy, N, T, stride_b, stride_t,
                        dstride_b, dstride_t, V, inv_temp,
                        BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, ENTROPY: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    live = rows < N
    base = row_pointers(logits, rows, T, stride_b, stride_t)
    dbase = row_pointers(dlogits, rows, T, dstride_b, dstride_t)
    g = tl.load(dlogp + rows, mask=live, other=0.0)
    log_z = tl.load(lse + rows, mask=live, other=0.0)
    g_h = tl.load(dentropy + rows, mask=live, other=0.0)
    mean_s = log_z - tl.load(entropy + rows, mask=live, other=0.0)
    y = tl.load(index + rows, mask=live, other=0)
    logprob_bwd_tiles(dbase, base, y, log_z, g, g_h, mean_s, live, V, inv_temp, BLOCK_V, ENTROPY)


def as_rows(x: Tensor) -> tuple[Tensor, int, int, int]:
    """View [..., V] as (B', T', V) with unit vocab stride: (view, T', batch stride, time stride)."""
    if x.dim() < 2:
        raise ValueError(f"logits must be [..., V] with at least 2 dims, got {tuple(x.shape)}")
    if x.stride(-1) != 1:
        x = x.contiguous()
    x3 = x.unsqueeze(0) if x.dim() == 2 else x.reshape(-1, *x.shape[-2:])
    return x3, x3.shape[1], x3.stride(0), x3.stride(1)


def blocks(V: int) -> dict[str, int]:
    """BLOCK_V = the vocab tile, BLOCK_N = rows per program so that a tile holds ≤ MAX_TILE logits."""
    bv = min(triton.next_power_of_2(V), MAX_BLOCK_V)
    return dict(BLOCK_N=max(1, MAX_TILE // bv), BLOCK_V=bv)


def grid(n: int, blocks: dict[str, int]) -> tuple[int]:
    """1-D grid over token rows: no 65,535 limit (CUDA's y/z dims) however long the sequence."""
    return (triton.cdiv(n, blocks["BLOCK_N"]),)


def forward_launch(logits: Tensor, index: Tensor, temperature: float, entropy: bool) -> Launch:
    """Launch record of the forward: fills ``args['logp']``, ``args['lse']`` (and ``args['entropy']``)."""
    x3, T, sb, st = as_rows(logits)
    n = index.numel()
    out = torch.empty(3 if entropy else 2, n, device=logits.device, dtype=torch.float32)
    args = dict(logits=x3, index=index.reshape(-1).long().contiguous(), logp=out[0], lse=out[1],
                entropy=out[2] if entropy else out[1], N=n, T=T, stride_b=sb, stride_t=st, V=logits.shape[-1],
                inv_temp=1.0 / temperature)
    b = blocks(logits.shape[-1])
    return Launch(_logprob_fwd_kernel, grid(n, b), args, dict(**b, ENTROPY=entropy), num_warps=8, num_stages=2)


def backward_launch(dlogits: Tensor, logits: Tensor, index: Tensor, lse: Tensor, dlogp: Tensor,
                    temperature: float, entropy: Tensor | None = None, dentropy: Tensor | None = None) -> Launch:
    """Launch record writing dz into ``dlogits`` (may alias ``logits``: each row is read before it is written)."""
    x3, T, sb, st = as_rows(logits)
    d3, _, dsb, dst = as_rows(dlogits)
    if d3.data_ptr() != dlogits.data_ptr():
        raise ValueError("dlogits must be viewable as rows without a copy")
    has_h = entropy is not None
    args = dict(dlogits=d3, logits=x3, index=index.reshape(-1).long().contiguous(), lse=lse,
                dlogp=dlogp.reshape(-1).float().contiguous(),
                entropy=entropy if has_h else lse, dentropy=dentropy.reshape(-1).float().contiguous() if has_h
                else lse, N=lse.numel(), T=T, stride_b=sb, stride_t=st, dstride_b=dsb, dstride_t=dst,
                V=logits.shape[-1], inv_temp=1.0 / temperature)
    b = blocks(logits.shape[-1])
    return Launch(_logprob_bwd_kernel, grid(lse.numel(), b), args, dict(**b, ENTROPY=has_h), num_warps=8,
                  num_stages=1)


class _LogProb(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, index, temperature, return_entropy):
        launch = forward_launch(logits, index, temperature, return_entropy)
        launch()
        logp, lse, ent = launch.args["logp"], launch.args["lse"], launch.args["entropy"]
        ctx.save_for_backward(logits, index, lse, ent)
        ctx.temperature, ctx.return_entropy = temperature, return_entropy
        return logp.reshape(index.shape), ent.reshape(index.shape)

    @staticmethod
    def backward(ctx, dlogp, dentropy):
        logits, index, lse, ent = ctx.saved_tensors
        dlogits = torch.empty(logits.shape, device=logits.device, dtype=logits.dtype)
        has_h = ctx.return_entropy
        backward_launch(dlogits, logits, index, lse, dlogp, ctx.temperature, ent if has_h else None,
                        dentropy if has_h else None)()
        return dlogits, None, None, None


def selective_log_softmax(logits: Tensor, index: Tensor, temperature: float = 1.0, return_entropy: bool = False):
    """fp32 log softmax(logits / T) at ``index`` (and entropy): logits [..., V], index [...] → [...]."""
    check_device("selective_log_softmax", logits, index)
    if logits.shape[:-1] != index.shape:
        raise ValueError(f"selective_log_softmax: index shape {tuple(index.shape)} does not match logits "
                         f"{tuple(logits.shape)} without the vocab dim")
    logp, ent = _LogProb.apply(logits, index, temperature, return_entropy)  # no graph under no_grad / no grad
    return (logp, ent) if return_entropy else logp


def aot_variants() -> list[Launch]:
    """The launchers' constexpr variants (entropy × tile shapes 1×4096, 4×1024, 512×8; dtypes) for the AOT test."""
    out = []
    for dtype, vocab in ((torch.bfloat16, (152064, 1000, 8)), (torch.float32, (152064,)), (torch.float16, (8,))):
        for V in vocab:
            x = torch.empty(2, 3, V, device="meta", dtype=dtype)
            idx = torch.empty(2, 3, device="meta", dtype=torch.long)
            for entropy in (False, True):
                a = (fwd := forward_launch(x, idx, 1.0, entropy)).args
                out += [fwd, backward_launch(x, x, idx, a["lse"], a["logp"], 1.0, a["entropy"] if entropy else None,
                                             a["logp"] if entropy else None)]
    return out
