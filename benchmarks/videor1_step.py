"""A Video-R1-style T-GRPO step (``grpo_trainer.py::compute_loss`` + the HF Trainer's update), the baseline of the
SPEC's step target, timed per stage with the same ``StageTimer`` as ``vr1fast.train.train_step``:

    data            the prompt's frames (uint8, in memory: the benchmark gives both steps the same frames)
    processor       chat prompt + Qwen2.5-VL patches, ordered and frame-shuffled (vr1fast's processor for both)
    rollout         HF ``generate`` with num_return_sequences = G on the ordered prompt, then G/2 on the shuffled one
                    (HF repeats prompt and pixels per sequence, so the prefill runs the vision tower ×G)
    reward          decode, Video-R1's accuracy / format / temporal / length rewards, group advantages
    ref             frozen reference under ``inference_mode``: prompt inputs and pixels repeated ×G (vision tower
                    ×G), full [G, P+L, V] logits of prompt + completion, per-row log-softmax + gather in the
                    model dtype over every position (TRL's ``selective_log_softmax`` as Video-R1 runs it), then
                    the completion slice
    policy_fwd_bwd  the same forward on the policy with grad, Video-R1's loss (ratio exp(ℓ − sg ℓ), β·k3 with
                    the log-ratio clamped to ±10, mean over tokens then sequences), backward
    optimizer       clip the gradient norm (``optim.max_grad_norm``), AdamW step, LR schedule step, zero grads

Same models, optimizer and config as the vr1fast step it is compared with. Not Video-R1's: the data stage (no
decoding here, for either step) and the processor (vr1fast's tensors, the same for both); rewards through
``vr1fast.rl.advantages.score_batch`` (Video-R1's rules, tested against them); one GPU, no ZeRO-3 gather.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch

from bench_logprobs import torch_eager_gather
from vr1fast.data.dataset import Position
from vr1fast.data.prompts import build_messages
from vr1fast.data.shuffle import build_shuffle_pair
from vr1fast.kernels.reference import grpo_loss_from_logprobs
from vr1fast.metrics import StageTimer
from vr1fast.model.forward import expand_prompts
from vr1fast.rl.advantages import score_batch
from vr1fast.rollout import hf_generate


@dataclass
class StepResult:
    seconds: dict[str, float]       # per stage (synchronised at every stage edge)
    tokens: int                     # prompt tokens × G + ordered completion tokens (the tokens/s numerator)
    completion_length: float        # mean ordered completion length


def videor1_logprobs(model, inputs: dict, completion_ids: torch.Tensor, completion_mask: torch.Tensor,
                     num_samples: int) -> torch.Tensor:
    """Video-R1's ``_get_per_token_logps``: [B·G, L] log-probs in the model dtype (the mask is not applied)."""
    rep = expand_prompts(inputs, num_samples)
    prompt_len = inputs["input_ids"].shape[1]
    ids = torch.cat([rep["input_ids"], completion_ids], dim=1)
    rep.update(input_ids=ids,
               attention_mask=torch.cat([rep["attention_mask"], completion_mask.to(rep["attention_mask"].dtype)], 1),
               mm_token_type_ids=torch.cat([rep["mm_token_type_ids"], torch.zeros_like(completion_ids)], dim=1))
    logits = model(**rep, use_cache=False).logits[:, :-1]
    return torch_eager_gather(logits, ids[:, 1:])[:, prompt_len - 1:]


def _texts(tokenizer, completions) -> list[str]:
    ids = completions.ids.tolist()
    return tokenizer.batch_decode([row[:n] for row, n in zip(ids, completions.lengths.tolist())],
                                  skip_special_tokens=True)


def videor1_step(run, position: Position, frames_of: Mapping[str, torch.Tensor], seed: int
                 ) -> tuple[StepResult, Position]:
    """One step on ``run``'s policy, reference, optimizer, sampler and config (``vr1fast.train.Run``): the prompts
    at ``position`` of the sample stream (the vr1fast step draws the same ones from the same position), their
    frames from ``frames_of[sample.path]``; ``seed`` draws the frame permutation. Returns the next position."""
    cfg, device, timer = run.cfg, run.info.device, StageTimer(run.info.device, timed=True)
    policy, ref, optimizer = run.policy.model, run.ref.model, run.policy.optimizer
    G, S = cfg.rollout.num_generations, cfg.rollout.shuffled_samples()
    sampling = dict(max_new_tokens=cfg.rollout.max_new_tokens, temperature=cfg.rollout.temperature,
                    top_p=cfg.rollout.top_p, top_k=cfg.rollout.top_k)
    with timer("data"):
        indices, position = run.sampler.take(position, cfg.train.prompts_per_rank)
        samples = [run.records[i] for i in indices]
        frames = [frames_of[s.path] for s in samples]
    with timer("processor"):
        messages = [build_messages(s) for s in samples]
        pair = build_shuffle_pair(run.tokenizer, messages, frames, torch.Generator().manual_seed(seed),
                                  allow_identity=True, second_per_grid_ts=cfg.data.second_per_grid_ts)
        inputs, shuffled = pair.ordered.to(device).model_inputs(), pair.shuffled.to(device).model_inputs()
    with timer("rollout"):
        ordered = hf_generate(policy, inputs, num_samples=G, **sampling)
        second = hf_generate(policy, shuffled, num_samples=S, **sampling)
    with timer("reward"):
        shuffled_texts = _texts(run.tokenizer, second)
        rewards = score_batch(_texts(run.tokenizer, ordered), ordered.lengths, [s.solution for s in samples],
                              [s.problem_type for s in samples],
                              [shuffled_texts[b * S:(b + 1) * S] for b in range(len(samples))], cfg.reward)
    ids, mask = ordered.ids, ordered.mask
    with timer("ref"), torch.inference_mode():
        ref_lp = videor1_logprobs(ref, inputs, ids, mask, G)
    with timer("policy_fwd_bwd"):
        lp = videor1_logprobs(policy, inputs, ids, mask, G)
        loss, _ = grpo_loss_from_logprobs(lp, mask, rewards.advantages.to(device), ref_lp.clone(),
                                          beta=cfg.loss.beta, kl_clamp=cfg.loss.kl_clamp, loss_type="grpo")
        loss.backward()
    with timer("optimizer"):
        torch.nn.utils.clip_grad_norm_([p for p in policy.parameters() if p.grad is not None],
                                       cfg.optim.max_grad_norm)
        optimizer.step()
        run.policy.scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    tokens = int(ordered.lengths.sum()) + int(pair.ordered.attention_mask.sum()) * G
    return StepResult(dict(timer.seconds), tokens, float(ordered.lengths.float().mean())), position
