"""Distribution: the process group, and the verbs the training step uses, each dispatching to one module per
strategy; rank logic and every strategy branch live in this package only.

Strategies (``DistConfig.strategy``; the module that drives each):
  * ``none``, ``ddp``  ``dist.replica``: the plain module, or ``DistributedDataParallel``;
  * ``fsdp2``          ``dist.fsdp2``: ``fully_shard`` per decoder layer, the vision tower, the root;
  * ``deepspeed``      ``dist.deepspeed``: ZeRO-2/3 engines from a user JSON in Video-R1's ``zero3.json`` shape.
DDP and FSDP2 with several ranks load on rank 0 only (``dist.rank0``: the other ranks build on the meta device).
Each strategy module has the same functions: ``prepare`` (before the models exist), ``wrap_policy``,
``wrap_reference``, ``gathered`` (full weights for generation), ``rollout_call``, ``grad_sync``, ``backward``,
``clip_grad_norm``, ``optimizer_step``, ``full_state_dict``, ``save_state`` / ``load_state`` (optimizer, schedule
or engine state in a checkpoint folder), ``close``. Which dtypes the policy and the reference compute in is one
table, ``vr1fast.precision.precision_plan``, applied by every strategy to both models alike.
"""
from __future__ import annotations

import weakref
from pathlib import Path
from typing import Any, Callable, Optional, Union

import torch
from torch import nn

from vr1fast.config import Config, DistConfig
from vr1fast.dist import deepspeed, fsdp2, rank0, replica
from vr1fast.dist.group import (DistInfo, abort, any_rank, barrier, broadcast_object, gather_to_main, init, once,
                                print0, reduce_metrics, seed_everything, step_seed, teardown)
from vr1fast.dist.wrapped import (ContextRunner, Runner, SharedReference, Wrapped, autocast, lm_head_weight,
                                  vision_tower)
from vr1fast.errors import ConfigError
from vr1fast.precision import Precision

__all__ = ["DistInfo", "Runner", "Wrapped", "abort", "any_rank", "autocast", "backward", "barrier",
           "broadcast_object", "clip_grad_norm", "close", "full_state_dict", "gather_to_main", "gathered_for_generation", "grad_sync",
           "init", "lm_head_weight", "load_state", "once", "optimizer_step", "prepare", "print0", "reduce_metrics",
           "rollout_call", "save_state", "seed_everything", "SharedReference", "step_seed", "teardown", "vision_tower",
           "wrap_policy", "wrap_reference"]

_STRATEGIES = {"none": replica, "ddp": replica, "fsdp2": fsdp2, "deepspeed": deepspeed}
_POLICIES: "weakref.WeakValueDictionary[int, Wrapped]" = weakref.WeakValueDictionary()  # id(model) -> its policy


def prepare(cfg: Config, info: DistInfo, precision: Precision, data_types: set[str], hidden_size: int) -> Any:
    """What the strategy must decide before the models are built (DeepSpeed: fill its config, check what ZeRO-3
    cannot run, install ZeRO-3's partitioned loading); pass the result to :func:`wrap_policy` and
    :func:`wrap_reference`. ``data_types``: the records' media kinds; ``hidden_size``: the text model's. DDP and
    FSDP2 with more than one rank switch rank-0 loading on (``dist.rank0``: the models built next are on the meta
    device on ranks other than 0, and wrapping fills them from rank 0)."""
    rank0.set_active(info.strategy in ("ddp", "fsdp2") and info.world_size > 1)
    return _STRATEGIES[info.strategy].prepare(cfg, info, precision, data_types, hidden_size)


def wrap_policy(model: nn.Module, info: DistInfo, cfg: DistConfig, *, precision: Precision,
                make_optimizer: Callable, make_scheduler: Callable, plan: Any = None) -> Wrapped:
    """Move/shard the trainable policy and build its optimizer (``make_optimizer([(name, param), ...])``) and LR
    schedule (``make_scheduler(optimizer)``), in the mixed precision of ``precision``."""
    wrapped = _STRATEGIES[info.strategy].wrap_policy(model, info, precision, make_optimizer, make_scheduler, plan)
    _POLICIES[id(model)] = wrapped
    return wrapped


