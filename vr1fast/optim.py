"""The optimizer and learning-rate schedule of the policy: HF Trainer's AdamW parameter groups and schedules as
Video-R1's transformers (4.46–4.50) builds them, as factories the strategy wrappers call (``dist.wrap_policy``)."""
from __future__ import annotations

import math
from typing import Callable

import torch

from vr1fast.config import OptimConfig


def param_groups(named: list[tuple[str, torch.nn.Parameter]], weight_decay: float) -> list[dict]:
    """HF Trainer's grouping in Video-R1's transformers (4.46–4.50): no weight decay on parameters whose names
    contain "bias", "layernorm" or "rmsnorm" (Qwen2.5-VL's ``*_layernorm``); ``model.norm``, the vision blocks'
    ``norm1``/``norm2`` and the merger's ``ln_q`` are decayed there, so they are here (later HF exempts them)."""
    no_decay = [p for n, p in named if "bias" in n or "layernorm" in n or "rmsnorm" in n]
    ids = {id(p) for p in no_decay}
    decay = [p for _, p in named if id(p) not in ids]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_factor(step: int, cfg: OptimConfig, total_steps: int) -> float:
    """HF's schedules: linear warmup from 0 over ``warmup_steps``, then cosine / linear decay to 0, or constant."""
    if step < cfg.warmup_steps:
        return step / max(1, cfg.warmup_steps)
    progress = (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps)
    if cfg.scheduler == "cosine":
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))
    if cfg.scheduler == "linear":
        return max(0.0, 1.0 - progress)
    return 1.0


def optimizer_factory(cfg: OptimConfig) -> Callable[[list[tuple[str, torch.nn.Parameter]]], torch.optim.Optimizer]:
    """``make_optimizer([(name, param), ...])``: torch AdamW over :func:`param_groups`."""
    return lambda named: torch.optim.AdamW(param_groups(named, cfg.weight_decay), lr=cfg.lr, betas=cfg.betas,
                                           eps=cfg.eps)


def scheduler_factory(cfg: OptimConfig, total_steps: int) -> Callable[[torch.optim.Optimizer], object]:
    """``make_scheduler(optimizer)``: a ``LambdaLR`` following :func:`lr_factor` over ``total_steps``."""
    return lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, cfg, total_steps))
