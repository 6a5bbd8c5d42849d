"""What every strategy hands back: the model, the one forward that runs anything on it, and its optimizer.

The model stays plain; :class:`Runner` runs any ``fn(model, ...)`` as its forward, so the GRPO loss (it reads
``lm_head.weight`` without calling ``lm_head``) runs inside the wrapped forward, where DDP, FSDP2 and ZeRO-3 have
the parameters gathered.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, ContextManager, Optional

import torch
from torch import nn

from vr1fast.precision import Precision


class Runner(nn.Module):
    """``Runner(model)(fn, *args, **kw) == fn(model, *args, **kw)``: the one forward every wrapper calls."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, fn: Callable, *args, **kwargs):
        return fn(self.model, *args, **kwargs)


@dataclass
class Wrapped:
    """A model ready to run under a strategy. ``runner(fn, ...)`` is the training/scoring forward; ``model`` is the
    plain HF module inside it (HF ``generate``, ``save_pretrained``)."""

    runner: nn.Module
    model: nn.Module
    strategy: str                    # none | ddp | fsdp2 | deepspeed: the module of vr1fast.dist that drives it
    precision: Precision             # dist.autocast reads it; the same plan for the policy and the reference
    optimizer: Optional[torch.optim.Optimizer] = None
    scheduler: Optional[Any] = None
    engine: Optional[Any] = None     # the DeepSpeed engine (== runner) under deepspeed
    zero_stage: int = 0
    plan: Optional[Any] = None       # what the strategy decided before the models existed (dist.prepare)


@dataclass
class SharedReference:
    """A reference that is the policy's own module run inside ``context()``: LoRA's adapter-disabled base
    (``vr1fast.model.lora.reference``), no second copy of the weights. ``dist.wrap_reference`` turns it into a
    :class:`Wrapped` whose runner is the wrapped policy's, so DDP, FSDP2 and ZeRO-3 run it as they run the policy."""

    policy: nn.Module
    context: Callable[[], ContextManager]


class ContextRunner:
    """``ContextRunner(runner, context)(fn, ...)``: ``runner(fn, ...)`` inside ``context()``. Not a module, so the
    policy's parameters are not registered a second time (the reference's ``Wrapped.runner``)."""

    def __init__(self, runner: nn.Module, context: Callable[[], ContextManager]):
        self.runner, self.context = runner, context

    def __call__(self, fn: Callable, *args, **kwargs):
        with self.context():
            return self.runner(fn, *args, **kwargs)


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if type(m).__name__.endswith("DecoderLayer")]


def vision_tower(model: nn.Module) -> Optional[nn.Module]:
    inner = getattr(model, "model", model)
    return getattr(inner, "visual", None) or getattr(model, "visual", None)


def lm_head_weight(model: nn.Module) -> nn.Parameter:
    return model.get_output_embeddings().weight


def trainable(module: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in module.named_parameters() if p.requires_grad]


def autocast(wrapped: Wrapped, device: torch.device):
    """The plan's torch autocast (none, DDP) around a forward of ``wrapped``, policy or reference; FSDP2
    (``MixedPrecisionPolicy``) and DeepSpeed (its bf16 block) bring their own mixed precision."""
    dtype = wrapped.precision.autocast
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def strip_runner_prefix(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF module keys, on CPU: Runner keys are ``model.<hf key>`` (``module.model.<hf key>`` through DDP)."""
    return {k.removeprefix("module.").removeprefix("model."): v.detach().cpu() for k, v in sd.items()}
