"""M-RoPE positions as Video-R1 trained with them (transformers 4.49/4.50), bound onto a transformers-5 model.

Qwen2.5-VL gives every token a position on three axes (t, h, w). Per prompt row (padding removed), with a running
start ``s`` (0 at the first token) and the tokens split into runs of ``mm_token_type_ids`` (0 text, 1 image,
2 video):

- text run of n tokens: ``s, s+1, …, s+n-1`` on all three axes; then ``s += n``;
- vision item with grid (T, H, W), merge m (2), gh = H/m, gw = W/m; token (g, i, j) in raster order gets
  ``t = s + ⌊(g · spg) · tps⌋`` (float product of ``g · spg`` first, then ``· tps``, truncated by ``.long()``),
  ``h = s + i``, ``w = s + j``; tps = ``vision_config.tokens_per_second`` (2); spg = ``second_per_grid_ts[v]``
  for the v-th video of the batch (1.0 when None), **0 for images**. Then
  **``s = max over the item's (t, h, w) + 1``** — the temporal axis included.

``mrope_position_deltas[b] = max position of row b + 1 − (real tokens of row b)``, shape [B, 1] (int64): the
next token of row b sits at ``(real tokens so far) + delta`` on all axes, which is how transformers 5 reads it
(``compute_3d_position_ids`` adds it to the attention-mask cumsum; ``generate`` instead extends the returned
positions by +1 per step, the same values). Padding positions are 1 (as 4.x); they reach no real token.

This is deliberate parity with the transformers build Video-R1 trained on. transformers 5 (5.23 here) differs:

1. after a vision item it sets ``s += max(gh, gw)``, ignoring the temporal extent, so text after a video whose
   last t offset ``⌊(T-1)·spg·tps⌋`` reaches ``max(gh, gw)`` starts lower (16 frames of 640×480, resized to
   280×364, at spg 1.0: offsets t 0…14, h 0…9, w 0…12, so 4.x resumes at s+15 and 5.x at s+13; 1280×720 →
   224×420 gives w 0…14 and no shift; 64 eval frames: t 0…62);
2. it computes ``t = ⌊g · (tps · spg)⌋``: the same values whenever tps is a power of two (Qwen2.5-VL's 2);
3. images get ``t = s + g`` (time interval 1) instead of ``s`` — equal, since an image grid has T = 1;
4. padding positions are 0, not 1; and its delta is taken against the real (unpadded) length, where 4.x used
   the padded length together with ``cache_position`` — we return 5.x's convention, so both give the same
   decode positions;
5. media are found from ``mm_token_type_ids`` runs (ours too) instead of the token after ``<|vision_start|>``.

``use_rope_positions(model, "videor1")`` binds :func:`videor1_rope_index` as an instance attribute on the inner
``model.model``, so HF ``generate``, the full forward and ``vr1fast.model.forward`` all read the same positions;
``copy.deepcopy`` re-binds it to the copy, and ``save_pretrained`` never sees it.
"""
from __future__ import annotations

import itertools
import types
from typing import Iterator, Literal, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from vr1fast.model.qwen import IMAGE, TEXT, VIDEO

RopePositions = Literal["videor1", "transformers"]


def _vision_positions(grid: Tensor, start: int, merge: int, seconds: Union[float, Tensor], tps: int,
                      device: torch.device) -> Tensor:
    """[3, T·gh·gw] positions of one vision item starting at ``start`` (4.x rule, see the module docstring)."""
    T, H, W = (int(x) for x in grid.tolist())
    gh, gw = H // merge, W // merge
    t = (torch.arange(T, device=device) * seconds * tps).long()
    t = t.repeat_interleave(gh * gw)
    h = torch.arange(gh, device=device).repeat_interleave(gw).repeat(T)
    w = torch.arange(gw, device=device).repeat(T * gh)
    return torch.stack([t, h, w]) + start


def _row_positions(types_row: list[int], grids: dict[int, Iterator[Tensor]], seconds: Iterator, merge: int, tps: int,
                   row: int, device: torch.device) -> Tensor:
    """[3, n] positions of one unpadded row; consumes its grids (and video seconds) from the shared iterators."""
    blocks, start = [], 0
    for kind, run in itertools.groupby(types_row):
        n = len(list(run))
        if kind == TEXT:
            blocks.append(torch.arange(start, start + n, device=device).expand(3, -1))
            start += n
            continue
        while n > 0:  # adjacent items of one kind form one run: split it by their grids
            grid = next(grids[kind], None)
            if grid is None:
                raise ValueError(f"get_rope_index: row {row} has more {'video' if kind == VIDEO else 'image'} "
                                 f"tokens than the grids given")
            spg = next(seconds) if kind == VIDEO else 0
            block = _vision_positions(grid, start, merge, spg, tps, device)
            if block.shape[1] > n:
                raise ValueError(f"get_rope_index: row {row}: grid {grid.tolist()} needs {block.shape[1]} "
                                 f"tokens but its run has {n}")
            blocks.append(block)
            start = int(block.max()) + 1
            n -= block.shape[1]
    return torch.cat(blocks, dim=1) if blocks else torch.zeros(3, 0, dtype=torch.long, device=device)


