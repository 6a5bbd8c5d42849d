"""Triton paged attention for the rollout engine: KV append and the two-level cascade decode; matches
``reference_paged`` (paged_append, paged_attention_state, cascade_decode_attention) and takes its signatures (plus
keyword-only launch hints). The packed causal prefill (``prefill.py``) shares this file's tile helpers.

Layout as in ``reference_paged``: caches [num_pages, PAGE, Hkv, D] (contiguous), flat slot p·PAGE + s, page tables
int32 [rows, width] (-1 padding), GQA Hq = R·Hkv with query head h reading KV head ⌊h / R⌋. Every key t < n of a
row is read as k_cache[table[row, t // PAGE], t % PAGE]; nothing at or past n is loaded (NaN-safe by masking).

Partial state over a key set, in base 2 inside the kernels (c = scale·log2 e):
    s_t = c·q·k_t,  m = max_t s_t,  l = Σ_t 2^(s_t − m),  o = Σ_t 2^(s_t − m)·v_t / l,  lse₂ = m + log2 l
(online over key tiles; empty set: o = 0, lse₂ = −inf). Partials over disjoint keys merge as
    M = max_j lse₂_j,  w_j = 2^(lse₂_j − M),  o = Σ_j w_j·o_j / Σ_j w_j,  lse = (M + log2 Σ_j w_j)·ln 2  (natural).

Cascade decode (Hydragen; docs/kv-sharing.md §4, §7), one step of S samples in groups (groups[i] = prompt row):
  * ``_partial_kernel`` work item (w, KV head h, split, member block): the keys of table row ``row_of[w]`` in split
    ``split`` (``chunk`` keys each), against a query tile of BLOCK_G members × R query heads packed as rows
    (8 siblings × 7 heads = 56 of 64 rows for Qwen2.5-VL-7B). Level 1 launches it over groups with the group's
    live samples as members, so each prompt page is read once per step for all siblings; level 2 over samples
    (one member each, its own suffix pages). ``share=False`` makes level 1 one work item per sample (the prompt
    read once per sample, what a per-sequence paged kernel does): the benchmark's unshared baseline.
  * ``_merge_kernel``: per sample, the LSE merge of all level-1 and level-2 split partials → o in q's dtype.
Finished samples (slot −1) are left out of both levels and get o = 0. No host sync: member lists are built with
device ops (stable argsort, index_add), grid sizes come from shapes (table widths bound the lengths) and the
``max_group`` hint (siblings per group; default S).

dtypes: fp32 / bf16 / fp16 (q and caches alike); math and partials in fp32; bf16/fp16 dots on tensor cores with
fp32 accumulation (p rounded to v's dtype before p·v, as flash attention does), fp32 dots as 3xTF32.

Engine use: ``kernels.implementation(name, device=q.device.type)`` once per rollout (Triton on CUDA, the reference on
CPU), then ``cascade_decode_attention(..., max_group=G)`` each step with the page tables at their rollout widths
(static shapes, so the launch grid stays fixed across steps).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from vr1fast.kernels._triton import INTERPRET, Launch, check_device, dot_operand

LOG2E = 1.4426950408889634
ROWS = 64          # query rows per decode tile (siblings × R)
TARGET_CTAS = 264  # decode splits aim at ≥ 2 programs per SM of an H100/H200 (132 SMs)
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@triton.jit
def rounded(x, dtype: tl.constexpr, ROUND: tl.constexpr):
    """fp32 x in ``dtype`` rounded to nearest even: ROUND 0 no rounding (fp32), 1 the GPU's conversion, 2 fp32 → bf16
    by bit arithmetic (the interpreter truncates, whatever rounding mode it is given)."""
    if ROUND == 2:
        bits = x.to(tl.uint32, bitcast=True)
        bits = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
        x = bits.to(tl.float32, bitcast=True)
    if ROUND == 1:
        return x.to(dtype, fp_downcast_rounding="rtne")
    return x.to(dtype)


@triton.jit
def _append_kernel(k, v, k_cache, v_cache, slots, stride_kt, stride_kh, stride_vt, stride_vh,
                   HKV: tl.constexpr, D: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
                   K_ROUND: tl.constexpr, V_ROUND: tl.constexpr):
    t = tl.program_id(0)
    slot = tl.load(slots + t).to(tl.int64)
    h, d = tl.arange(0, BLOCK_H)[:, None], tl.arange(0, BLOCK_D)[None, :]
    dst = slot * HKV * D + h * D + d
    ok = (h < HKV) & (d < D) & (dst >= 0)  # dst < 0 exactly when slot = -1
    kt = tl.load(k + t * stride_kt + h * stride_kh + d, mask=ok)
    vt = tl.load(v + t * stride_vt + h * stride_vh + d, mask=ok)
    tl.store(k_cache + dst, rounded(kt, k_cache.dtype.element_ty, K_ROUND), mask=ok)
    tl.store(v_cache + dst, rounded(vt, v_cache.dtype.element_ty, V_ROUND), mask=ok)


@triton.jit
def online_tile(q, kp, vp, ok, keep, d_ok, m_i, l_i, acc, c, ROUND: tl.constexpr, UPCAST: tl.constexpr,
                 PRECISION: tl.constexpr):
    """One key tile of the online softmax: q [M, BD], key/value pointers [BN, BD], keys loaded where ``ok`` [BN],
    scores kept where ``keep`` ([1 or M, BN]) → the new (m_i, l_i, acc)."""
    kt = dot_operand(tl.load(kp, mask=ok[:, None] & d_ok, other=0.0), UPCAST)
    s = tl.dot(q, tl.trans(kt), input_precision=PRECISION) * c
    s = tl.where(keep, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    shift = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp2(s - shift[:, None])
    alpha = tl.exp2(m_i - shift)
    vt = tl.load(vp, mask=ok[:, None] & d_ok, other=0.0)
    pv = dot_operand(rounded(p, vt.dtype, ROUND), UPCAST)
    acc = acc * alpha[:, None] + tl.dot(pv, dot_operand(vt, UPCAST), input_precision=PRECISION)
    return m_new, l_i * alpha + tl.sum(p, 1), acc


@triton.jit
def _partial_kernel(q, k_cache, v_cache, table, lens, order, start, count, row_of, o_part, lse_part,
                    stride_qs, stride_qh, stride_tab, chunk, c, split_base, S,
                    HKV: tl.constexpr, R: tl.constexpr, D: tl.constexpr, PAGE: tl.constexpr, NMB: tl.constexpr,
                    BLOCK_G: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                    ROUND: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    w, h, pid = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    split, mb = pid // NMB, pid % NMB
    n = tl.load(count + w)
    if mb * BLOCK_G >= n:
        return
    m = tl.arange(0, BLOCK_M)
    j = m // R
    live = (j < BLOCK_G) & (mb * BLOCK_G + j < n)
    sample = tl.load(order + tl.load(start + w) + mb * BLOCK_G + j, mask=live, other=0).to(tl.int64)
    head = h * R + m % R
    d = tl.arange(0, BLOCK_D)
    d_ok = (d < D)[None, :]
    qt = tl.load(q + sample[:, None] * stride_qs + head[:, None] * stride_qh + d[None, :], mask=live[:, None] & d_ok,
                 other=0.0)
    qt = dot_operand(qt, UPCAST)
    row = tl.load(row_of + w).to(tl.int64)
    lo = split * chunk
    hi = tl.minimum(tl.load(lens + row), lo + chunk)
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    for t0 in range(lo, hi, BLOCK_N):
        t = t0 + tl.arange(0, BLOCK_N)
        ok = t < hi
        page = tl.load(table + row * stride_tab + t // PAGE, mask=ok, other=0).to(tl.int64)
        kv = ((page * PAGE + t % PAGE) * HKV + h)[:, None] * D + d[None, :]
        m_i, l_i, acc = online_tile(qt, k_cache + kv, v_cache + kv, ok, ok[None, :], d_ok, m_i, l_i, acc, c,
                                     ROUND, UPCAST, PRECISION)
    o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    out = (split_base + split) * S + sample
    tl.store(o_part + (out * (HKV * R) + head)[:, None] * D + d[None, :], o, mask=live[:, None] & d_ok)
    tl.store(lse_part + out * (HKV * R) + head, m_i + tl.log2(tl.where(l_i > 0, l_i, 1.0)), mask=live)


@triton.jit
def _merge_kernel(o_part, lse_part, live, out, lse_out, S, NPART, HQ: tl.constexpr, D: tl.constexpr,
                  BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, WRITE_LSE: tl.constexpr, ROUND: tl.constexpr):
    i = tl.program_id(0).to(tl.int64)
    h, d = tl.arange(0, BLOCK_H), tl.arange(0, BLOCK_D)
    ok = (h < HQ)[:, None] & (d < D)[None, :]
    alive = tl.load(live + i) != 0
    m = tl.full((BLOCK_H,), float("-inf"), tl.float32)
    wsum = tl.zeros((BLOCK_H,), tl.float32)
    acc = tl.zeros((BLOCK_H, BLOCK_D), tl.float32)
    for j in range(0, tl.where(alive, NPART, 0)):
        base = (j * S + i) * HQ + h
        lse = tl.load(lse_part + base, mask=h < HQ, other=float("-inf"))
        m_new = tl.maximum(m, lse)
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha, wj = tl.exp2(m - shift), tl.exp2(lse - shift)
        oj = tl.load(o_part + base[:, None] * D + d[None, :], mask=ok, other=0.0)
        acc = acc * alpha[:, None] + wj[:, None] * oj
        wsum = wsum * alpha + wj
        m = m_new
    o = acc / tl.where(wsum > 0, wsum, 1.0)[:, None]
    tl.store(out + (i * HQ + h)[:, None] * D + d[None, :], rounded(o, out.dtype.element_ty, ROUND), mask=ok)
    if WRITE_LSE:
        tl.store(lse_out + i * HQ + h, (m + tl.log2(tl.where(wsum > 0, wsum, 1.0))) * 0.6931471805599453,
                 mask=h < HQ)


def check_inputs(name: str, q: Tensor, k_cache: Tensor, v_cache: Tensor, *others: Tensor) -> None:
    check_device(name, q, k_cache, v_cache, *others)
    if q.dtype not in DTYPES or k_cache.dtype != q.dtype or v_cache.dtype != q.dtype:
        raise ValueError(f"{name}: q {q.dtype} and caches {k_cache.dtype}/{v_cache.dtype} must share one dtype of "
                         f"{DTYPES}")
    if k_cache.shape != v_cache.shape or not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError(f"{name}: caches {tuple(k_cache.shape)}/{tuple(v_cache.shape)} must be one contiguous shape "
                         "[pages, page_size, Hkv, D]")
    if q.shape[-1] != k_cache.shape[-1] or q.shape[-2] % k_cache.shape[2]:
        raise ValueError(f"{name}: q {tuple(q.shape)} does not fit the cache {tuple(k_cache.shape)} (D equal, Hq a "
                         "multiple of Hkv)")


def _round(src: torch.dtype, dst: torch.dtype) -> int:
    """``rounded``'s mode for fp32 values of a ``src`` computation stored as ``dst``."""
    if src != torch.float32 or dst == torch.float32:
        return 0
    return 2 if INTERPRET and dst == torch.bfloat16 else 1


