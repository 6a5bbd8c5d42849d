"""The process group and rank helpers: join it, tear it down, rank-0 printing, barriers, seeds, one-all-reduce
metrics. Launch with ``torchrun`` (it sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT; multi-node goes through
its rendezvous, e.g. ``--nnodes=2 --rdzv-backend=c10d --rdzv-endpoint=HOST:29500``). A plain ``python -m`` run is
one process with no process group, unless the strategy needs one (then a local group of one is made).
"""
from __future__ import annotations

import datetime
import json
import os
import random
import socket
import zlib
from dataclasses import dataclass
from typing import Any, Callable, Optional

import numpy as np
import torch
import torch.distributed as tdist

from vr1fast.config import DistConfig
from vr1fast.errors import ConfigError


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: Optional[str]      # None: no process group
    strategy: str               # none | ddp | fsdp2 | deepspeed

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init(cfg: DistConfig) -> DistInfo:
    """Join the torchrun process group (or make a local one of size 1 if the strategy needs it); pick the device."""
    launched = "WORLD_SIZE" in os.environ
    world = int(os.environ.get("WORLD_SIZE", "1"))
    strategy = cfg.strategy if cfg.strategy != "auto" else ("ddp" if world > 1 else "none")
    if world > 1 and strategy == "none":
        raise ConfigError("dist.strategy=none cannot run with WORLD_SIZE > 1; use ddp, fsdp2 or deepspeed")
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    backend = cfg.backend if cfg.backend != "auto" else ("nccl" if cuda else "gloo")
    if not launched and strategy == "none":
        return DistInfo(0, 1, 0, device, None, strategy)
    if not launched:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(_free_port()))
    if not tdist.is_initialized():
        tdist.init_process_group(backend, timeout=datetime.timedelta(minutes=30),
                                 device_id=device if cuda else None)
    return DistInfo(rank, world, local_rank, device, backend, strategy)


def teardown() -> None:
    """Barrier, then destroy the process group (DeepSpeed aborts at exit intermittently without this)."""
    if tdist.is_initialized():
        tdist.barrier()
        tdist.destroy_process_group()


def abort() -> None:
    """After an error: drop the process group without a barrier (other ranks may never reach one)."""
    if tdist.is_initialized():
        tdist.destroy_process_group()


def print0(*args, **kwargs) -> None:
    if not tdist.is_initialized() or tdist.get_rank() == 0:
        print(*args, **kwargs, flush=True)


def barrier() -> None:
    if tdist.is_initialized():
        tdist.barrier()


def once(make: Callable[[], Any]) -> Any:
    """``make()`` on rank 0, then after a barrier on the others, which reuse what rank 0 cached (synthetic set)."""
    made = make() if not tdist.is_initialized() or tdist.get_rank() == 0 else None
    barrier()
    return made if made is not None else make()


def seed_everything(seed: int, rank: int = 0) -> None:
    """Seed python, numpy and torch with ``seed + rank`` (ranks draw different data and samples)."""
    s = seed + rank
    random.seed(s)
    np.random.seed(s % 2**32)
    torch.manual_seed(s)


def step_seed(seed: int, *parts: int) -> int:
    """A 63-bit seed that depends only on (seed, step, rank, ...): per-step randomness survives a resume."""
    return zlib.crc32(json.dumps([seed, *parts]).encode()) * 2654435761 % (2**63 - 1)


def reduce_metrics(values: dict[str, float], sum_keys: tuple[str, ...] = (),
                   max_keys: tuple[str, ...] = ()) -> dict[str, float]:
    """One all-reduce for the step's scalars: mean over ranks, sum for ``sum_keys``; a second one (max) only when
    a key of ``max_keys`` is present. NaN-safe (NaN stays NaN)."""
    if not values or not tdist.is_initialized() or tdist.get_world_size() == 1:
        return dict(values)
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=comm_device())
    tdist.all_reduce(t)
    world = tdist.get_world_size()
    out = {k: v if k in sum_keys else v / world for k, v in zip(keys, t.tolist())}
    maxed = [k for k in keys if k in max_keys]
    if maxed:
        m = torch.tensor([float(values[k]) for k in maxed], dtype=torch.float64, device=comm_device())
        tdist.all_reduce(m, op=tdist.ReduceOp.MAX)
        out.update(zip(maxed, m.tolist()))
    return out


def gather_to_main(items: list) -> list:
    """Every rank's ``items`` concatenated in rank order on rank 0 (an empty list elsewhere). Collective."""
    if not tdist.is_initialized() or tdist.get_world_size() == 1:
        return list(items)
    box = [None] * tdist.get_world_size() if tdist.get_rank() == 0 else None
    tdist.gather_object(list(items), box, dst=0)
    return [x for part in box for x in part] if box is not None else []


def any_rank(flag: bool) -> bool:
    """True on every rank if ``flag`` is true on any rank (so all ranks stop together)."""
    if not tdist.is_initialized():
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=comm_device())
    tdist.all_reduce(t, op=tdist.ReduceOp.MAX)
    return bool(t.item())


def broadcast_object(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if not tdist.is_initialized():
        return obj
    box = [obj]
    tdist.broadcast_object_list(box, src=0)
    return box[0]


def comm_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if tdist.get_backend() == "nccl" else torch.device("cpu")

