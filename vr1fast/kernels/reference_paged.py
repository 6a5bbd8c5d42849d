"""Pure-torch paged attention: the specification part 2's Triton kernels (paged append, packed prefill, cascade
decode) match, and what the paged rollout engine runs on CPU.

Layout (``rollout.kv_pool``): one layer's cache ``k_cache, v_cache: [num_pages, page_size, Hkv, D]``; flat slot
``p · page_size + s`` is slot s of page p. A page table is int32 ``[rows, width]`` of page ids, -1 after a row's
last page; a row of length n uses its first ⌈n / page_size⌉ entries, and nothing at or past slot n is read (those
slots may hold anything, NaN included). GQA: Hq = r · Hkv query heads, query head h reads KV head ⌊h / r⌋ (HF's
``repeat_kv``). Scale ``scale`` (default D^-1/2).

Attention of query q over keys/values (k_t, v_t), t < n, as partial state (o, lse):
    s_t = scale · q·k_t,   lse = log Σ_t exp(s_t),   o = Σ_t exp(s_t − lse) · v_t
(natural log; n = 0 gives o = 0, lse = −inf). Two partial states over disjoint key sets merge exactly:
    lse = log(exp(lse_a) + exp(lse_b)),   o = exp(lse_a − lse) · o_a + exp(lse_b − lse) · o_b
(with the max subtracted first; both empty stays o = 0, lse = −inf). The cascade decode is this merge of a prefix
state and a suffix state (Hydragen, FlashInfer's ``merge_state``; docs/kv-sharing.md §7): sample i of group g(i)
attends to its group's prompt (prefix page table row g(i), ``prefix_lens[g(i)]`` tokens) and then to its own tokens (its
suffix page table row, ``suffix_lens[i]`` tokens, the current token included) — the same as one softmax over
prompt ‖ own tokens, with the prompt pages read once per group by a kernel that packs siblings' queries.

Functions (q, k, v per token: [N, Hq, D] / [N, Hkv, D]; outputs in q's dtype, states and math in fp32, fp64 for
fp64 input):
    paged_append(k_cache, v_cache, k, v, slots)        write token t's K/V at flat slot ``slots[t]`` (-1: skip)
    prefill_attention(q, k, v, cu_seqlens, k_cache, v_cache, slots)
        packed prompts (prompt i = rows cu_seqlens[i]:cu_seqlens[i+1], CPU int), causal within each; writes their
        K/V at ``slots`` first
    paged_attention_state(q, k_cache, v_cache, page_table, lengths) -> (o [S, Hq, D], lse [S, Hq])
        one query per row over its paged keys (non-causal: every key < length)
    merge_attention_states(o_a, lse_a, o_b, lse_b) -> (o, lse)
    cascade_decode_attention(q, k, v, k_cache, v_cache, slots, prefix_table, prefix_lens, groups,
                             suffix_table, suffix_lens) -> o [S, Hq, D]
        one decode step of S samples: write each new K/V (slot -1 for a finished sample, whose output is then
        meaningless), then prefix state ⊕ suffix state. groups: int [S], the prefix row of each sample.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch
from torch import Tensor


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def attention_state(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """Masked attention as partial state: q [B, M, Hq, D], k/v [B, T, Hkv, D], mask bool [B, M, T] →
    (o [B, M, Hq, D], lse [B, M, Hq]) in the compute dtype; masked keys and values are never used (NaN-safe)."""
    dt = _compute_dtype(q.dtype)
    B, M, Hq, D = q.shape
    Hkv = k.shape[2]
    if Hq % Hkv:
        raise ValueError(f"attention: {Hq} query heads are not a multiple of {Hkv} KV heads")
    qg = q.to(dt).reshape(B, M, Hkv, Hq // Hkv, D)
    keep = mask[:, :, None, None, :]                                              # [B, M, 1, 1, T]
    s = torch.einsum("bmgrd,btgd->bmgrt", qg, k.to(dt)) * scale
    s = torch.where(keep, s, torch.tensor(-math.inf, dtype=dt, device=s.device))
    m = s.amax(-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    p = torch.exp(s - m)                                                          # 0 at masked keys
    l = p.sum(-1)
    vv = torch.where(mask.any(1)[:, :, None, None], v.to(dt), torch.zeros((), dtype=dt, device=v.device))
    o = torch.einsum("bmgrt,btgd->bmgrd", p, vv) / torch.where(l > 0, l, torch.ones_like(l))[..., None]
    lse = m.squeeze(-1) + torch.log(l)                                            # -inf where nothing was attended
    return o.reshape(B, M, Hq, D), lse.reshape(B, M, Hq)


def merge_attention_states(o_a: Tensor, lse_a: Tensor, o_b: Tensor, lse_b: Tensor) -> tuple[Tensor, Tensor]:
    """Merge two partial states over disjoint keys: o [..., D], lse [...] (natural log) → (o, lse)."""
    m = torch.maximum(lse_a, lse_b)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    w_a, w_b = torch.exp(lse_a - m), torch.exp(lse_b - m)
    total = w_a + w_b
    safe = torch.where(total > 0, total, torch.ones_like(total))
    o = (w_a[..., None] * o_a + w_b[..., None] * o_b) / safe[..., None]
    return o, m + torch.log(total)


def paged_append(k_cache: Tensor, v_cache: Tensor, k: Tensor, v: Tensor, slots: Tensor) -> None:
    """Write K/V rows [N, Hkv, D] at flat slots int [N] of the caches [pages, page_size, Hkv, D]; slot -1 skips."""
    if k.shape != v.shape or k.shape[0] != slots.shape[0] or k.shape[1:] != k_cache.shape[2:]:
        raise ValueError(f"paged_append: k {tuple(k.shape)}, v {tuple(v.shape)}, slots {tuple(slots.shape)} do not "
                         f"fit the cache {tuple(k_cache.shape)} ([N, Hkv, D], [N])")
    keep = slots >= 0  # selecting the kept rows is a host sync on CUDA; the Triton kernel skips in-kernel
    idx = slots.long()[keep]
    k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, idx, k[keep].to(k_cache.dtype))
    v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, idx, v[keep].to(v_cache.dtype))


def _scale(q: Tensor, scale: Optional[float]) -> float:
    return q.shape[-1] ** -0.5 if scale is None else scale


def _boundaries(cu_seqlens: Union[Tensor, Sequence[int]], n: int) -> list[int]:
    cu = torch.as_tensor(cu_seqlens).to("cpu", torch.int64)
    if cu.dim() != 1 or cu.numel() < 2 or cu[0] != 0 or cu[-1] != n or (cu[1:] <= cu[:-1]).any():
        raise ValueError(f"cu_seqlens must rise strictly from 0 to the {n} packed tokens, got {cu.tolist()}")
    return cu.tolist()


def prefill_attention(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Union[Tensor, Sequence[int]], k_cache: Tensor,
                      v_cache: Tensor, slots: Tensor, scale: Optional[float] = None) -> Tensor:
    """Causal attention within each packed prompt, after writing its K/V at ``slots``: q [N, Hq, D] → [N, Hq, D]."""
    paged_append(k_cache, v_cache, k, v, slots)
    cu = _boundaries(cu_seqlens, q.shape[0])
    out = torch.empty_like(q)
    for start, stop in zip(cu[:-1], cu[1:]):
        n = stop - start
        causal = torch.ones(n, n, dtype=torch.bool, device=q.device).tril()[None]
        o, _ = attention_state(q[None, start:stop], k[None, start:stop], v[None, start:stop], causal,
                               _scale(q, scale))
        out[start:stop] = o[0].to(q.dtype)
    return out


def paged_attention_state(q: Tensor, k_cache: Tensor, v_cache: Tensor, page_table: Tensor, lengths: Tensor,
                          scale: Optional[float] = None) -> tuple[Tensor, Tensor]:
    """One query per row over the first ``lengths[i]`` slots of row i's pages: q [S, Hq, D], page_table int [S, W],
    lengths int [S], each ≤ W·page_size (the caller's invariant, not checked: that would read the lengths back to
    the host) → (o [S, Hq, D], lse [S, Hq]) in the compute dtype."""
    S, W = page_table.shape
    page_size = k_cache.shape[1]
    if q.shape[0] != S or lengths.shape != (S,):
        raise ValueError(f"paged attention: q {tuple(q.shape)}, page_table {tuple(page_table.shape)} and lengths "
                         f"{tuple(lengths.shape)} must share S rows")
    pages = page_table.long().clamp(min=0)
    k = k_cache[pages].reshape(S, W * page_size, *k_cache.shape[2:])
    v = v_cache[pages].reshape(S, W * page_size, *v_cache.shape[2:])
    mask = torch.arange(W * page_size, device=q.device)[None, None, :] < lengths.to(q.device)[:, None, None]
    o, lse = attention_state(q[:, None], k, v, mask, _scale(q, scale))
    return o[:, 0], lse[:, 0]


def cascade_decode_attention(q: Tensor, k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor, slots: Tensor,
                             prefix_table: Tensor, prefix_lens: Tensor, groups: Tensor, suffix_table: Tensor,
                             suffix_lens: Tensor, scale: Optional[float] = None, *, max_group: Optional[int] = None,
                             share: bool = True) -> Tensor:
    """One decode step: write each sample's new K/V, then attend to its group's prompt ⊕ its own tokens.
    ``max_group`` and ``share`` are the Triton kernel's launch hints, accepted for the same signature; this reads
    each sample's prompt pages on its own either way (the result does not depend on them).

    q [S, Hq, D], k/v [S, Hkv, D], slots int [S] (-1: finished), prefix_table int32 [P, Wp], prefix_lens int [P],
    groups int [S] (a row of prefix_table), suffix_table int32 [S, Ws], suffix_lens int [S] (the new token
    included) → [S, Hq, D] in q's dtype.
    """
    paged_append(k_cache, v_cache, k, v, slots)
    g = groups.long()
    o_p, lse_p = paged_attention_state(q, k_cache, v_cache, prefix_table[g], prefix_lens[g], scale)
    o_s, lse_s = paged_attention_state(q, k_cache, v_cache, suffix_table, suffix_lens, scale)
    o, _ = merge_attention_states(o_p, lse_p, o_s, lse_s)
    return o.to(q.dtype)
