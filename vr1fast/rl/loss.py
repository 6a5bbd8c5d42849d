"""The policy loss the train step calls: GRPO through the LM head on completion positions only.

``hidden[:, t]`` is the final hidden state that predicts completion token ``completion_ids[:, t]``, i.e. the model's
output at sequence position ``prompt_len - 1 + t``. Computing the head there only (not over the ≤16k-token video
prompt as Video-R1 does) changes no value: the loss only reads completion positions.

Temperature: log-probs use softmax(z / T) with T the sampling temperature (TRL). Video-R1 never divides by T; it
samples at T = 1.0, where both agree.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from vr1fast import kernels
from vr1fast.config import LossConfig


def _impl(cfg: LossConfig, name: str):
    return getattr(kernels, name) if cfg.impl == "auto" else kernels.implementation(name, cfg.impl)


@torch.no_grad()
def completion_logprobs(hidden: Tensor, lm_head_weight: Tensor, completion_ids: Tensor, cfg: LossConfig,
                        temperature: float = 1.0) -> Tensor:
    """No-grad per-token log-probs [B, T] (fp32) of the completions, for the reference or old policy."""
    return _impl(cfg, "linear_logprobs")(hidden, lm_head_weight, completion_ids, temperature)


def policy_loss(hidden: Tensor, lm_head_weight: Tensor, completion_ids: Tensor, completion_mask: Tensor,
                advantages: Tensor, ref_logprobs: Optional[Tensor], cfg: LossConfig, *,
                old_logprobs: Optional[Tensor] = None, temperature: float = 1.0,
                max_completion_length: Optional[int] = None,
                num_items: Optional[float] = None) -> tuple[Tensor, dict[str, Tensor]]:
    """GRPO loss and detached metrics for one micro-batch.

    hidden [B, T, H] at completion positions, lm_head_weight [V, H], completion_ids / completion_mask [B, T],
    advantages [B], ref_logprobs [B, T] (None only when ``cfg.beta == 0``), old_logprobs [B, T] or None
    (on-policy, Video-R1's single update per rollout). ``max_completion_length`` is needed by dr_grpo (the
    rollout's max_new_tokens); ``num_items`` is the dapo normaliser (active tokens of the generation batch per
    process; default this micro-batch's). The caller divides by gradient-accumulation steps.
    """
    return _impl(cfg, "linear_grpo_loss")(
        hidden, lm_head_weight, completion_ids, completion_mask, advantages, ref_logprobs, old_logprobs,
        temperature=temperature, max_completion_length=max_completion_length, num_items=num_items,
        **cfg.kernel_kwargs())