def dot_flags(dtype: torch.dtype, d: int) -> dict:
    """Tensor-core dots: 16-bit inputs as they are, fp32 as 3xTF32; operands upcast under the interpreter."""
    return dict(BLOCK_D=max(16, triton.next_power_of_2(d)), ROUND=_round(torch.float32, dtype), UPCAST=INTERPRET,
                PRECISION="tf32x3" if dtype == torch.float32 else "tf32")


def unit_stride(x: Tensor) -> Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def append_launch(k_cache: Tensor, v_cache: Tensor, k: Tensor, v: Tensor, slots: Tensor) -> Launch:
    hkv, d = k_cache.shape[2:]
    k, v = unit_stride(k), unit_stride(v)
    args = dict(k=k, v=v, k_cache=k_cache, v_cache=v_cache, slots=slots, stride_kt=k.stride(0), stride_kh=k.stride(1),
                stride_vt=v.stride(0), stride_vh=v.stride(1))
    consts = dict(HKV=hkv, D=d, BLOCK_H=triton.next_power_of_2(hkv), BLOCK_D=triton.next_power_of_2(d),
                  K_ROUND=_round(k.dtype, k_cache.dtype), V_ROUND=_round(v.dtype, v_cache.dtype))
    return Launch(_append_kernel, (k.shape[0],), args, consts, num_warps=4, num_stages=1)


