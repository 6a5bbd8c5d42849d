"""Frames → Qwen2.5-VL model inputs: pixel patches in the HF layout, expanded prompt ids, a left-padded batch.

Patch layout (``docs/video-decoding.md`` §2, identical to HF's Qwen2-VL image/video processors): frames
F[t, y, x, c] (uint8, H and W multiples of 28, T even) become ``pixel_values [N, 1176]`` with
N = grid_t·grid_h·grid_w, grid_t = T/2, grid_h = H/14, grid_w = W/14 and

    row r  = ((t·grid_h/2 + bh)·grid_w/2 + bw)·4 + mh·2 + mw        (2×2 merge windows, row-major)
    col k  = ((c·2 + dt)·14 + py)·14 + px                              (channel, time, patch row, patch col)
    value  = (F[2t+dt, (2bh+mh)·14+py, (2bw+mw)·14+px, c] / 255 − mean[c]) / std[c]     in float32

with the CLIP mean/std. An image is one temporal patch: its frame repeated twice, grid_t = 1, as HF does.

Prompts: the tokenizer's chat template renders each conversation (generation prompt on), the text is encoded
with ``add_special_tokens=False`` as Video-R1 does, and each ``<|video_pad|>`` / ``<|image_pad|>`` is expanded
to grid_t·grid_h·grid_w / merge² copies. ``mm_token_type_ids`` (0 text, 1 image, 2 video) are always filled:
transformers 5 computes M-RoPE positions only when they are passed and silently uses 1-D positions otherwise.
``second_per_grid_ts`` defaults to 1.0 for every video, what Video-R1's training effectively uses (it never
passes the sample fps); give per-video values (2 / sample_fps) for true timing.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Optional, Sequence, Union

import torch

from vr1fast.model.qwen import (CLIP_MEAN, CLIP_STD, IMAGE, IMAGE_PAD, MERGE_SIZE, PATCH_DIM, PATCH_SIZE,
                                TEMPORAL_PATCH_SIZE, TEXT, VIDEO, VIDEO_PAD)


def _check_frames(frames: torch.Tensor, name: str) -> None:
    if not isinstance(frames, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(frames).__name__}")
    if frames.dtype != torch.uint8 or frames.dim() != 4 or frames.shape[-1] != 3:
        raise ValueError(f"{name}: expected uint8 [T, H, W, 3], got {frames.dtype} {tuple(frames.shape)}")
    t, h, w, _ = frames.shape
    factor = PATCH_SIZE * MERGE_SIZE
    if h == 0 or w == 0 or h % factor or w % factor:
        raise ValueError(f"{name}: height and width must be positive multiples of {factor} (resize first, "
                         f"vr1fast.data.video.smart_resize), got H={h} W={w}")
    if t == 0 or t % TEMPORAL_PATCH_SIZE:
        raise ValueError(f"{name}: frame count must be a positive multiple of {TEMPORAL_PATCH_SIZE}, got T={t}")


def _patchify(frames: torch.Tensor) -> torch.Tensor:
    """uint8 [T, H, W, 3] (checked) → float32 [N, 1176] normalised patches in merge order."""
    t, h, w, c = frames.shape
    gt, bh, bw = t // TEMPORAL_PATCH_SIZE, h // (PATCH_SIZE * MERGE_SIZE), w // (PATCH_SIZE * MERGE_SIZE)
    x = frames.reshape(gt, TEMPORAL_PATCH_SIZE, bh, MERGE_SIZE, PATCH_SIZE, bw, MERGE_SIZE, PATCH_SIZE, c)
    # → [gt, bh, bw, mh, mw, C, dt, py, px]; the uint8 gather is 4× cheaper than gathering floats
    x = x.permute(0, 2, 5, 3, 6, 8, 1, 4, 7).reshape(-1, c, PATCH_DIM // c)
    mean = torch.tensor(CLIP_MEAN, dtype=torch.float32, device=x.device).view(1, c, 1)
    std = torch.tensor(CLIP_STD, dtype=torch.float32, device=x.device).view(1, c, 1)
    out = x.to(torch.float32)  # a fresh tensor: normalise in place, same rounding as (x / 255 - mean) / std
    return out.div_(255.0).sub_(mean).div_(std).reshape(-1, PATCH_DIM)


def video_to_patches(frames: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 [T, H, W, 3] frames (already resized) → (pixel_values float32 [N, 1176], grid_thw int64 [3]).

    N = T/2 · H/14 · W/14; the LLM sees N / 4 video tokens. Raises ValueError naming the bad dimension when
    T is odd or H, W are not multiples of 28 (odd T is padded by HF; qwen-vl-utils never produces it).
    """
    _check_frames(frames, "frames")
    t, h, w, _ = frames.shape
    grid = torch.tensor([t // TEMPORAL_PATCH_SIZE, h // PATCH_SIZE, w // PATCH_SIZE], dtype=torch.long)
    return _patchify(frames), grid


def image_to_patches(image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 [H, W, 3] image (already resized) → (pixel_values float32 [H/14·W/14, 1176], grid_thw [1, H/14, W/14]).

    The image fills both temporal slices of its single patch, as HF's Qwen2-VL image processor does.
    """
    if not isinstance(image, torch.Tensor) or image.dim() != 3 or image.dtype != torch.uint8 or image.shape[-1] != 3:
        desc = f"{image.dtype} {tuple(image.shape)}" if isinstance(image, torch.Tensor) else type(image).__name__
        raise ValueError(f"image: expected uint8 [H, W, 3], got {desc}")
    frames = image.unsqueeze(0).expand(TEMPORAL_PATCH_SIZE, *image.shape)
    _check_frames(frames, "image")
    return _patchify(frames), torch.tensor([1, image.shape[0] // PATCH_SIZE, image.shape[1] // PATCH_SIZE])


@dataclass(frozen=True)
class PromptBatch:
    """B left-padded prompts with their media, ready for ``Qwen2_5_VLForConditionalGeneration``.

    Media tensors are concatenated over the batch in row order (and in order of appearance within a row);
    a field is None when no prompt of the batch has that kind of media.
    """

    input_ids: torch.Tensor                      # int64 [B, L], left-padded with the tokenizer's pad id
    attention_mask: torch.Tensor                 # int64 [B, L], 0 on padding
    mm_token_type_ids: torch.Tensor              # int64 [B, L], 0 text/pad, 1 image pad, 2 video pad
    pixel_values_videos: Optional[torch.Tensor]  # float32 [ΣN_video, 1176]
    video_grid_thw: Optional[torch.Tensor]       # int64 [num_videos, 3]
    second_per_grid_ts: Optional[torch.Tensor]   # float32 [num_videos]
    pixel_values: Optional[torch.Tensor]         # float32 [ΣN_image, 1176]
    image_grid_thw: Optional[torch.Tensor]       # int64 [num_images, 3]

    def model_inputs(self) -> dict[str, torch.Tensor]:
        """The keyword arguments of HF ``forward`` / ``generate`` (None fields left out)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}

    def to(self, device: Union[str, torch.device]) -> "PromptBatch":
        moved = {k: (v.to(device) if v is not None else None) for k, v in vars(self).items()}
        return PromptBatch(**moved)

    @property
    def prompt_lengths(self) -> torch.Tensor:
        """int64 [B]: unpadded prompt lengths."""
        return self.attention_mask.sum(-1)


Media = Union[None, torch.Tensor, Sequence[torch.Tensor]]


def media_items(media: Media, row: int) -> list[torch.Tensor]:
    """One prompt's media as a list: a 4-D tensor is a video, a 3-D tensor an image."""
    items = [] if media is None else [media] if isinstance(media, torch.Tensor) else list(media)
    for item in items:
        if not isinstance(item, torch.Tensor) or item.dim() not in (3, 4):
            shape = tuple(item.shape) if isinstance(item, torch.Tensor) else type(item).__name__
            raise ValueError(f"prompt {row}: media must be uint8 [T,H,W,3] video or [H,W,3] image, got {shape}")
    return items


def _expand_row(ids: list[int], items: list[torch.Tensor], grids: list[torch.Tensor], video_id: int,
                image_id: int, row: int) -> tuple[list[int], list[int]]:
    """Replace the i-th media pad token by grid.prod() / merge² copies; returns (ids, mm_token_type_ids)."""
    out, types, k = [], [], 0
    for tok in ids:
        if tok not in (video_id, image_id):
            out.append(tok)
            types.append(TEXT)
            continue
        kind = VIDEO if tok == video_id else IMAGE
        if k >= len(items):
            raise ValueError(f"prompt {row}: the chat template has more media placeholders than the "
                             f"{len(items)} media given")
        if (items[k].dim() == 4) != (kind == VIDEO):
            given = "video" if items[k].dim() == 4 else "image"
            raise ValueError(f"prompt {row}: media {k} is a {given} but the text has "
                             f"{'<|video_pad|>' if kind == VIDEO else '<|image_pad|>'} there")
        n = int(grids[k].prod()) // MERGE_SIZE ** 2
        out.extend([tok] * n)
        types.extend([kind] * n)
        k += 1
    if k != len(items):
        raise ValueError(f"prompt {row}: {len(items)} media given but the text has {k} media placeholders")
    return out, types


def _left_pad(rows: list[list[int]], value: int, length: int) -> torch.Tensor:
    return torch.tensor([[value] * (length - len(r)) + r for r in rows], dtype=torch.long)


def build_prompt_batch(tokenizer, messages_list: Sequence[list[dict]], media_list: Sequence[Media], *,
                       second_per_grid_ts: Union[float, Sequence[float]] = 1.0,
                       pad_to: Optional[int] = None) -> PromptBatch:
    """Render, tokenise, expand and left-pad B conversations with their media into one PromptBatch.

    messages_list[i]: HF chat messages; media entries are ``{"type": "video"}`` / ``{"type": "image"}``.
    media_list[i]: None, a uint8 video [T,H,W,3] / image [H,W,3] tensor (already resized), or a list of them in
    the order they appear in the conversation. second_per_grid_ts: one value for every video, or one per video
    in batch order. pad_to: pad to at least this length (to align with another batch).
    """
    if len(messages_list) != len(media_list):
        raise ValueError(f"messages_list has {len(messages_list)} prompts but media_list has {len(media_list)}")
    if not messages_list:
        raise ValueError("messages_list is empty")
    video_id = tokenizer.convert_tokens_to_ids(VIDEO_PAD)
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_PAD)
    rows, types, videos, images = [], [], [], []
    for row, (messages, media) in enumerate(zip(messages_list, media_list)):
        items = media_items(media, row)
        try:
            patches = [video_to_patches(m) if m.dim() == 4 else image_to_patches(m) for m in items]
        except ValueError as e:
            raise ValueError(f"prompt {row}: {e}") from None
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids, tt = _expand_row(ids, items, [g for _, g in patches], video_id, image_id, row)
        rows.append(ids)
        types.append(tt)
        for m, p in zip(items, patches):
            (videos if m.dim() == 4 else images).append(p)
    length = max(max(len(r) for r in rows), pad_to or 0)
    spg = _seconds_per_grid(second_per_grid_ts, len(videos))
    return PromptBatch(
        input_ids=_left_pad(rows, tokenizer.pad_token_id, length),
        attention_mask=_left_pad([[1] * len(r) for r in rows], 0, length),
        mm_token_type_ids=_left_pad(types, TEXT, length),
        pixel_values_videos=torch.cat([p for p, _ in videos]) if videos else None,
        video_grid_thw=torch.stack([g for _, g in videos]) if videos else None,
        second_per_grid_ts=spg,
        pixel_values=torch.cat([p for p, _ in images]) if images else None,
        image_grid_thw=torch.stack([g for _, g in images]) if images else None,
    )


def _seconds_per_grid(value: Union[float, Sequence[float]], num_videos: int) -> Optional[torch.Tensor]:
    if num_videos == 0:
        return None
    if isinstance(value, (int, float)):
        return torch.full((num_videos,), float(value), dtype=torch.float32)
    values = torch.as_tensor(list(value), dtype=torch.float32)
    if values.shape != (num_videos,):
        raise ValueError(f"second_per_grid_ts: expected one value per video ({num_videos}), got {len(values)}")
    return values
