"""Rollouts: ``generate`` (one batch of prompts, the SPEC entry point) and ``rollout`` (T-GRPO's ordered +
shuffled pair).

Engines (``ENGINES``): ``"hf"``, HF ``generate`` as Video-R1 calls it (``rollout.hf``), the baseline; ``"paged"``,
the shared-KV engine (``rollout.engine``: vision once per prompt, one packed prefill, the prompt's KV pages shared by
its samples, the sampled tokens' log-probs returned). ``"auto"`` picks ``paged`` on a GPU and ``hf`` on the CPU
(``resolve_engine``; ``RolloutConfig.engine``'s default).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Optional, Sequence, Union

import torch
from torch import Tensor

from vr1fast.config import RolloutConfig
from vr1fast.rollout.completions import Completions, completion_lengths, seeded
from vr1fast.rollout.engine import Sampling, paged_generate, paged_rollout
from vr1fast.rollout.hf import hf_generate

ENGINES = ("hf", "paged")

__all__ = ["Completions", "ENGINES", "Rollout", "completion_lengths", "generate", "hf_generate", "resolve_engine",
           "rollout"]


def resolve_engine(engine: str, device: Union[str, torch.device]) -> str:
    """``engine`` itself, or for ``"auto"``: ``"paged"`` on CUDA, ``"hf"`` elsewhere."""
    if engine == "auto":
        return "paged" if torch.device(device).type == "cuda" else "hf"
    if engine not in ENGINES:
        raise ValueError(f"unknown rollout engine {engine!r} (choices: auto, {', '.join(ENGINES)})")
    return engine


def generate(model, inputs: Mapping[str, Tensor], *, num_samples: int, max_new_tokens: int,
             temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0, greedy: bool = False,
             eos_token_id: Union[int, Sequence[int], None] = None, seed: Optional[int] = None, engine: str = "auto",
             kv_cache_fraction: float = 0.8, page_size: int = 16, cuda_graphs: bool = True) -> Completions:
    """``num_samples`` completions for every prompt of ``inputs``: ``Completions(ids [B·S, L], lengths [B·S],
    logprobs)``.

    Rows are prompt-major (all samples of prompt 0 first, as HF's ``num_return_sequences``); ``lengths`` count
    tokens up to and including the first EOS (L when none); ``.mask`` is the completion mask. ``inputs`` is
    ``PromptBatch.model_inputs()``. ``top_k`` = 0 is off (Video-R1 effectively used 50: ``RolloutConfig.top_k``).
    ``logprobs`` (paged engine; None for hf): float32 [B·S, L], each sampled token's log-prob under
    log_softmax(logits / temperature) before top-k/top-p, 0 after each length. ``kv_cache_fraction`` (of the
    device's free memory the KV pool may take), ``page_size`` and ``cuda_graphs`` (decode from CUDA graphs on a GPU)
    are the paged engine's; hf ignores them.
    """
    if resolve_engine(engine, inputs["input_ids"].device) == "hf":
        return hf_generate(model, inputs, num_samples=num_samples, max_new_tokens=max_new_tokens,
                           temperature=temperature, top_p=top_p, top_k=top_k, greedy=greedy,
                           eos_token_id=eos_token_id, seed=seed)
    return paged_generate(model, inputs, num_samples=num_samples, max_new_tokens=max_new_tokens,
                          sampling=Sampling(temperature, top_k, top_p, greedy), eos_token_id=eos_token_id, seed=seed,
                          kv_cache_fraction=kv_cache_fraction, page_size=page_size, cuda_graphs=cuda_graphs)


@dataclass(frozen=True)
class Rollout:
    """One step's completions: G per prompt on the ordered batch, G' per video prompt on the shuffled batch."""

    ordered: Completions             # ids/lengths [B·G, L]
    shuffled: Optional[Completions]  # ids/lengths [B_video·G', L']; None without shuffled prompts or G' = 0


def rollout(model, ordered: Mapping[str, Tensor], shuffled: Optional[Mapping[str, Tensor]], cfg: RolloutConfig, *,
            eos_token_id: Union[int, Sequence[int], None] = None, seed: Optional[int] = None,
            video_rows: Optional[Sequence[int]] = None, permutations: Optional[Sequence[Tensor]] = None) -> Rollout:
    """``cfg.num_generations`` samples per ordered prompt and ``cfg.shuffled_samples()`` per shuffled (video) prompt,
    with the same sampling settings, drawn from one RNG stream: the global one (``seed=None``, as Video-R1) or a
    forked one seeded with ``seed``.

    hf: Video-R1's two ``generate`` calls, ordered then shuffled. paged: one prefill and one decode loop for both
    (the weights read once per step for all samples). With a pair shuffle (``data.shuffle`` mode "pair"), pass the
    ``ShufflePair``'s ``video_rows`` and ``permutations``: the shuffled prompts then reuse the ordered vision output
    by permutation instead of a second vision pass (exact; ignored by hf and for frame shuffles).
    """
    num_shuffled = cfg.shuffled_samples() if shuffled is not None else 0
    sampling = Sampling(cfg.temperature, cfg.top_k, cfg.top_p)
    if resolve_engine(cfg.engine, ordered["input_ids"].device) == "paged":
        first, second = paged_rollout(
            model, ordered, shuffled, num_samples=cfg.num_generations, num_shuffled=num_shuffled,
            max_new_tokens=cfg.max_new_tokens, sampling=sampling, eos_token_id=eos_token_id, seed=seed,
            kv_cache_fraction=cfg.kv_cache_fraction, page_size=cfg.kv_page_size, video_rows=video_rows,
            permutations=permutations, cuda_graphs=cfg.cuda_graphs)
        return Rollout(first, second)
    settings = dict(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                    top_k=cfg.top_k, eos_token_id=eos_token_id, engine="hf")
    with seeded(seed, ordered["input_ids"]):
        first = generate(model, ordered, num_samples=cfg.num_generations, **settings)
        second = None
        if num_shuffled > 0:
            second = generate(model, shuffled, num_samples=num_shuffled, **settings)
    return Rollout(first, second)
