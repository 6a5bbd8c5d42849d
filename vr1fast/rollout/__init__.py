"""Rollouts: ``generate`` (one batch of prompts, the SPEC entry point) and ``rollout`` (T-GRPO's ordered +
shuffled pair).

Engines: ``"hf"``, HF ``generate`` as Video-R1 calls it (``rollout.hf``), the baseline. The shared-KV engine
(``"paged"``, SPEC's name) comes later behind the same two functions.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Optional, Sequence, Union

from torch import Tensor

from vr1fast.config import RolloutConfig
from vr1fast.rollout.completions import Completions, completion_lengths, seeded
from vr1fast.rollout.hf import hf_generate

ENGINES = ("hf",)

__all__ = ["Completions", "Rollout", "completion_lengths", "generate", "hf_generate", "rollout"]


def generate(model, inputs: Mapping[str, Tensor], *, num_samples: int, max_new_tokens: int,
             temperature: float = 1.0, top_p: float = 1.0, greedy: bool = False,
             eos_token_id: Union[int, Sequence[int], None] = None, seed: Optional[int] = None, top_k: int = 0,
             engine: str = "hf", **engine_kwargs) -> Completions:
    """``num_samples`` completions for every prompt of ``inputs``: ``Completions(ids [B·S, L], lengths [B·S])``.

    Rows are prompt-major (all samples of prompt 0 first, as HF's ``num_return_sequences``); ``lengths`` count
    tokens up to and including the first EOS (L when none); ``.mask`` is the completion mask. ``inputs`` is
    ``PromptBatch.model_inputs()``. ``top_k`` = 0 is off (Video-R1 effectively used 50: ``RolloutConfig.top_k``).
    """
    if engine not in ENGINES:
        raise ValueError(f"unknown rollout engine {engine!r} (available: {', '.join(ENGINES)})")
    return hf_generate(model, inputs, num_samples=num_samples, max_new_tokens=max_new_tokens,
                       temperature=temperature, top_p=top_p, top_k=top_k, greedy=greedy,
                       eos_token_id=eos_token_id, seed=seed, **engine_kwargs)


@dataclass(frozen=True)
class Rollout:
    """One step's completions: G per prompt on the ordered batch, G' per video prompt on the shuffled batch."""

    ordered: Completions             # ids/lengths [B·G, L]
    shuffled: Optional[Completions]  # ids/lengths [B_video·G', L']; None without shuffled prompts or G' = 0


def rollout(model, ordered: Mapping[str, Tensor], shuffled: Optional[Mapping[str, Tensor]], cfg: RolloutConfig, *,
            eos_token_id: Union[int, Sequence[int], None] = None, seed: Optional[int] = None,
            **engine_kwargs) -> Rollout:
    """Video-R1's two calls: ``cfg.num_generations`` samples per ordered prompt, then ``cfg.shuffled_samples()`` per
    shuffled (video) prompt, with the same sampling settings. Both draw in turn from one RNG stream: the global
    one (``seed=None``, as Video-R1) or a forked one seeded with ``seed``.
    """
    settings = dict(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                    top_k=cfg.top_k, eos_token_id=eos_token_id, engine=cfg.engine, **engine_kwargs)
    with seeded(seed, ordered["input_ids"]):
        first = generate(model, ordered, num_samples=cfg.num_generations, **settings)
        second = None
        if shuffled is not None and cfg.shuffled_samples() > 0:
            second = generate(model, shuffled, num_samples=cfg.shuffled_samples(), **settings)
    return Rollout(first, second)
