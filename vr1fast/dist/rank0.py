"""Rank-0 loading for DDP and FSDP2 with more than one rank: ranks other than 0 build the models on the meta device
(no weights read, no memory: a 7B model's fp32 copy is ~30 GB of CPU memory per rank otherwise), rank 0 builds and
loads them; wrapping then fills the other ranks from rank 0: broadcast for replicas (:func:`materialise_replica`),
a sharded load for FSDP2 (:func:`load_sharded`: ``set_model_state_dict`` with ``broadcast_from_rank0``, each rank
keeping its shard).

:func:`set_active` is called by ``dist.prepare`` (before the models exist) and ``dist.close``; ``model.load`` asks
:func:`builds_on_meta`, as transformers asks DeepSpeed's global config whether to build partitioned under ZeRO-3.
Non-persistent buffers (the rotary ``inv_freq``) are not in a state dict: both paths broadcast them from rank 0.
"""
from __future__ import annotations

import itertools

import torch
import torch.distributed as tdist
from torch import nn

_ACTIVE = [False]


def set_active(active: bool) -> None:
    _ACTIVE[0] = active


def active() -> bool:
    """Rank-0 loading is on for the models being built (every rank alike)."""
    return _ACTIVE[0]


def builds_on_meta() -> bool:
    """This rank builds its models on the meta device (rank-0 loading is on and this is not rank 0)."""
    return _ACTIVE[0] and tdist.is_initialized() and tdist.get_rank() != 0


def is_meta(model: nn.Module) -> bool:
    return any(t.is_meta for t in itertools.chain(model.parameters(), model.buffers()))


def _broadcast_buffers(module: nn.Module) -> None:
    for buffer in module.buffers():
        tdist.broadcast(buffer.data, src=0)


def materialise_replica(model: nn.Module, device: torch.device) -> None:
    """Every parameter and buffer of ``model`` on ``device`` with rank 0's values (collective): meta ranks
    allocate theirs (``to_empty``), rank 0 moves its own, then each tensor is broadcast from rank 0."""
    if is_meta(model):
        model.to_empty(device=device)
    else:
        model.to(device)
    for param in model.parameters():
        tdist.broadcast(param.data, src=0)
    _broadcast_buffers(model)


def full_state(model: nn.Module, prefix: str) -> dict[str, torch.Tensor]:
    """Rank 0's full weights under ``prefix`` + the module's keys, taken before sharding; empty elsewhere."""
    if tdist.get_rank() != 0:
        return {}
    return {prefix + k: v for k, v in model.state_dict().items()}


def load_sharded(root: nn.Module, full: dict[str, torch.Tensor], device: torch.device) -> None:
    """After ``fully_shard``: meta ranks allocate their shards, then every rank takes its shard of rank 0's
    ``full`` weights (collective) and rank 0's buffers."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    if is_meta(root):
        root.to_empty(device=device)
    set_model_state_dict(root, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    _broadcast_buffers(root)
