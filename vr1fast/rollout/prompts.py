"""The paged engine's prompts: left-padded model inputs packed for one prefill (``Prompts``: real tokens only, their
input embeddings with the vision features in place and their M-RoPE positions), and the shuffled prompts of a T-GRPO
pair, which reuse the ordered prompts' vision output when the shuffle moves whole temporal groups
(``reuse_vision``; ``docs/kv-sharing.md`` §2.3)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Optional, Sequence

import torch
from torch import Tensor, nn

from vr1fast.data.shuffle import pair_permutation
from vr1fast.kernels.reference import to_device
from vr1fast.model.forward import prompt_embeds, prompt_positions
from vr1fast.model.qwen import TEXT, VIDEO


@dataclass(frozen=True)
class Prompts:
    """Prompts packed for the prefill: their real tokens one after the other, and samples to draw per prompt."""

    embeds: Tensor               # [N, H] input embeddings, vision features in place
    positions: Tensor            # [3, N] M-RoPE positions
    lengths: tuple[int, ...]     # real tokens of each prompt; Σ = N
    samples: tuple[int, ...]     # completions per prompt

    def __add__(self, other: "Prompts") -> "Prompts":
        return Prompts(torch.cat([self.embeds, other.embeds]), torch.cat([self.positions, other.positions], 1),
                       self.lengths + other.lengths, self.samples + other.samples)


def prompt_lengths(inputs: Mapping[str, Tensor]) -> tuple[int, ...]:
    """Real tokens per left-padded prompt (one read of the attention mask); every prompt must end in text."""
    types = inputs.get("mm_token_type_ids")
    if types is not None and (types[:, -1] != TEXT).any():
        raise ValueError("every prompt must end in a text token (the chat template's generation prompt)")
    return tuple(inputs["attention_mask"].sum(1).tolist())


def pack_prompts(model: nn.Module, inputs: Mapping[str, Tensor], num_samples: int) -> Prompts:
    """The vision encoder once per prompt, then the real tokens packed: ``Prompts`` of ``inputs``' B prompts."""
    real = inputs["attention_mask"].bool()
    lengths = prompt_lengths(inputs)
    return Prompts(prompt_embeds(model, inputs)[real], prompt_positions(model, inputs)[:, real], lengths,
                   (num_samples,) * len(lengths))


def _group_permutations(permutations: Optional[Sequence[Tensor]]) -> Optional[list[Tensor]]:
    """The 2-frame-group permutation of every video, or None unless every one moves whole groups."""
    if not permutations:
        return None
    groups = [pair_permutation(p.cpu()) for p in permutations]
    return None if any(q is None for q in groups) else groups


def reuse_vision(model: nn.Module, ordered: Prompts, inputs: Mapping[str, Tensor], video_rows: Sequence[int],
                 groups: Sequence[Tensor], num_samples: int) -> Optional[Prompts]:
    """The shuffled prompts of a pair shuffle from the ordered ones, with no second vision pass: prompt r's
    embeddings with each video's temporal-group blocks permuted (shuffled group g holds ordered group q[g]; the
    ViT never mixes groups, ``docs/kv-sharing.md`` §2.3) and its positions as they are (M-RoPE ignores pixels).
    None when a video's grid does not match its permutation (the caller then runs the vision pass)."""
    merge = model.config.vision_config.spatial_merge_size ** 2
    offsets = torch.tensor([0, *ordered.lengths]).cumsum(0).tolist()
    types = inputs["mm_token_type_ids"][inputs["attention_mask"].bool()].cpu()
    grids = inputs["video_grid_thw"].cpu().tolist()
    embed_rows, position_rows, video = [], [], 0
    for r in video_rows:
        base = torch.arange(offsets[r], offsets[r + 1])
        where = (types[offsets[r]:offsets[r + 1]] == VIDEO).nonzero()[:, 0]
        index, used = base.clone(), 0
        while used < where.numel():
            t, h, w = grids[video]
            if groups[video].numel() != t:
                return None
            block = where[used: used + t * h * w // merge].reshape(t, -1)
            index[block.reshape(-1)] = base[block[groups[video]].reshape(-1)]
            used, video = used + block.numel(), video + 1
        embed_rows.append(index)
        position_rows.append(base)
    if video != len(groups):
        raise ValueError(f"reuse_vision: {len(groups)} permutations for the {video} videos of rows {list(video_rows)}")
    device = ordered.embeds.device
    return Prompts(ordered.embeds[to_device(torch.cat(embed_rows), device)],
                   ordered.positions[:, to_device(torch.cat(position_rows), device)],
                   tuple(ordered.lengths[r] for r in video_rows), (num_samples,) * len(video_rows))


def shuffled_prompts(model: nn.Module, first: Prompts, ordered: Mapping[str, Tensor],
                      shuffled: Mapping[str, Tensor], num_shuffled: int, video_rows: Optional[Sequence[int]],
                      permutations: Optional[Sequence[Tensor]]) -> Prompts:
    groups = _group_permutations(permutations)
    if groups is not None and video_rows is not None:
        if prompt_lengths(shuffled) != tuple(first.lengths[r] for r in video_rows):
            raise ValueError(f"shuffled prompts' lengths differ from the ordered rows {list(video_rows)}: not a "
                             f"shuffle pair")
        second = reuse_vision(model, first, ordered, video_rows, groups, num_shuffled)
        if second is not None:
            return second
    return pack_prompts(model, shuffled, num_shuffled)
