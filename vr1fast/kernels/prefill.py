"""Triton packed causal prefill over paged KV; matches ``reference_paged.prefill_attention`` and takes its signature.

Prompts packed along N (prompt i = rows cu_seqlens[i]:cu_seqlens[i+1], host ints, as the reference takes them):
their K/V are first written at ``slots`` by ``attention.paged_append``, then each query row attends causally
within its own prompt, read from the contiguous k, v [N, Hkv, D] (GQA: query head h reads KV head ⌊h / R⌋):
    o_t = Σ_{a ≤ u ≤ t} softmax_u(scale·q_t·k_u)·v_u      (a = the prompt's first row)
One program per (query block of BLOCK_M rows inside one prompt, query head); the block list is built on the host
from cu_seqlens. The online softmax over key tiles is ``attention.online_tile`` (base 2, fp32 state, 16-bit dots
with p rounded to v's dtype, fp32 dots as 3xTF32); out in q's dtype, rounded to nearest even.
flash-attn's varlen kernel is not wired in (not installed in the dev venv, so it could not be tested here).
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
import triton
import triton.language as tl
from torch import Tensor

from vr1fast.kernels._triton import Launch, dot_operand
from vr1fast.kernels.attention import (LOG2E, block_n, check_inputs, dot_flags, online_tile, paged_append, rounded,
                                       unit_stride, warps)


@triton.jit
def _prefill_kernel(q, k, v, out, blk_start, blk_seq, stride_qt, stride_qh, stride_kt, stride_kh, stride_vt,
                    stride_vh, c, HQ: tl.constexpr, R: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, ROUND: tl.constexpr, UPCAST: tl.constexpr,
                    PRECISION: tl.constexpr):
    b, h = tl.program_id(0), tl.program_id(1)
    first = tl.load(blk_start + b)
    seq0, seq1 = tl.load(blk_seq + 2 * b), tl.load(blk_seq + 2 * b + 1)
    rows = first + tl.arange(0, BLOCK_M)
    live = rows < seq1
    d = tl.arange(0, BLOCK_D)
    d_ok = (d < D)[None, :]
    qt = tl.load(q + rows.to(tl.int64)[:, None] * stride_qt + h * stride_qh + d[None, :], mask=live[:, None] & d_ok,
                 other=0.0)
    qt = dot_operand(qt, UPCAST)
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    for t0 in range(seq0, tl.minimum(seq1, first + BLOCK_M), BLOCK_N):
        t = (t0 + tl.arange(0, BLOCK_N)).to(tl.int64)
        ok = t < seq1
        kp = k + t[:, None] * stride_kt + (h // R) * stride_kh + d[None, :]
        vp = v + t[:, None] * stride_vt + (h // R) * stride_vh + d[None, :]
        keep = ok[None, :] & (t[None, :] <= rows[:, None])
        m_i, l_i, acc = online_tile(qt, kp, vp, ok, keep, d_ok, m_i, l_i, acc, c, ROUND, UPCAST, PRECISION)
    o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    dst = out + rows.to(tl.int64)[:, None] * (HQ * D) + h * D + d[None, :]
    tl.store(dst, rounded(o, out.dtype.element_ty, ROUND), mask=live[:, None] & d_ok)


def prefill_launch(q: Tensor, k: Tensor, v: Tensor, out: Tensor, cu: list[int], scale: float) -> Launch:
    """Causal attention of packed prompts (host boundaries ``cu``): one program per (query block, query head)."""
    _, hq, d = q.shape
    block_m = 64 if d >= 64 else 16
    spans = [(s, a, b) for a, b in zip(cu[:-1], cu[1:]) for s in range(a, b, block_m)]
    blk_start = torch.tensor([s for s, _, _ in spans], dtype=torch.int32).to(q.device)
    blk_seq = torch.tensor([x for _, a, b in spans for x in (a, b)], dtype=torch.int32).to(q.device)
    args = dict(q=q, k=k, v=v, out=out, blk_start=blk_start, blk_seq=blk_seq, stride_qt=q.stride(0),
                stride_qh=q.stride(1), stride_kt=k.stride(0), stride_kh=k.stride(1), stride_vt=v.stride(0),
                stride_vh=v.stride(1), c=scale * LOG2E)
    consts = dict(HQ=hq, R=hq // k.shape[1], D=d, BLOCK_M=block_m, BLOCK_N=block_n(d, q.dtype),
                  **dot_flags(q.dtype, d))
    return Launch(_prefill_kernel, (len(spans), hq), args, consts, num_warps=warps(block_m, d), num_stages=2)


def prefill_attention(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Union[Tensor, Sequence[int]], k_cache: Tensor,
                      v_cache: Tensor, slots: Tensor, scale: Optional[float] = None) -> Tensor:
    """Causal attention within each packed prompt (rows cu_seqlens[i]:cu_seqlens[i+1], host ints), after writing
    its K/V at ``slots``: q [N, Hq, D], k/v [N, Hkv, D] → [N, Hq, D] in q's dtype."""
    check_inputs("prefill_attention", q, k_cache, v_cache, k, v, slots)
    if k.dtype != q.dtype or v.dtype != q.dtype or k.shape[1:] != k_cache.shape[2:]:
        raise ValueError(f"prefill_attention: k {tuple(k.shape)} {k.dtype}, v {v.dtype} must be q's dtype {q.dtype} "
                         f"and fit the cache {tuple(k_cache.shape)}")
    cu = torch.as_tensor(cu_seqlens).to("cpu", torch.int64)
    if cu.dim() != 1 or cu.numel() < 2 or cu[0] != 0 or cu[-1] != q.shape[0] or (cu[1:] <= cu[:-1]).any():
        raise ValueError(f"cu_seqlens must rise strictly from 0 to the {q.shape[0]} packed tokens, got {cu.tolist()}")
    paged_append(k_cache, v_cache, k, v, slots)
    out = torch.empty(q.shape, device=q.device, dtype=q.dtype)
    k, v = unit_stride(k), unit_stride(v)
    prefill_launch(unit_stride(q), k, v, out, cu.tolist(), q.shape[-1] ** -0.5 if scale is None else scale)()
    return out


def aot_variants() -> list[Launch]:
    """The prefill at Qwen2.5-VL-7B (28 / 4 heads, D 128) and tiny-model (4 / 2, D 16) shapes, bf16 and fp32."""
    out = []
    for dtype in (torch.bfloat16, torch.float32):
        for hq, hkv, d in ((28, 4, 128), (4, 2, 16)):
            def meta(*shape):
                return torch.empty(*shape, device="meta", dtype=dtype)
            n = 300
            out.append(prefill_launch(meta(n, hq, d), meta(n, hkv, d), meta(n, hkv, d), meta(n, hq, d), [0, 100, n],
                                      d ** -0.5))
    return out
