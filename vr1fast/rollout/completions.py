"""Engine-neutral rollout records: sampled completions, their lengths and masks, stop and pad ids, and the seeded-RNG
helper every rollout engine uses (``rollout.hf``, ``rollout.engine``).

A completion ends at its first stop token, which it includes; every id after it is the pad id. Rows are
prompt-major: row b·S + s is sample s of prompt b, as HF's ``num_return_sequences`` orders them.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, NamedTuple, Optional, Sequence, Union

import torch
from torch import Tensor


class Completions(NamedTuple):
    """Sampled completions, prompt-major: row b·S + s is sample s of prompt b (as ``num_return_sequences``)."""

    ids: Tensor        # int64 [B·S, L]; L = the longest completion; pad id after the first stop token
    lengths: Tensor    # int64 [B·S]: tokens up to and including the first stop token (L when there is none)
    logprobs: Optional[Tensor] = None  # float32 [B·S, L]: each sampled token's log-prob under log_softmax(z / T),
    # before top-k/top-p; 0 after each length. The paged engine fills it; the HF engine leaves None

    @property
    def mask(self) -> Tensor:
        """int64 [B·S, L]: 1 up to and including the first stop token."""
        return within(self.lengths, self.ids.shape[1]).long()


def within(lengths: Tensor, width: int) -> Tensor:
    """bool [N, width]: True at positions < lengths[n]."""
    return torch.arange(width, device=lengths.device)[None, :] < lengths[:, None]


@contextmanager
def seeded(seed: Optional[int], like: Tensor) -> Iterator[None]:
    """Seed a forked RNG (CPU, and ``like``'s GPU when it is on CUDA) for the block; no-op when seed is None."""
    with torch.random.fork_rng(devices=[like.device] if like.is_cuda else [], enabled=seed is not None):
        if seed is not None:
            torch.manual_seed(seed)
        yield


def _as_list(value: Union[int, Sequence[int], None]) -> list[int]:
    if value is None:
        return []
    return [int(value)] if isinstance(value, int) else [int(v) for v in value]


def stop_token_ids(model, eos_token_id: Union[int, Sequence[int], None] = None) -> list[int]:
    """The ids that end a completion: ``eos_token_id``, else the model's generation config, else its text config."""
    stops = _as_list(eos_token_id) or _as_list(getattr(model.generation_config, "eos_token_id", None))
    stops = stops or _as_list(model.config.get_text_config().eos_token_id)
    if not stops:
        raise ValueError("no EOS token id: pass eos_token_id or set model.generation_config.eos_token_id")
    return stops


def pad_token_id(model) -> int:
    pad = getattr(model.generation_config, "pad_token_id", None)
    pad = pad if pad is not None else model.config.get_text_config().pad_token_id
    if pad is None:
        raise ValueError("model has no pad_token_id in its generation or text config")
    return int(_as_list(pad)[0])


def completion_lengths(ids: Tensor, stops: Sequence[int]) -> Tensor:
    """int64 [N]: index of the first stop token + 1 per row, or L when a row has none."""
    is_stop = torch.isin(ids, torch.tensor(list(stops), device=ids.device))
    first = is_stop.int().argmax(dim=1)
    full = torch.full_like(first, ids.shape[1])
    return torch.where(is_stop.any(dim=1), first + 1, full).long()
