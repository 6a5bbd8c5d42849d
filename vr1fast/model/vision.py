"""Qwen2.5-VL's vision attention as one SDPA call per layer, however many windows or frames it attends over.

The vision tower attends within variable-length sequences packed along the token axis and described by
``cu_seqlens`` (int32 [S+1], boundaries): windows of at most 8×8 patches in the window layers, one temporal slice
(one image, or two frames of a video) in the full-attention layers (7, 15, 23, 31 of the 7B). Without
flash-attn, transformers (5.17 and 5.24 alike) splits q/k/v at those boundaries and calls attention once per
sequence in a Python loop, after a ``cu_seqlens.tolist()`` host sync in every layer: 16 frames of 280×364 at
Video-R1's pixels are 4160 patches in 96 windows, so each window layer launches ~96 tiny attention calls.

Here every layer makes ONE call. The S sequences are packed whole into R rows of width L = the longest one
(best-fit decreasing: a row takes several short sequences while they fit), gathered into a batch
``[R, heads, L, D]``, and one SDPA call runs with a mask that lets a slot attend only within its own sequence
(``[R, 1, L, L]``; a key-padding mask ``[R, 1, 1, L]`` when no row holds two sequences); the rows of real tokens
are gathered back. For each sequence s of length n_s this is

    out[tokens of s] = softmax(q_s k_sᵀ · scale) v_s        (q_s, k_s, v_s: [heads, n_s, D])

exactly what the loop computes: a key outside s gets probability 0, so neither the other sequences of the row
nor the empty slots (which read token 0 and form their own group) change a real row or any gradient (an empty
slot's output is dropped, so its gradient is 0). When every sequence is exactly L long (one video's
full-attention layers) the batch is a view of q/k/v and the call has no mask (on a GPU the flash backend then
applies). Works on the backward path (the policy trains through the tower) and in any dtype SDPA takes.

Why this and not the alternatives: the work is R·L² scores per head, about N·L since packed rows are nearly
full (16 frames of 280×364: the 96 windows of 8–64 patches fill 65 rows of 64 exactly; 8 slices of 520 plus a
5120-patch image give 2 rows of 5120, where one padded row per sequence would cost 9). A block-diagonal mask
over all N tokens costs N² (4160² vs 65·64²: 64× the work in a window layer; measured 25–30× slower than the
loop on the CPU) and rules out the flash backend; FlexAttention skips masked blocks but is only fast under
``torch.compile`` and recompiles as token counts change between prompts; nested (jagged) tensors reach
flash-attn's varlen kernel on a GPU but run SDPA's math path sequence by sequence elsewhere. The packed rows are
plain eager SDPA on every device, and the index maps depend only on ``cu_seqlens``: they are built once per
distinct ``cu_seqlens`` tensor (the tower passes the same two, windows and slices, to all its layers) with one
host sync (the S lengths, which HF's loop syncs in every layer), and cached on that tensor. On a 2-core CPU the
one call is about as fast as the loop (per-call overhead is small there; numbers in the commit that added this
file); the loop's cost is a GPU one: per window a split, an SDPA launch and a concat slice, ~96 per window layer.

``use_batched_vision_attention(model)`` switches every ``Qwen2_5_VLVisionAttention`` of a model to
:class:`BatchedVisionAttention` (a subclass whose ``forward`` computes q/k/v and the rotary embedding with the
module's own weights and HF's ``apply_rotary_pos_emb_vision``, then the one call). The class swap survives
``copy.deepcopy`` and pickling of the tower, and changes no parameter or state-dict name. Where the config asks for flash attention
(``flash_attention_2``/``_3``) the subclass defers to HF's own forward: flash-attn's varlen kernel already makes
one call from ``cu_seqlens``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import (Qwen2_5_VLVisionAttention,
                                                                apply_rotary_pos_emb_vision)
from transformers.utils.generic import is_flash_attention_requested

_CACHE_ATTR = "_vr1fast_packed_rows"


@dataclass(frozen=True)
class PackedRows:
    """Where the tokens of S packed sequences sit in an ``[R, L]`` batch of rows (tensors on the tokens' device).

    L is the longest sequence; each row holds whole sequences (first-fit decreasing); a slot that holds no token
    reads token 0 and belongs to no sequence. ``gather``/``scatter``/``mask`` are None when every sequence is
    exactly L long (R = S rows, a view of the tokens, no mask).
    """

    rows: int                  # R
    width: int                 # L
    gather: Optional[Tensor]   # int64 [R·L]: the token each slot reads
    scatter: Optional[Tensor]  # int64 [N]: the slot of each token
    mask: Optional[Tensor]     # bool [R, 1, 1, L] (≤ 1 sequence per row: real keys) or [R, 1, L, L] (same sequence)
    device: torch.device
    source_version: int        # cu_seqlens' version counter when the maps were built (-1: an inference tensor)


def pack_rows(lengths: list[int]) -> tuple[list[int], list[int], int, int]:
    """``(row of each sequence, its first slot in the row, rows, width)``: sequences of ``lengths`` packed whole
    into rows of width max(lengths), longest first, each into the open row it fills best (best-fit decreasing).
    Open rows are keyed by free room, so a call costs O(S · distinct rooms)."""
    width = max(max(lengths, default=0), 1)
    row_of, start_of = [0] * len(lengths), [0] * len(lengths)
    by_room: dict[int, list[int]] = {}  # free room → rows with that much room
    used: list[int] = []
    for s in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        n = lengths[s]
        if n == 0:
            continue
        room = min((r for r, rows in by_room.items() if r >= n and rows), default=None)
        row = by_room[room].pop() if room is not None else len(used)
        if room is None:
            used.append(0)
        row_of[s], start_of[s] = row, used[row]
        used[row] += n
        if used[row] < width:
            by_room.setdefault(width - used[row], []).append(row)
    return row_of, start_of, max(len(used), 1), width


def _version(t: Tensor) -> int:
    """The in-place version counter of ``t``; inference tensors (built under ``torch.inference_mode``) have none
    and cannot be modified in place outside it, so -1 stands for them."""
    return -1 if t.is_inference() else t._version


def packed_rows(cu_seqlens: Tensor, num_tokens: int, device: torch.device) -> PackedRows:
    """The row layout of the sequences bounded by ``cu_seqlens`` (int [S+1], 0 … ``num_tokens``).

    Cached on the ``cu_seqlens`` tensor itself (rebuilt if it was modified in place), so the layers of a tower
    share one build and one host sync (the S lengths).
    """
    cached = getattr(cu_seqlens, _CACHE_ATTR, None)
    if cached is not None and (cached.source_version, cached.device) == (_version(cu_seqlens), device):
        return cached
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"vision attention: cu_seqlens must be 1-D with at least 2 entries, got shape "
                         f"{tuple(cu_seqlens.shape)}")
    cu = cu_seqlens.to(device=device, dtype=torch.int64)
    lengths = cu[1:] - cu[:-1]
    host = torch.cat([cu[:1], lengths]).tolist()  # the one host sync
    if host[0] != 0 or sum(host[1:]) != num_tokens or min(host[1:]) < 0:
        raise ValueError(f"vision attention: cu_seqlens must rise from 0 to {num_tokens} (the tokens given), "
                         f"got {host[0]} … {host[0] + sum(host[1:])} with a smallest step of {min(host[1:])}")
    row_of, start_of, rows, width = pack_rows(host[1:])
    version = _version(cu_seqlens)
    if rows * width == num_tokens and rows == len(row_of):
        layout = PackedRows(rows, width, None, None, None, device, version)
    else:
        seq = torch.repeat_interleave(torch.arange(len(row_of), device=device), lengths, output_size=num_tokens)
        first_slot = torch.tensor(row_of, device=device) * width + torch.tensor(start_of, device=device)
        scatter = first_slot[seq] + torch.arange(num_tokens, device=device) - cu[seq]
        gather = torch.zeros(rows * width, dtype=torch.int64, device=device).index_copy_(
            0, scatter, torch.arange(num_tokens, device=device))
        owner = torch.full((rows * width,), -1, dtype=torch.int64, device=device).index_copy_(0, scatter, seq)
        owner = owner.view(rows, 1, width)
        one_per_row = sum(n > 0 for n in host[1:]) == rows
        mask = (owner >= 0).unsqueeze(1) if one_per_row else (owner.transpose(1, 2) == owner).unsqueeze(1)
        layout = PackedRows(rows, width, gather, scatter, mask, device, version)
    setattr(cu_seqlens, _CACHE_ATTR, layout)
    return layout


def packed_attention(query: Tensor, key: Tensor, value: Tensor, cu_seqlens: Tensor, scale: float,
                     dropout_p: float = 0.0) -> Tensor:
    """Bidirectional attention within each packed sequence, in one SDPA call.

    query, key, value: [N, heads, D] (N tokens, sequences back to back); cu_seqlens: int [S+1] with
    cu_seqlens[0] = 0 and cu_seqlens[-1] = N. Returns [N, heads, D] in the dtype of ``query``.
    """
    num_tokens, heads, dim = query.shape
    if key.shape != query.shape or value.shape != query.shape:
        raise ValueError(f"vision attention: q/k/v shapes differ: {tuple(query.shape)}, {tuple(key.shape)}, "
                         f"{tuple(value.shape)}")
    layout = packed_rows(cu_seqlens, num_tokens, query.device)
    R, L = layout.rows, layout.width

    def batch(x: Tensor) -> Tensor:
        x = x if layout.gather is None else x.index_select(0, layout.gather)
        return x.view(R, L, heads, dim).transpose(1, 2)

    out = F.scaled_dot_product_attention(batch(query), batch(key), batch(value), attn_mask=layout.mask,
                                         dropout_p=dropout_p, scale=scale)
    out = out.transpose(1, 2).reshape(R * L, heads, dim)
    return out if layout.scatter is None else out.index_select(0, layout.scatter)


class BatchedVisionAttention(Qwen2_5_VLVisionAttention):
    """``Qwen2_5_VLVisionAttention`` with one attention call per layer (module docstring); same weights, same
    output. Under flash attention it is HF's forward unchanged."""

    def forward(self, hidden_states: Tensor, cu_seqlens: Tensor,
                position_embeddings: Optional[tuple[Tensor, Tensor]] = None, max_seqlen: Optional[int] = None,
                **kwargs) -> Tensor:
        if is_flash_attention_requested(self.config):
            return super().forward(hidden_states, cu_seqlens, position_embeddings, max_seqlen, **kwargs)
        if position_embeddings is None:
            raise ValueError("vision attention: position_embeddings (cos, sin) are required")
        n = hidden_states.shape[0]
        query, key, value = self.qkv(hidden_states).reshape(n, 3, self.num_heads, -1).unbind(1)
        query, key = apply_rotary_pos_emb_vision(query, key, *position_embeddings)
        out = packed_attention(query, key, value, cu_seqlens, self.scaling,
                               self.attention_dropout if self.training else 0.0)
        return self.proj(out.reshape(n, -1))


def use_batched_vision_attention(model: nn.Module, enable: bool = True) -> nn.Module:
    """Switch every vision attention layer of ``model`` (any module holding a Qwen2.5-VL vision tower) to
    :class:`BatchedVisionAttention`, or back to HF's class with ``enable=False``, in place; returns ``model``.
    A model without one is a ValueError."""
    layers = [m for m in model.modules() if isinstance(m, Qwen2_5_VLVisionAttention)]
    if not layers:
        raise ValueError(f"use_batched_vision_attention: {type(model).__name__} has no Qwen2.5-VL vision attention")
    for layer in layers:
        layer.__class__ = BatchedVisionAttention if enable else Qwen2_5_VLVisionAttention
    return model


def uses_batched_vision_attention(model: nn.Module) -> bool:
    """Whether every vision attention layer of ``model`` makes one call per layer (False when it has none)."""
    layers = [m for m in model.modules() if isinstance(m, Qwen2_5_VLVisionAttention)]
    return bool(layers) and all(isinstance(m, BatchedVisionAttention) for m in layers)
