"""The policy loss the train step calls: GRPO through the LM head on the real completion tokens only (packed).

Row r of ``CompletionRows.hidden`` is the final hidden state that predicts completion token ``ids[r]`` (the model's
output one position before it). Computing the head there only (not over the ≤16k-token video prompt as Video-R1
does, nor over the padding after each completion's end) changes no value: the loss only reads real completion
tokens.

Temperature: log-probs use softmax(z / T) with T the sampling temperature (TRL). Video-R1 never divides by T; it
samples at T = 1.0, where both agree.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from vr1fast import kernels
from vr1fast.config import LossConfig
from vr1fast.model.forward import CompletionRows


def _impl(cfg: LossConfig, name: str, device: torch.device):
    """``loss.impl`` (auto: ``$VR1FAST_IMPL``, else Triton on CUDA) with the ``loss.head`` design."""
    return kernels.implementation(name, None if cfg.impl == "auto" else cfg.impl, device.type, head=cfg.head)


@torch.no_grad()
def completion_logprobs(rows: CompletionRows, cfg: LossConfig, temperature: float = 1.0) -> Tensor:
    """No-grad log-probs [N] (fp32) of the packed completion tokens, for the reference or old policy; the same
    head implementation and layout as :func:`policy_loss`, so a reference equal to the policy gives equal values."""
    return _impl(cfg, "linear_logprobs", rows.hidden.device)(rows.hidden, rows.weight, rows.ids, temperature)


def policy_loss(rows: CompletionRows, advantages: Tensor, ref_logprobs: Optional[Tensor], cfg: LossConfig, *,
                old_logprobs: Optional[Tensor] = None, temperature: float = 1.0,
                max_completion_length: Optional[int] = None,
                num_items: Optional[float] = None) -> tuple[Tensor, dict[str, Tensor]]:
    """GRPO loss and detached metrics for one micro-batch.

    rows: the packed completion tokens (``model.forward.CompletionRows``: hidden [N, H], ids [N], offsets [B+1],
    the head weight), advantages [B], ref_logprobs [N] (None only when ``cfg.beta == 0``), old_logprobs [N] or
    None (on-policy, Video-R1's single update per rollout). ``max_completion_length`` is needed by dr_grpo (the
    rollout's max_new_tokens); ``num_items`` is the dapo normaliser (active tokens of the generation batch per
    process; default this micro-batch's). Values and gradients equal the padded layout's (``kernels.reference``).
    The caller divides by gradient-accumulation steps.
    """
    return _impl(cfg, "linear_grpo_loss", rows.hidden.device)(
        rows.hidden, rows.weight, rows.ids, None, advantages, ref_logprobs, old_logprobs, offsets=rows.offsets,
        temperature=temperature, max_completion_length=max_completion_length, num_items=num_items,
        **cfg.kernel_kwargs())
