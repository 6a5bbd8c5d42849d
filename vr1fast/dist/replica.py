"""Strategies ``none`` (one process, the plain module) and ``ddp`` (``DistributedDataParallel``): every rank holds
the whole model, so generation needs no gather and a state dict is the module's own. The step verbs here
(backward, clip, step) are also FSDP2's."""
from __future__ import annotations

import contextlib
import gc
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import nn

from vr1fast.dist import rank0
from vr1fast.dist.group import DistInfo, teardown
from vr1fast.dist.wrapped import Runner, Wrapped, strip_runner_prefix, trainable
from vr1fast.precision import Precision

TRAINER_FILE = "trainer.pt"      # optimizer + LR schedule, written by rank 0


def prepare(cfg, info: DistInfo, precision: Precision, data_types: set[str], hidden_size: int) -> None:
    """Nothing to decide before the models exist."""
    return None


def _to_device(model: nn.Module, info: DistInfo) -> bool:
    """``model`` on the device; under rank-0 loading (``dist.rank0``) with rank 0's weights, broadcast (then True)."""
    if not rank0.active():
        model.to(info.device)
        return False
    rank0.materialise_replica(model, info.device)
    return True


def wrap_policy(model: nn.Module, info: DistInfo, precision: Precision, make_optimizer: Callable,
                make_scheduler: Callable, plan: Any = None) -> Wrapped:
    synced = _to_device(model, info)
    runner = Runner(model)
    if info.strategy == "ddp":  # init_sync: DDP's own broadcast from rank 0, redundant after rank-0 loading
        runner = nn.parallel.DistributedDataParallel(
            runner, device_ids=[info.local_rank] if info.device.type == "cuda" else None, init_sync=not synced)
    optimizer = make_optimizer(trainable(runner))
    return Wrapped(runner, model, info.strategy, precision, optimizer, make_scheduler(optimizer))


def wrap_reference(model: nn.Module, info: DistInfo, precision: Precision, plan: Any = None) -> Wrapped:
    """A plain replica, run under the policy's autocast (``dist.autocast``)."""
    _to_device(model, info)
    return Wrapped(Runner(model), model, info.strategy, precision)


def gathered(wrapped: Wrapped):
    return contextlib.nullcontext()


def rollout_call(wrapped: Wrapped, fn: Callable, *args, **kwargs):
    return fn(wrapped.model, *args, **kwargs)


@contextlib.contextmanager
def grad_sync(wrapped: Wrapped, sync: bool):
    if wrapped.strategy == "ddp" and not sync:
        with wrapped.runner.no_sync():
            yield
    else:
        yield


def backward(wrapped: Wrapped, loss: torch.Tensor, last: bool) -> None:
    loss.backward()


def clip_grad_norm(wrapped: Wrapped, max_norm: float) -> Optional[torch.Tensor]:
    norm = nn.utils.clip_grad_norm_([p for p in wrapped.runner.parameters() if p.grad is not None], max_norm)
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm


def optimizer_step(wrapped: Wrapped) -> Optional[torch.Tensor]:
    wrapped.optimizer.step()
    wrapped.scheduler.step()
    wrapped.optimizer.zero_grad(set_to_none=True)
    return None


def full_state_dict(wrapped: Wrapped, trainable_only: bool = False) -> dict[str, torch.Tensor]:
    if trainable_only:
        return strip_runner_prefix(dict(trainable(wrapped.runner)))
    return strip_runner_prefix(wrapped.runner.state_dict())


def save_state(wrapped: Wrapped, folder: Path, info: DistInfo) -> None:
    """The optimizer's own state dict (the same build gives the same parameter order, so it is exact)."""
    if info.is_main:
        torch.save({"optimizer": wrapped.optimizer.state_dict(), "scheduler": wrapped.scheduler.state_dict()},
                   folder / TRAINER_FILE)


def load_state(wrapped: Wrapped, folder: Path, info: DistInfo, read: Callable[..., Any]) -> None:
    trainer = read(folder / TRAINER_FILE)
    wrapped.optimizer.load_state_dict(trainer["optimizer"])
    wrapped.scheduler.load_state_dict(trainer["scheduler"])


def close(info: DistInfo, wrapped: list[Wrapped]) -> None:
    """Free DDP's reducer while its process group exists (a rank hung at exit otherwise), then tear down."""
    for w in wrapped:
        w.runner = None
    gc.collect()
    teardown()
