"""Strategy ``fsdp2``: ``fully_shard`` on every decoder layer, on the vision tower as its own unit (HF
``generate`` runs it outside the root forward), then on the root ``Runner``; the precision plan's
``MixedPrecisionPolicy`` (bf16 parameters, float32 gradient reduction under the bf16 plan). Full state dicts
through ``torch.distributed.checkpoint``'s helpers (FQN-keyed, gathered on rank 0)."""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from vr1fast.dist import rank0, replica
from vr1fast.dist.group import DistInfo, teardown
from vr1fast.dist.wrapped import Runner, Wrapped, decoder_layers, strip_runner_prefix, trainable, vision_tower
from vr1fast.precision import Precision

prepare = replica.prepare
backward, clip_grad_norm, optimizer_step = replica.backward, replica.clip_grad_norm, replica.optimizer_step


def _fully_shard(model: nn.Module, info: DistInfo, precision: Precision) -> Runner:
    """Each decoder layer, the vision tower, then the root Runner (root inputs are not cast: advantages and
    log-probs stay fp32). The root is lazily initialised at once, before ``generate`` can touch the tower. Under
    rank-0 loading (``dist.rank0``) the shards are filled from rank 0's weights (other ranks' models are on meta).

    The tower keeps its gathered weights from its first call until the backward (``reshard_after_forward=False``):
    a rank with an image and a video calls it twice per forward (HF and ``model.forward`` encode each modality
    apart), another rank once; gathering on every call would give the ranks different collectives."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    full = rank0.full_state(model, "model.") if rank0.active() else None  # rank-0 loading: taken before sharding
    mesh = init_device_mesh(info.device.type, (info.world_size,))
    mp = MixedPrecisionPolicy(param_dtype=precision.fsdp_param, reduce_dtype=torch.float32) \
        if precision.fsdp_param is not None else MixedPrecisionPolicy()
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh, mp_policy=mp)
    tower = vision_tower(model)
    if tower is not None:
        fully_shard(tower, mesh=mesh, mp_policy=mp, reshard_after_forward=False)
    root_mp = MixedPrecisionPolicy(param_dtype=mp.param_dtype, reduce_dtype=mp.reduce_dtype,
                                   cast_forward_inputs=False)
    runner = fully_shard(Runner(model), mesh=mesh, mp_policy=root_mp)
    if full is not None:
        rank0.load_sharded(runner, full, info.device)
    runner._get_fsdp_state()._lazy_init()
    model._is_fsdp_managed_module = True  # HF generate then defaults to synced_gpus when world > 1
    return runner


def wrap_policy(model: nn.Module, info: DistInfo, precision: Precision, make_optimizer: Callable,
                make_scheduler: Callable, plan: Any = None) -> Wrapped:
    runner = _fully_shard(model, info, precision)
    optimizer = make_optimizer(trainable(runner))
    return Wrapped(runner, model, "fsdp2", precision, optimizer, make_scheduler(optimizer))


def wrap_reference(model: nn.Module, info: DistInfo, precision: Precision, plan: Any = None) -> Wrapped:
    """Sharded like the policy, with the same mixed precision."""
    return Wrapped(_fully_shard(model, info, precision), model, "fsdp2", precision)


@contextlib.contextmanager
def gathered(wrapped: Wrapped):
    """Every FSDP unit (decoder layers, vision tower, root) unsharded with resharding after forward switched off,
    then resharded and its setting restored."""
    from torch.distributed.fsdp import FSDPModule

    root = wrapped.runner
    units = [m for m in root.modules() if isinstance(m, FSDPModule)]
    groups = [g for m in units for g in m._get_fsdp_state()._fsdp_param_groups]
    saved = [g.post_forward_mesh_info for g in groups]
    root.set_reshard_after_forward(False)
    for unit in units:
        unit.unshard()
    try:
        yield
    finally:
        for group, info in zip(groups, saved):
            group.post_forward_mesh_info = info
        for unit in units:
            unit.reshard()


def rollout_call(wrapped: Wrapped, fn: Callable, *args, **kwargs):
    """Through the root's forward, so FSDP's hooks see the (already unsharded) units."""
    return wrapped.runner(fn, *args, **kwargs)


@contextlib.contextmanager
def grad_sync(wrapped: Wrapped, sync: bool):
    wrapped.runner.set_requires_gradient_sync(sync)
    yield


def full_state_dict(wrapped: Wrapped, trainable_only: bool = False) -> dict[str, torch.Tensor]:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    opts = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=trainable_only)
    return strip_runner_prefix(get_model_state_dict(wrapped.runner, options=opts))


def save_state(wrapped: Wrapped, folder: Path, info: DistInfo) -> None:
    """The full FQN-keyed optimizer state on rank 0 (torch's helper; it first gives every parameter an Adam
    state). Collective."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    optimizer = get_optimizer_state_dict(wrapped.runner, wrapped.optimizer, options=opts)
    if info.is_main:
        torch.save({"optimizer": optimizer, "scheduler": wrapped.scheduler.state_dict()},
                   folder / replica.TRAINER_FILE)


def load_state(wrapped: Wrapped, folder: Path, info: DistInfo, read: Callable[..., Any]) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
    trainer = read(folder / replica.TRAINER_FILE)
    opts = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=False)
    set_optimizer_state_dict(wrapped.runner, wrapped.optimizer,
                             optim_state_dict=trainer["optimizer"] if info.is_main else {}, options=opts)
    wrapped.scheduler.load_state_dict(trainer["scheduler"])


def close(info: DistInfo, wrapped: list[Wrapped]) -> None:
    teardown()
