"""Next-token sampling on the device, HF's filters and boundaries, no host sync (gpt-fast's sampler).

For next-token logits z [S, V] of S running samples (math in fp32, fp64 for fp64 logits, as HF's ``generate``
casts logits to fp32 before its warpers):
1. temperature: s = z / T;
2. top-k (k > 0): drop every token whose s is below the k-th largest s (ties with it are kept, so more than k
   tokens may stay), as ``TopKLogitsWarper``;
3. top-p (p < 1): sort s ascending (``torch.sort``, as HF, so tied tokens fall in the same order), drop the tokens
   while the cumulative softmax mass is ≤ 1 − p, always keeping the largest, as ``TopPLogitsWarper``;
4. sample from softmax over what is left: argmax of π / E with E ~ Exp(1) drawn from ``generator`` (the
   exponential race: the same distribution as ``torch.multinomial`` without its host sync); greedy = argmax z.
Dropped tokens get −inf, so their probability is exactly 0. The log-prob returned with each token is
log_softmax(z / T) at it, the temperature-scaled distribution *before* top-k/top-p truncation: what the trainer
recomputes (``kernels.selective_log_softmax`` at the same temperature), so their gap measures engine drift
(greedy too reports it at ``temperature``).

Randomness: one ``torch.Generator`` on the logits' device for the whole batch (one [S, V] draw per step), seeded
by the caller from (seed, step, rank); ``None`` draws from torch's global RNG as HF ``generate`` does. The draws
depend on S, so a run is reproducible for a fixed batch, not per sample across batch layouts. Nothing here reads a
value back to the host (no ``.item()``, ``.tolist()``, data-dependent shapes), so a decode step stays
asynchronous and capturable.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


def check_sampling(temperature: float, top_k: int, top_p: float) -> None:
    """A ValueError naming the setting when it is outside HF's accepted range."""
    if not temperature > 0:
        raise ValueError(f"sampling temperature must be > 0, got {temperature} (use greedy for argmax)")
    if not isinstance(top_k, int) or top_k < 0:
        raise ValueError(f"top_k must be an int >= 0 (0 = off), got {top_k!r}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1] (1 = off), got {top_p}")


def _compute_dtype(logits: Tensor) -> torch.dtype:
    return torch.float64 if logits.dtype == torch.float64 else torch.float32


def filter_logits(logits: Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> Tensor:
    """Steps 1-3 of the module docstring: tempered logits [S, V] with −inf outside the top-k/top-p support."""
    check_sampling(temperature, top_k, top_p)
    s = logits.to(_compute_dtype(logits)) / temperature
    if top_k > 0:
        kth = torch.topk(s, min(top_k, s.shape[-1])).values[..., -1:]
        s = s.masked_fill(s < kth, -float("inf"))
    if top_p < 1:
        ascending, order = torch.sort(s, descending=False)
        drop = ascending.softmax(dim=-1).cumsum(dim=-1) <= (1 - top_p)
        drop[..., -1:] = False
        s = s.masked_fill(drop.scatter(-1, order, drop), -float("inf"))
    return s


def sample(logits: Tensor, generator: Optional[torch.Generator] = None, *, temperature: float = 1.0,
           top_k: int = 0, top_p: float = 1.0, greedy: bool = False) -> tuple[Tensor, Tensor]:
    """One token per row of logits [S, V]: ``(tokens int64 [S], log-probs [S])`` (fp32; fp64 for fp64 logits).

    The log-prob is log_softmax(logits / temperature) at the token, before top-k/top-p (module docstring).
    """
    if logits.dim() != 2:
        raise ValueError(f"sample: logits must be [S, V], got {tuple(logits.shape)}")
    if greedy:
        check_sampling(temperature, top_k, top_p)
        tokens = logits.argmax(dim=-1)
    else:
        probs = filter_logits(logits, temperature, top_k, top_p).softmax(dim=-1)
        race = torch.empty_like(probs).exponential_(1, generator=generator)
        tokens = (probs / race.clamp_(min=torch.finfo(race.dtype).tiny)).argmax(dim=-1)
    scaled = logits.to(_compute_dtype(logits)) / temperature
    logprobs = scaled.log_softmax(dim=-1).gather(-1, tokens[:, None]).squeeze(-1)
    return tokens, logprobs