def _seconds_iter(second_per_grid_ts: Union[None, Tensor, Sequence[float]], num_videos: int) -> Iterator:
    """Per-video seconds per temporal grid: 0-d tensors of the given dtype (4.x math), or 1.0 when None."""
    if second_per_grid_ts is None:
        return itertools.repeat(1.0)
    values = second_per_grid_ts if isinstance(second_per_grid_ts, Tensor) else torch.as_tensor(second_per_grid_ts)
    if values.numel() != num_videos:
        raise ValueError(f"get_rope_index: second_per_grid_ts has {values.numel()} values for {num_videos} videos")
    return iter(values.reshape(-1))


def videor1_rope_index(self, input_ids: Tensor, mm_token_type_ids: Tensor, image_grid_thw: Optional[Tensor] = None,
                       video_grid_thw: Optional[Tensor] = None, second_per_grid_ts: Optional[Tensor] = None,
                       attention_mask: Optional[Tensor] = None, **kwargs) -> tuple[Tensor, Tensor]:
    """Video-R1's (transformers 4.x) M-RoPE positions with transformers 5's signature and return convention.

    ``self``: the inner ``Qwen2_5_VLModel`` (``model.model``). input_ids, mm_token_type_ids, attention_mask:
    [B, L]; image_grid_thw [num_images, 3], video_grid_thw [num_videos, 3] over the batch in row order;
    second_per_grid_ts [num_videos]. Returns ``(position_ids int64 [3, B, L], mrope_position_deltas int64
    [B, 1])``; extra keyword arguments (``generate`` passes all model kwargs) are ignored.
    """
    merge = self.config.vision_config.spatial_merge_size
    tps = self.config.vision_config.tokens_per_second
    device = input_ids.device
    B, L = input_ids.shape
    mask = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    num_videos = 0 if video_grid_thw is None else video_grid_thw.shape[0]
    grids = {IMAGE: iter(image_grid_thw if image_grid_thw is not None else ()),
             VIDEO: iter(video_grid_thw if video_grid_thw is not None else ())}
    seconds = _seconds_iter(second_per_grid_ts, num_videos)
    position_ids = torch.ones(3, B, L, dtype=torch.long, device=device)
    deltas = []
    for b in range(B):
        row_mask = mask[b].to(device)
        positions = _row_positions(mm_token_type_ids[b][row_mask].tolist(), grids, seconds, merge, tps, b, device)
        position_ids[:, b, row_mask] = positions
        deltas.append((int(positions.max()) + 1 if positions.numel() else 0) - positions.shape[1])
    return position_ids, torch.tensor(deltas, dtype=torch.long, device=device).unsqueeze(1)


def use_rope_positions(model: nn.Module, mode: RopePositions = "videor1") -> nn.Module:
    """Choose the M-RoPE positions of a Qwen2.5-VL model in place; returns ``model``.

    ``model``: ``Qwen2_5_VLForConditionalGeneration`` (or its inner ``Qwen2_5_VLModel``). "videor1" binds
    :func:`videor1_rope_index` on the inner model's ``get_rope_index`` (Video-R1's transformers 4.x positions);
    "transformers" removes that binding, leaving the installed method.
    """
    inner = model.model if hasattr(model, "lm_head") else model
    if not hasattr(type(inner), "get_rope_index"):
        raise ValueError(f"use_rope_positions: {type(inner).__name__} has no get_rope_index (not a Qwen2.5-VL)")
    if mode == "videor1":
        inner.get_rope_index = types.MethodType(videor1_rope_index, inner)
    elif mode == "transformers":
        inner.__dict__.pop("get_rope_index", None)
    else:
        raise ValueError(f"rope_positions: unknown mode {mode!r} (expected 'videor1' or 'transformers')")
    return model


def rope_positions_mode(model: nn.Module) -> RopePositions:
    """The mode ``use_rope_positions`` left on ``model``: "videor1" or "transformers"."""
    inner = model.model if hasattr(model, "lm_head") else model
    bound = inner.__dict__.get("get_rope_index")
    return "videor1" if getattr(bound, "__func__", None) is videor1_rope_index else "transformers"
