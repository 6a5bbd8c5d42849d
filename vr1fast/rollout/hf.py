"""The reference rollout: HF ``generate`` as Video-R1 calls it, the baseline every faster engine is measured against.

Video-R1 (``grpo_trainer.py``) makes one ``generate`` call with ``num_return_sequences=G`` on the ordered prompt
and one with G/2 on the frame-shuffled copy, ``do_sample=True, temperature=1, top_p=0.95``, up to 768 new
tokens, and masks each completion up to and including its first EOS. ``hf_generate`` is one such call;
``rollout.rollout`` makes the pair.

Sampling settings are all given explicitly, because transformers fills every unset field from the checkpoint's
``generation_config.json`` (Qwen2.5-VL-Instruct ships ``top_k=1, top_p=0.001, temperature=0.1,
repetition_penalty=1.05``, which would make "sampling" greedy). ``top_k`` is a parameter: Video-R1's
GenerationConfig left it at transformers 4.x's default of 50 (``RolloutConfig.top_k``); 0 turns it off. The
order is HF's: temperature, then top-k, then top-p.

Deviations from Video-R1, both only where its behaviour is an accident:
- the model is switched to eval mode for the call (and back): with gradient checkpointing in train mode
  transformers drops the KV cache inside every layer (4.x: slow, 5.x: wrong tokens);
- every stop token ends the mask: Video-R1 stops generation at either of the checkpoint's EOS ids
  (``<|im_end|>``, ``<|endoftext|>``) but masks only up to ``<|im_end|>``, so a completion ended by
  ``<|endoftext|>`` kept a full-length mask there.
"""
from __future__ import annotations

from typing import Mapping, Optional, Sequence, Union

from torch import Tensor
from transformers import GenerationConfig

from vr1fast.rollout.completions import (Completions, completion_lengths, pad_token_id, seeded, stop_token_ids,
                                         within)


def generation_config(*, num_samples: int, max_new_tokens: int, temperature: float, top_p: float, top_k: int,
                      greedy: bool, stops: Sequence[int], pad: int) -> GenerationConfig:
    """Every field that changes which tokens come out, set (so nothing is inherited from the checkpoint)."""
    sampling = {} if greedy else dict(temperature=temperature, top_p=top_p, top_k=top_k)
    return GenerationConfig(
        do_sample=not greedy, num_beams=1, num_return_sequences=num_samples, max_new_tokens=max_new_tokens,
        min_new_tokens=0, eos_token_id=list(stops), pad_token_id=pad, repetition_penalty=1.0, typical_p=1.0,
        no_repeat_ngram_size=0, use_cache=True, **sampling)


def hf_generate(model, inputs: Mapping[str, Tensor], *, num_samples: int, max_new_tokens: int,
                temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0, greedy: bool = False,
                eos_token_id: Union[int, Sequence[int], None] = None, seed: Optional[int] = None,
                synced_gpus: bool = False) -> Completions:
    """``num_samples`` completions per prompt of ``inputs`` (PromptBatch.model_inputs(), left-padded) with HF.

    ``greedy`` ignores temperature/top-p/top-k. ``seed`` makes the call reproducible without touching the
    global RNG (it is forked); None draws from the global RNG as Video-R1 does. ``synced_gpus`` is for
    sharded models (FSDP / ZeRO-3), where every rank must run the same number of forward passes.
    """
    if num_samples < 1 or max_new_tokens < 1:
        raise ValueError(f"hf_generate: num_samples={num_samples} and max_new_tokens={max_new_tokens} must be >= 1")
    stops, pad = stop_token_ids(model, eos_token_id), pad_token_id(model)
    per_call = 1 if greedy else num_samples  # HF refuses greedy with num_return_sequences > 1: copy instead
    config = generation_config(num_samples=per_call, max_new_tokens=max_new_tokens, temperature=temperature,
                               top_p=top_p, top_k=top_k, greedy=greedy, stops=stops, pad=pad)
    prompt_len = inputs["input_ids"].shape[1]
    was_training = model.training
    model.eval()
    try:
        with seeded(seed, inputs["input_ids"]):
            out = model.generate(**inputs, generation_config=config, synced_gpus=synced_gpus)
    finally:
        model.train(was_training)
    ids = out[:, prompt_len:].repeat_interleave(num_samples // per_call, dim=0)
    lengths = completion_lengths(ids, stops)
    ids = ids.masked_fill(~within(lengths, ids.shape[1]), pad)
    return Completions(ids, lengths)
