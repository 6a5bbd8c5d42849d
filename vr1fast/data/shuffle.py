"""Frame shuffles for T-GRPO's contrastive branch, and ordered + shuffled prompt batches that share their text.

Video-R1 draws ``torch.randperm(T)`` over single frames once per prompt and step, and runs the processor again,
which re-pairs the shuffled frames into 2-frame temporal patches (``mode="frame"``, the default). ``mode="pair"``
permutes whole 2-frame groups instead, so each temporal patch keeps its two frames in order and the vision
encoder's output for the shuffled video is a block permutation of the ordered one (the ViT never mixes temporal
groups; ``docs/kv-sharing.md`` §2.3).

Deliberate deviation from Video-R1: ``randperm`` returns the identity with probability 1/T! (1/24 for 4 frames;
1/2 for 2 frames), in which case Video-R1's "shuffled" branch sees the ordered video and the temporal bonus
compares a video with itself. Here the permutation is re-drawn until it is not the identity
(``allow_identity=True`` restores Video-R1's draw). This samples uniformly among the non-identity permutations.
A pair shuffle of a 2-frame video (one group) has no non-identity pair permutation; it swaps the two frames.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional, Sequence, Union

import torch

from vr1fast.data.processor import Media, PromptBatch, media_items, build_prompt_batch

ShuffleMode = Literal["frame", "pair"]


def _non_identity_perm(n: int, generator: torch.Generator, allow_identity: bool) -> torch.Tensor:
    identity = torch.arange(n)
    perm = torch.randperm(n, generator=generator)
    while n >= 2 and not allow_identity and torch.equal(perm, identity):
        perm = torch.randperm(n, generator=generator)
    return perm


def shuffle_frames(frames: torch.Tensor, generator: torch.Generator, mode: ShuffleMode = "frame",
                   allow_identity: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Permute the frames of one video → (frames[perm], perm int64 [T] on the CPU).

    frames: [T, ...] (uint8 [T, H, W, 3] in the pipeline), any device. generator: a CPU ``torch.Generator``,
    one draw per prompt per step. mode "frame": perm is a random permutation of T frames; "pair": perm maps
    2-frame groups, perm = [2q_0, 2q_0+1, 2q_1, 2q_1+1, ...] for a random permutation q of T/2 groups (T even).
    Unless allow_identity, perm is never the identity when T ≥ 2 (see the module docstring).
    """
    if mode not in ("frame", "pair"):
        raise ValueError(f"shuffle mode must be 'frame' or 'pair', got {mode!r}")
    t = frames.shape[0]
    if mode == "pair" and t % 2:
        raise ValueError(f"frames: pair shuffle needs an even frame count, got T={t}")
    if mode == "frame" or t < 4:
        perm = _non_identity_perm(t, generator, allow_identity)
    else:
        groups = _non_identity_perm(t // 2, generator, allow_identity)
        perm = (2 * groups[:, None] + torch.arange(2)).reshape(-1)
    return frames[perm.to(frames.device)], perm


def pair_permutation(perm: torch.Tensor) -> Optional[torch.Tensor]:
    """The group permutation q of a frame permutation that moves whole 2-frame groups, else None.

    Shuffled temporal patch g holds ordered patch q[g], so vision features can be reused as ``feat[q]``.
    """
    if perm.numel() % 2:
        return None
    pairs = perm.reshape(-1, 2)
    q = pairs[:, 0] // 2
    if not torch.equal(pairs[:, 0], 2 * q) or not torch.equal(pairs[:, 1], 2 * q + 1):
        return None
    return q


@dataclass(frozen=True)
class ShufflePair:
    """An ordered batch and its shuffled counterpart for the video prompts.

    ``shuffled`` holds only the rows of ``ordered`` listed in ``video_rows`` (prompts with at least one video),
    padded to the same length, so ``shuffled.input_ids == ordered.input_ids[video_rows]`` and the attention
    masks, grids, second_per_grid_ts and M-RoPE positions match too; only the video pixels differ.
    """

    ordered: PromptBatch
    shuffled: Optional[PromptBatch]           # None when the batch has no video
    video_rows: tuple[int, ...]               # rows of `ordered` that `shuffled` rows come from, in order
    permutations: tuple[torch.Tensor, ...]    # frame permutation of each video, in batch video order


def build_shuffle_pair(tokenizer, messages_list: Sequence[list[dict]], media_list: Sequence[Media],
                       generator: torch.Generator, *, mode: ShuffleMode = "frame", allow_identity: bool = False,
                       second_per_grid_ts: Union[float, Sequence[float]] = 1.0) -> ShufflePair:
    """Build the ordered PromptBatch of all prompts and the shuffled one of the video prompts (same text).

    Arguments as ``build_prompt_batch``; each video gets its own permutation from ``generator``, drawn in batch
    order. Images inside a video prompt are kept as they are.
    """
    ordered = build_prompt_batch(tokenizer, messages_list, media_list, second_per_grid_ts=second_per_grid_ts)
    rows, shuffled_media, perms = [], [], []
    for row, media in enumerate(media_list):
        items = media_items(media, row)
        if not any(m.dim() == 4 for m in items):
            continue
        new_items = []
        for m in items:
            if m.dim() == 4:
                m, perm = shuffle_frames(m, generator, mode, allow_identity)
                perms.append(perm)
            new_items.append(m)
        rows.append(row)
        shuffled_media.append(new_items)
    if not rows:
        return ShufflePair(ordered, None, (), ())
    shuffled = build_prompt_batch(tokenizer, [messages_list[r] for r in rows], shuffled_media,
                                  second_per_grid_ts=second_per_grid_ts, pad_to=ordered.input_ids.shape[1])
    return ShufflePair(ordered, shuffled, tuple(rows), tuple(perms))