def wrap_reference(model: Union[nn.Module, SharedReference], info: DistInfo, *, precision: Precision,
                   plan: Any = None) -> Wrapped:
    """The frozen reference, wrapped like the policy so that it computes as the policy does at step 1. Its dtype
    is the caller's (built as the policy was); nothing here casts it. A :class:`SharedReference` (LoRA: the policy
    with its adapters disabled) runs through the already wrapped policy's runner inside its context."""
    if isinstance(model, SharedReference):
        policy = _POLICIES.get(id(model.policy))
        if policy is None:
            raise ConfigError("dist.wrap_reference: a reference that shares the policy's weights needs the policy "
                              "wrapped first (dist.wrap_policy)")
        return Wrapped(ContextRunner(policy.runner, model.context), policy.model, policy.strategy, precision,
                       zero_stage=policy.zero_stage, plan=plan)
    model.requires_grad_(False).eval()
    return _STRATEGIES[info.strategy].wrap_reference(model, info, precision, plan)


def rollout_call(wrapped: Wrapped, fn: Callable, *args, **kwargs):
    """Run ``fn(model, ...)`` for generation. Under FSDP2 and ZeRO-3 the full weights are gathered once for the
    call (:func:`gathered_for_generation`), so no collective runs inside ``fn`` and ranks may generate different
    numbers of tokens (no ``synced_gpus``). The gather itself is a collective: every rank must make the same
    number of calls (sharded strategies with more than one rank). DDP / ZeRO-2 replicas are whole already."""
    strategy = _STRATEGIES[wrapped.strategy]
    with strategy.gathered(wrapped):
        return strategy.rollout_call(wrapped, fn, *args, **kwargs)


def gathered_for_generation(wrapped: Wrapped):
    """Full weights on every rank for the body, sharded again after; a no-op for replicas. Memory: the whole
    model (in FSDP2's ``param_dtype``) lives on every rank during generation, as in Video-R1."""
    return _STRATEGIES[wrapped.strategy].gathered(wrapped)


def grad_sync(wrapped: Wrapped, sync: bool):
    """Skip the gradient all-reduce on accumulation micro-steps that are not the last (DeepSpeed does its own)."""
    return _STRATEGIES[wrapped.strategy].grad_sync(wrapped, sync)


def backward(wrapped: Wrapped, loss: torch.Tensor, last: bool) -> None:
    """``loss`` is already divided by the accumulation steps; ``last``: the last micro-batch of the step."""
    _STRATEGIES[wrapped.strategy].backward(wrapped, loss, last)


def clip_grad_norm(wrapped: Wrapped, max_norm: float) -> Optional[torch.Tensor]:
    """Clip to ``max_norm`` and return the pre-clip global norm (None under DeepSpeed: it clips inside ``step``
    from the ``gradient_clipping`` of its config, and :func:`optimizer_step` reports the norm)."""
    return _STRATEGIES[wrapped.strategy].clip_grad_norm(wrapped, max_norm)


def optimizer_step(wrapped: Wrapped) -> Optional[torch.Tensor]:
    """Apply the update and advance the LR schedule; returns DeepSpeed's grad norm (None for the others)."""
    return _STRATEGIES[wrapped.strategy].optimizer_step(wrapped)


def full_state_dict(wrapped: Wrapped, trainable_only: bool = False) -> dict[str, torch.Tensor]:
    """The whole model's weights under HF module keys, on CPU, on rank 0 (maybe empty elsewhere). Collective.
    ``trainable_only``: the parameters with ``requires_grad`` only (LoRA: the adapters; nothing else gathered)."""
    return _STRATEGIES[wrapped.strategy].full_state_dict(wrapped, trainable_only)


def save_state(wrapped: Wrapped, folder: Path, info: DistInfo) -> None:
    """Write the optimizer and schedule (or the engine's state) into checkpoint ``folder``. Collective."""
    _STRATEGIES[wrapped.strategy].save_state(wrapped, folder, info)


def load_state(wrapped: Wrapped, folder: Path, info: DistInfo, read: Callable[..., Any]) -> None:
    """Restore what :func:`save_state` wrote; ``read(path)`` loads a torch file (the caller's safe loader)."""
    _STRATEGIES[wrapped.strategy].load_state(wrapped, folder, info, read)


def close(info: DistInfo, *wrapped: Optional[Wrapped]) -> None:
    """Release the strategy's state for ``wrapped`` (the policy, the reference) and tear the process group down."""
    rank0.set_active(False)
    _STRATEGIES[info.strategy].close(info, [w for w in wrapped if w is not None])