def paged_append(k_cache: Tensor, v_cache: Tensor, k: Tensor, v: Tensor, slots: Tensor) -> None:
    """Write K/V rows [N, Hkv, D] at flat slots int [N] of the caches [pages, page_size, Hkv, D]; slot -1 skips
    (in-kernel: no host sync). Rows are cast to the cache dtype."""
    check_device("paged_append", k_cache, v_cache, k, v, slots)
    if k.shape != v.shape or k.shape[0] != slots.shape[0] or k.shape[1:] != k_cache.shape[2:] or \
            k_cache.shape != v_cache.shape or not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError(f"paged_append: k {tuple(k.shape)}, v {tuple(v.shape)}, slots {tuple(slots.shape)} do not "
                         f"fit the contiguous caches {tuple(k_cache.shape)} ([N, Hkv, D], [N])")
    if k.shape[0]:
        append_launch(k_cache, v_cache, k, v, slots)()


@dataclass
class Members:
    """The work items of one ``_partial_kernel`` launch: item w reads table row ``row_of[w]`` for the samples
    ``order[start[w] : start[w] + count[w]]`` (all int32 on the device); ``most`` bounds count (host int)."""
    order: Tensor
    start: Tensor
    count: Tensor
    row_of: Tensor
    most: int

    @staticmethod
    def single(live: Tensor, row_of: Tensor) -> "Members":
        """One item per sample (reading row ``row_of[i]``), empty for a finished one."""
        idx = torch.arange(live.shape[0], device=live.device, dtype=torch.int32)
        return Members(idx, idx, live, row_of.to(torch.int32), 1)

    @staticmethod
    def grouped(groups: Tensor, live: Tensor, n_rows: int, most: int) -> "Members":
        """One item per prompt row: its live samples, found by a stable sort on (row, finished)."""
        g = groups.long()
        order = torch.argsort(g * 2 + (1 - live.long()), stable=True).to(torch.int32)
        zeros = torch.zeros(n_rows, dtype=torch.long, device=g.device)
        size = zeros.index_add(0, g, torch.ones_like(g))
        start = (size.cumsum(0) - size).to(torch.int32)
        count = zeros.index_add(0, g, live.long()).to(torch.int32)
        return Members(order, start, count, torch.arange(n_rows, device=g.device, dtype=torch.int32), most)


