"""Policy / reference forwards over prompt + completion: hidden states on completion positions only.

Shapes: B prompts, G completions per prompt (prompt-major rows: row b·G + g is sample g of prompt b), P the
left-padded prompt length, L the completion length, H the hidden size, V the vocabulary.

``completion_hidden`` (the fast path) returns the final hidden states of the real completion tokens, packed
(completion after completion, no padding), and ``lm_head.weight`` [V, H], so the loss kernels never see prompt
positions and no logits over prompt + completion exist:
1. the vision tower runs once per prompt (``get_video_features`` / ``get_image_features``) and its outputs are
   scattered into the prompt's token embeddings [B, P, H] (:func:`prompt_embeds`);
2. ``share_prompt=True`` (the default): each group is laid out once, prompt ‖ completion₁ ‖ … ‖ completion_G,
   all groups in one packed row, under a mask that lets a completion see its prompt and its own earlier tokens
   (``model.shared``);
3. ``share_prompt=False``, :func:`repeated_hidden`: those embeddings are repeated per completion and the completion
   embeddings appended, [B·G, P+L], with mask = prompt mask ‖ completion mask; positions are those of the
   concatenated sequence (``get_rope_index`` on the prompt [3, B, P]; the prompt ends in text, so completion token
   k sits at (last prompt position) + 1 + k on all three axes, which is what ``get_rope_index`` gives over
   prompt + completion); the L positions that predict completion tokens (P-1 … P+L-2) are kept.
Both give the same hidden states (tests/model/test_shared.py).

``completion_rows`` wraps them in the record the head runs on (``CompletionRows``): hidden states, ids and
offsets, so that no head work is spent on the padding after each completion's end (docs/kernel-audit.md F3:
~40-50% of the head at Video-R1's lengths, mean ≈ 390 of 768).

``completion_logprobs_reference`` is Video-R1's path, the baseline the fast path is tested against: every
prompt input repeated G times (pixels too, so the vision tower runs G times), full logits, log-softmax and
gather, then the completion slice. Deviations from Video-R1: ``mm_token_type_ids`` is passed (transformers 5
uses 1-D positions without it), ``second_per_grid_ts`` is kept (Video-R1 deletes it before this forward, its
"bug" #73; with its default 1.0 the positions are equal), log-softmax runs in fp32 (``kernels.reference``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence, Union

import torch
from torch import Tensor

from vr1fast.model.qwen import IMAGE, VIDEO
from vr1fast.model.shared import shared_hidden
from vr1fast.kernels.reference import packed_positions, selective_log_softmax, to_device


def _require(inputs: Mapping[str, Tensor], key: str) -> Tensor:
    if inputs.get(key) is None:
        raise ValueError(f"model inputs lack {key!r} (transformers 5 needs mm_token_type_ids for M-RoPE; "
                         f"build inputs with vr1fast.data.processor)")
    return inputs[key]


def _check_completions(inputs: Mapping[str, Tensor], completion_ids: Tensor, completion_mask: Tensor,
                       num_samples: int) -> None:
    batch = inputs["input_ids"].shape[0]
    if completion_ids.shape != completion_mask.shape or completion_ids.shape[0] != batch * num_samples:
        raise ValueError(f"completion_ids {tuple(completion_ids.shape)} / completion_mask "
                         f"{tuple(completion_mask.shape)} must both be [B·G, L] = [{batch}·{num_samples}, L]")
    if (_require(inputs, "mm_token_type_ids")[:, -1] != 0).any():
        raise ValueError("every prompt must end in a text token (the chat template's generation prompt)")


def prompt_embeds(model, inputs: Mapping[str, Tensor]) -> Tensor:
    """Token embeddings of the prompts with the vision features in place of the media pads: [B, P, H]."""
    ids = inputs["input_ids"]
    inner = model.model
    embeds = model.get_input_embeddings()(ids)
    for kind, pixels, grid in (("image", "pixel_values", "image_grid_thw"),
                               ("video", "pixel_values_videos", "video_grid_thw")):
        if inputs.get(pixels) is None:
            continue
        encode = inner.get_image_features if kind == "image" else inner.get_video_features
        feats = torch.cat(encode(inputs[pixels], inputs[grid], return_dict=True).pooler_output)
        feats = feats.to(embeds.device, embeds.dtype)
        masks = inner.get_placeholder_mask(ids, embeds, **{f"{kind}_features": feats})
        embeds = embeds.masked_scatter(masks[0] if kind == "image" else masks[1], feats)
    return embeds


def prompt_positions(model, inputs: Mapping[str, Tensor]) -> Tensor:
    """M-RoPE positions of the left-padded prompts, [3, B, P], as HF's ``get_rope_index`` (padding positions are
    filler: 1 under Video-R1 positions, 0 under 5.x)."""
    positions, _ = model.model.get_rope_index(
        inputs["input_ids"], _require(inputs, "mm_token_type_ids"), image_grid_thw=inputs.get("image_grid_thw"),
        video_grid_thw=inputs.get("video_grid_thw"), second_per_grid_ts=inputs.get("second_per_grid_ts"),
        attention_mask=inputs.get("attention_mask"))
    return positions


def sequence_positions(prompt_pos: Tensor, num_samples: int, completion_len: int) -> Tensor:
    """Positions of prompt ‖ completion for every sample: [3, B·G, P+L].

    Completion token k of a prompt whose last (text) token sits at p gets position p + 1 + k on all axes.
    """
    last = prompt_pos[0, :, -1]                                               # [B]
    steps = torch.arange(1, completion_len + 1, device=prompt_pos.device)
    completion = (last[:, None] + steps).unsqueeze(0).expand(3, -1, -1)      # [3, B, L]
    full = torch.cat([prompt_pos, completion.to(prompt_pos.dtype)], dim=2)
    return full.repeat_interleave(num_samples, dim=1)


def repeated_hidden(model, inputs: Mapping[str, Tensor], completion_ids: Tensor, completion_mask: Tensor, *,
                    num_samples: int) -> tuple[Tensor, Tensor]:
    """The repeated layout: final-norm hidden states [B·G, L, H] that predict the completion tokens, and the LM
    head weight.

    inputs: the PromptBatch model inputs of B prompts; completion_ids, completion_mask: [B·G, L] prompt-major.
    ``hidden[i, k] @ weight.T`` are the logits of completion token k of row i (positions past the mask are
    computed but meaningless). Media pad tokens sampled into a completion are plain tokens here (HF's full
    forward would count them as placeholders and fail).
    """
    _check_completions(inputs, completion_ids, completion_mask, num_samples)
    prompt_len, completion_len = inputs["input_ids"].shape[1], completion_ids.shape[1]
    embeds = prompt_embeds(model, inputs).repeat_interleave(num_samples, dim=0)
    embeds = torch.cat([embeds, model.get_input_embeddings()(completion_ids)], dim=1)
    mask = torch.cat([inputs["attention_mask"].repeat_interleave(num_samples, dim=0),
                      completion_mask.to(inputs["attention_mask"].dtype)], dim=1)
    positions = sequence_positions(prompt_positions(model, inputs), num_samples, completion_len)
    out = model.model.language_model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions,
                                     use_cache=False)
    hidden = out.last_hidden_state[:, prompt_len - 1: prompt_len + completion_len - 1]
    return hidden, model.lm_head.weight


def _lengths_of(completion_ids: Tensor, completion_mask: Tensor) -> list[int]:
    """Host lengths of prefix masks (1 … 1 0 … 0 per row), or a ValueError."""
    mask = completion_mask.bool()
    n = mask.sum(1)
    prefix = torch.arange(mask.shape[1], device=mask.device)[None, :] < n[:, None]
    if not torch.equal(prefix, mask):
        raise ValueError("completion_mask must be a prefix mask (each row 1 … 1 then 0 … 0: the tokens up to and "
                         "including the first EOS)")
    return n.tolist()


def _packed_hidden(model, inputs: Mapping[str, Tensor], completion_ids: Tensor, lengths: Tensor, *,
                   num_samples: int, share_prompt: bool) -> Tensor:
    """Hidden states [N, H] of the first ``lengths[i]`` tokens of each completion, completion after completion."""
    offsets = offsets_of(lengths)
    if share_prompt:
        mask = to_device((torch.arange(completion_ids.shape[1])[None, :] < lengths[:, None]).long(),
                         completion_ids.device)
        _check_completions(inputs, completion_ids, mask, num_samples)
        return shared_hidden(model, prompt_embeds(model, inputs), prompt_positions(model, inputs), inputs,
                             completion_ids, lengths.tolist(), num_samples=num_samples)
    pos, width = packed_positions(offsets, completion_ids.shape[1])
    mask = to_device((torch.arange(width)[None, :] < lengths[:, None]).long(), completion_ids.device)
    hidden, _ = repeated_hidden(model, inputs, completion_ids, mask, num_samples=num_samples)
    return hidden.reshape(-1, hidden.shape[-1])[to_device(pos, hidden.device)]


def completion_hidden(model, inputs: Mapping[str, Tensor], completion_ids: Tensor, completion_mask: Tensor, *,
                      num_samples: int, share_prompt: bool = True) -> tuple[Tensor, Tensor]:
    """Final-norm hidden states of the real completion tokens, packed, and the LM head weight.

    inputs: the PromptBatch model inputs of B prompts; completion_ids, completion_mask: [B·G, L] prompt-major,
    the mask a prefix mask (l_i ones, then zeros). Returns ``(hidden [N, H], lm_head.weight [V, H])`` with
    N = Σ l_i: rows ``o_i … o_i + l_i − 1`` (o = the cumulative lengths, ``offsets_of``) hold completion i's
    tokens 0 … l_i − 1, and ``hidden[o_i + k] @ weight.T`` are the logits of its token k. ``share_prompt=True``
    computes each prompt once per group (``model.shared``); ``False`` runs the repeated layout
    (:func:`repeated_hidden`). The vision tower runs once per prompt either way.
    """
    lengths = torch.tensor(_lengths_of(completion_ids, completion_mask), dtype=torch.int64)
    hidden = _packed_hidden(model, inputs, completion_ids, lengths, num_samples=num_samples,
                            share_prompt=share_prompt)
    return hidden, model.lm_head.weight


@dataclass(frozen=True)
class CompletionRows:
    """The completion tokens of B·G completions, packed (real tokens only, completion after completion)."""

    hidden: Tensor   # [N, H] final-norm hidden states; row r predicts ids[r]; N = Σ lengths
    ids: Tensor      # [N] completion token ids
    offsets: Tensor  # int64 [B·G + 1] on the CPU: completion i is rows offsets[i]:offsets[i+1]
    weight: Tensor   # lm_head.weight [V, H]


def offsets_of(lengths: Union[Sequence[int], Tensor]) -> Tensor:
    """Cumulative starts [len(lengths) + 1] (CPU int64) of sequences of the given lengths."""
    n = torch.as_tensor(lengths, dtype=torch.int64).cpu()
    return torch.cat([n.new_zeros(1), n.cumsum(0)])


def completion_rows(model, inputs: Mapping[str, Tensor], completion_ids: Tensor,
                    lengths: Union[Sequence[int], Tensor], *, num_samples: int,
                    share_prompt: bool = True) -> CompletionRows:
    """The record the head runs on: the hidden states (``completion_hidden``) and ids of the first ``lengths[i]``
    tokens of each completion, with their offsets. ``lengths`` on the host (a list, or a CPU tensor: a CUDA one
    costs a sync)."""
    offsets = offsets_of(lengths)
    n = offsets[1:] - offsets[:-1]
    if n.numel() != completion_ids.shape[0] or (n < 0).any() or (n > completion_ids.shape[1]).any():
        raise ValueError(f"completion lengths {n.tolist()} do not fit completion_ids {tuple(completion_ids.shape)} "
                         f"(one per row, 0 ≤ length ≤ its width)")
    hidden = _packed_hidden(model, inputs, completion_ids, n, num_samples=num_samples, share_prompt=share_prompt)
    pos, _ = packed_positions(offsets, completion_ids.shape[1])
    ids = completion_ids.reshape(-1)[to_device(pos, completion_ids.device)]
    return CompletionRows(hidden, ids, offsets, model.lm_head.weight)


def _per_prompt_counts(mm_types: Tensor, kind: int) -> list[int]:
    """Number of media items of ``kind`` in each prompt row (runs of that type id)."""
    is_kind = (mm_types == kind).int()
    starts = is_kind[:, 1:] > is_kind[:, :-1]
    return (starts.sum(1) + is_kind[:, 0]).tolist()


def expand_prompts(inputs: Mapping[str, Tensor], num_samples: int) -> dict[str, Tensor]:
    """Every prompt input repeated G times, prompt-major, media included (Video-R1's ``repeat`` for B > 1)."""
    G = num_samples
    out = {k: v.repeat_interleave(G, dim=0) for k, v in inputs.items()
           if k in ("input_ids", "attention_mask", "mm_token_type_ids")}
    for kind, pixels, grid, extra in ((IMAGE, "pixel_values", "image_grid_thw", None),
                                      (VIDEO, "pixel_values_videos", "video_grid_thw", "second_per_grid_ts")):
        if inputs.get(grid) is None:
            continue
        counts = _per_prompt_counts(inputs["mm_token_type_ids"], kind)
        grids = inputs[grid].split(counts)
        rows = inputs[pixels].split([int(g.prod(-1).sum()) for g in grids])
        out[grid] = torch.cat([g for g in grids for _ in range(G)])
        out[pixels] = torch.cat([r for r in rows for _ in range(G)])
        if inputs.get(extra) is not None:
            out[extra] = torch.cat([s for s in inputs[extra].split(counts) for _ in range(G)])
    return out


def completion_logprobs_reference(model, inputs: Mapping[str, Tensor], completion_ids: Tensor,
                                  completion_mask: Tensor, *, num_samples: int, temperature: float = 1.0) -> Tensor:
    """Video-R1's per-token log-probs of the completions: fp32 [B·G, L] (the mask is not applied).

    Runs the full model on the G-times repeated prompt + completion and takes
    ``log_softmax(logits[:, P-1:-1] / T)`` gathered at the completion ids.
    """
    _check_completions(inputs, completion_ids, completion_mask, num_samples)
    rep = expand_prompts(inputs, num_samples)
    prompt_len = inputs["input_ids"].shape[1]
    rep["input_ids"] = torch.cat([rep["input_ids"], completion_ids], dim=1)
    rep["attention_mask"] = torch.cat([rep["attention_mask"], completion_mask.to(rep["attention_mask"].dtype)], 1)
    rep["mm_token_type_ids"] = torch.cat([rep["mm_token_type_ids"], torch.zeros_like(completion_ids)], dim=1)
    logits = model(**rep, use_cache=False).logits[:, prompt_len - 1: -1]
    return selective_log_softmax(logits, completion_ids, temperature)