def _plan(items: int, max_len: int, block_n: int) -> tuple[int, int]:
    """(splits, keys per split): about TARGET_CTAS programs, no split under two key tiles."""
    want = max(1, min(triton.cdiv(TARGET_CTAS, max(items, 1)), triton.cdiv(max_len, 2 * block_n)))
    chunk = triton.cdiv(triton.cdiv(max(max_len, 1), want), block_n) * block_n
    return triton.cdiv(max(max_len, 1), chunk), chunk


def partial_launch(q: Tensor, k_cache: Tensor, v_cache: Tensor, table: Tensor, lens: Tensor, members: Members,
                   o_part: Tensor, lse_part: Tensor, split_base: int, plan: tuple[int, int], scale: float) -> Launch:
    """Partial states of ``members`` over their rows' keys into splits split_base… of o_part [n, S, Hq, D] /
    lse_part [n, S, Hq] (base 2)."""
    S, hq, d = q.shape
    hkv, page = k_cache.shape[2], k_cache.shape[1]
    r = hq // hkv
    block_g = min(triton.next_power_of_2(members.most), max(1, 2 ** int(math.log2(max(ROWS // r, 1)))))
    nmb = triton.cdiv(members.most, block_g)
    args = dict(q=q, k_cache=k_cache, v_cache=v_cache, table=table, lens=lens, order=members.order,
                start=members.start, count=members.count, row_of=members.row_of, o_part=o_part, lse_part=lse_part,
                stride_qs=q.stride(0), stride_qh=q.stride(1), stride_tab=table.stride(0), chunk=plan[1],
                c=scale * LOG2E, split_base=split_base, S=S)
    block_m = max(16, triton.next_power_of_2(block_g * r))
    consts = dict(HKV=hkv, R=r, D=d, PAGE=page, NMB=nmb, BLOCK_G=block_g, BLOCK_M=block_m,
                  BLOCK_N=block_n(d, q.dtype), **dot_flags(q.dtype, d))
    return Launch(_partial_kernel, (members.count.shape[0], hkv, plan[0] * nmb), args, consts,
                  num_warps=warps(block_m, d), num_stages=2)


def block_n(d: int, dtype: torch.dtype) -> int:
    """Key tile: 64 keys of D ≥ 64 in 16-bit (32 in fp32, which holds twice the bytes), else 16."""
    return 16 if d < 64 else 32 if dtype == torch.float32 else 64


def warps(rows: int, d: int) -> int:
    """8 warps for a 64 × 128 tile (4 would need ~250 registers a thread), else 4."""
    return 8 if rows * d >= 64 * 128 else 4


def merge_launch(o_part: Tensor, lse_part: Tensor, live: Tensor, out: Tensor, lse_out: Optional[Tensor]) -> Launch:
    n, S, hq, d = o_part.shape
    args = dict(o_part=o_part, lse_part=lse_part, live=live, out=out, lse_out=lse_part if lse_out is None else lse_out,
                S=S, NPART=n)
    consts = dict(HQ=hq, D=d, BLOCK_H=triton.next_power_of_2(hq), BLOCK_D=triton.next_power_of_2(d),
                  WRITE_LSE=lse_out is not None, ROUND=_round(torch.float32, out.dtype))
    return Launch(_merge_kernel, (S,), args, consts, num_warps=4, num_stages=1)


def _attend(q: Tensor, k_cache: Tensor, v_cache: Tensor, levels: list, live: Tensor, out: Tensor,
            lse_out: Optional[Tensor], scale: Optional[float]) -> None:
    """Each level (table, lens, members) into its own splits of one partial buffer, then their merge into out."""
    S, hq, d = q.shape
    plans = [_plan(m.count.shape[0] * k_cache.shape[2], t.shape[1] * k_cache.shape[1], block_n(d, q.dtype))
             for t, _, m in levels]
    n = sum(p[0] for p in plans)
    o_part = torch.empty(n, S, hq, d, device=q.device, dtype=torch.float32)
    lse_part = torch.empty(n, S, hq, device=q.device, dtype=torch.float32)
    base, scale = 0, d ** -0.5 if scale is None else scale
    for (table, lens, members), plan in zip(levels, plans):
        partial_launch(q, k_cache, v_cache, table, lens, members, o_part, lse_part, base, plan, scale)()
        base += plan[0]
    merge_launch(o_part, lse_part, live, out, lse_out)()


def paged_attention_state(q: Tensor, k_cache: Tensor, v_cache: Tensor, page_table: Tensor, lengths: Tensor,
                          scale: Optional[float] = None) -> tuple[Tensor, Tensor]:
    """One query per row over the first ``lengths[i]`` slots of row i's pages (split-KV): q [S, Hq, D],
    page_table int [S, W], lengths int [S] ≤ W·page_size (not checked: no host sync) → (o [S, Hq, D], lse [S, Hq])
    in fp32."""
    check_inputs("paged_attention_state", q, k_cache, v_cache, page_table, lengths)
    S, hq, d = q.shape
    if page_table.shape[0] != S or lengths.shape != (S,):
        raise ValueError(f"paged_attention_state: q {tuple(q.shape)}, page_table {tuple(page_table.shape)} and "
                         f"lengths {tuple(lengths.shape)} must share S rows")
    rows = torch.arange(S, device=q.device, dtype=torch.int32)
    members = Members.single(torch.ones_like(rows), rows)
    o = torch.empty(S, hq, d, device=q.device, dtype=torch.float32)
    lse = torch.empty(S, hq, device=q.device, dtype=torch.float32)
    _attend(unit_stride(q), k_cache, v_cache, [(page_table, lengths, members)], members.count, o, lse, scale)
    return o, lse


def cascade_decode_attention(q: Tensor, k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor, slots: Tensor,
                             prefix_table: Tensor, prefix_lens: Tensor, groups: Tensor, suffix_table: Tensor,
                             suffix_lens: Tensor, scale: Optional[float] = None, *, max_group: Optional[int] = None,
                             share: bool = True) -> Tensor:
    """One decode step: append each sample's K/V, then its group's prompt (read once per group for all live
    siblings; per sample with ``share=False``) ⊕ its own tokens. Shapes as ``reference_paged``; ``max_group``
    bounds the samples per prompt row (default S: correct, more idle programs). Finished samples (slot -1) get 0."""
    check_inputs("cascade_decode_attention", q, k_cache, v_cache, k, v, slots, prefix_table, prefix_lens, groups,
           suffix_table, suffix_lens)
    S, hq, d = q.shape
    if not (k.shape[0] == slots.shape[0] == groups.shape[0] == suffix_table.shape[0] == suffix_lens.shape[0] == S):
        raise ValueError(f"cascade_decode_attention: q {tuple(q.shape)}, k {tuple(k.shape)}, slots, groups, "
                         f"suffix_table {tuple(suffix_table.shape)} and suffix_lens must share S rows")
    paged_append(k_cache, v_cache, k, v, slots)
    live = (slots >= 0).to(torch.int32)
    first = (Members.grouped(groups, live, prefix_table.shape[0], max_group or S) if share
             else Members.single(live, groups))
    second = Members.single(live, torch.arange(S, device=q.device))
    out = torch.empty(S, hq, d, device=q.device, dtype=q.dtype)
    _attend(unit_stride(q), k_cache, v_cache, [(prefix_table, prefix_lens, first), (suffix_table, suffix_lens, second)],
            live, out, None, scale)
    return out


def aot_variants() -> list[Launch]:
    """Every kernel variant at Qwen2.5-VL-7B (28 q / 4 KV heads, D 128) and tiny-model (4 / 2, D 16) shapes, pages
    of 16, bf16 and fp32: append (and fp32 rows into a bf16 cache), level 1 with 8 and 4 siblings, level 2 (one
    sample, also the unshared level 1), the merge (with and without lse)."""
    out = []
    for dtype in (torch.bfloat16, torch.float32):
        for hq, hkv, d in ((28, 4, 128), (4, 2, 16)):
            def meta(*shape, dt=dtype):
                return torch.empty(*shape, device="meta", dtype=dt)
            S, cache, i32 = 16, meta(64, 16, hkv, d), torch.int32
            out.append(append_launch(cache, cache, meta(S, hkv, d), meta(S, hkv, d), meta(S, dt=torch.long)))
            if dtype == torch.float32:
                bf = meta(64, 16, hkv, d, dt=torch.bfloat16)
                out.append(append_launch(bf, bf, meta(S, hkv, d), meta(S, hkv, d), meta(S, dt=torch.long)))
            o_part, lse_part = meta(4, S, hq, d, dt=torch.float32), meta(4, S, hq, S, dt=torch.float32)
            for most in (8, 4, 1):
                members = Members(meta(S, dt=i32), meta(S, dt=i32), meta(S, dt=i32), meta(S, dt=i32), most)
                out.append(partial_launch(meta(S, hq, d), cache, cache, meta(S, 48, dt=i32), meta(S, dt=torch.long),
                                          members, o_part, lse_part, 0, (2, 640), d ** -0.5))
            out.append(merge_launch(o_part, lse_part, meta(S, dt=i32), meta(S, hq, d), None))
            if dtype == torch.float32:
                out.append(merge_launch(o_part, lse_part, meta(S, dt=i32), meta(S, hq, d), meta(S, hq)))
    return out
