"""Process groups, rank helpers, seeding, and the three ways of wrapping the policy; rank logic lives here only.

Launch with ``torchrun`` (it sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT; multi-node goes through its
rendezvous, e.g. ``--nnodes=2 --rdzv-backend=c10d --rdzv-endpoint=HOST:29500``). A plain ``python -m`` run is one
process with no process group, unless the strategy needs one (then a local group of one is made).

Strategies (``DistConfig.strategy``):
  * ``none``      one process, plain module;      * ``ddp``       ``DistributedDataParallel``;
  * ``fsdp2``     ``fully_shard`` per decoder layer, the vision tower (its own unit), the root; precision plan's policy;
  * ``deepspeed`` ZeRO-2/3 from a user JSON in Video-R1's ``zero3.json`` shape: "auto" values are filled, an
                  optimizer block gets ``torch_adam: true`` (no JIT build of fused Adam); without one, torch AdamW
                  is passed in, as HF Trainer does for Video-R1.
The model stays plain; :class:`Runner` runs any ``fn(model, ...)`` as its forward, so the GRPO loss (it reads
``lm_head.weight``, registered as an external parameter under ZeRO-3) runs where the parameters are gathered.
Dtypes: one table, ``vr1fast.precision.precision_plan``, applied to both models alike.
"""
from __future__ import annotations

import contextlib
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
from torch import nn

from vr1fast.config import ConfigError, DistConfig
from vr1fast.precision import Precision


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
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # DeepSpeed would guess, and say so
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
    if strategy == "deepspeed":
        import deepspeed
        deepspeed.init_distributed(dist_backend=backend)  # wraps the group; zero.Init reads its world size
    return DistInfo(rank, world, local_rank, device, backend, strategy)


def teardown(info: DistInfo) -> None:
    """Barrier, then destroy the process group (DeepSpeed aborts at exit intermittently without this)."""
    if tdist.is_initialized():
        tdist.barrier()
        tdist.destroy_process_group()
    if info.strategy == "deepspeed":
        import deepspeed.comm as dscomm
        dscomm.cdb = None


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


def reduce_metrics(values: dict[str, float], sum_keys: tuple[str, ...] = ()) -> dict[str, float]:
    """One all-reduce for the step's scalars: mean over ranks, sum for ``sum_keys``. NaN-safe (NaN stays NaN)."""
    if not values or not tdist.is_initialized() or tdist.get_world_size() == 1:
        return dict(values)
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=_comm_device())
    tdist.all_reduce(t)
    world = tdist.get_world_size()
    return {k: v if k in sum_keys else v / world for k, v in zip(keys, t.tolist())}


def any_rank(flag: bool) -> bool:
    """True on every rank if ``flag`` is true on any rank (so all ranks stop together)."""
    if not tdist.is_initialized():
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=_comm_device())
    tdist.all_reduce(t, op=tdist.ReduceOp.MAX)
    return bool(t.item())


def broadcast_object(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if not tdist.is_initialized():
        return obj
    box = [obj]
    tdist.broadcast_object_list(box, src=0)
    return box[0]


def _comm_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if tdist.get_backend() == "nccl" else torch.device("cpu")


# ---------------------------------------------------------------- wrapping


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
    strategy: str
    precision: Precision             # dist.autocast reads it; the same plan for the policy and the reference
    optimizer: Optional[torch.optim.Optimizer] = None
    scheduler: Optional[Any] = None
    engine: Optional[Any] = None     # the DeepSpeed engine (== runner) under deepspeed
    zero_stage: int = 0


def _decoder_layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if type(m).__name__.endswith("DecoderLayer")]


def vision_tower(model: nn.Module) -> Optional[nn.Module]:
    inner = getattr(model, "model", model)
    return getattr(inner, "visual", None) or getattr(model, "visual", None)


def lm_head_weight(model: nn.Module) -> nn.Parameter:
    return model.get_output_embeddings().weight


def _fully_shard(model: nn.Module, info: DistInfo, precision: Precision) -> Runner:
    """FSDP2: each decoder layer, the vision tower, then the root Runner (root inputs are not cast: advantages and
    log-probs stay fp32). The root is lazily initialised at once, before ``generate`` can touch the tower.

    The tower keeps its gathered weights from its first call until the backward (``reshard_after_forward=False``):
    a rank with an image and a video calls it twice per forward (HF and ``model.forward`` encode each modality
    apart), another rank once; gathering on every call would give the ranks different collectives."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(info.device.type, (info.world_size,))
    mp = MixedPrecisionPolicy(param_dtype=precision.fsdp_param, reduce_dtype=torch.float32) \
        if precision.fsdp_param is not None else MixedPrecisionPolicy()
    for layer in _decoder_layers(model):
        fully_shard(layer, mesh=mesh, mp_policy=mp)
    tower = vision_tower(model)
    if tower is not None:
        fully_shard(tower, mesh=mesh, mp_policy=mp, reshard_after_forward=False)
    root_mp = MixedPrecisionPolicy(param_dtype=mp.param_dtype, reduce_dtype=mp.reduce_dtype,
                                   cast_forward_inputs=False)
    runner = fully_shard(Runner(model), mesh=mesh, mp_policy=root_mp)
    runner._get_fsdp_state()._lazy_init()
    model._is_fsdp_managed_module = True  # HF generate then defaults to synced_gpus when world > 1
    return runner


def wrap_policy(model: nn.Module, info: DistInfo, cfg: DistConfig, *, precision: Precision,
                make_optimizer: Callable, make_scheduler: Callable, ds_config: Optional[dict] = None) -> Wrapped:
    """Move/shard the trainable policy and build its optimizer (``make_optimizer([(name, param), ...])``) and LR
    schedule (``make_scheduler(optimizer)``), with the FSDP2 mixed precision of ``precision`` (DeepSpeed's comes
    from ``ds_config``, built from the same plan). Under DeepSpeed an ``optimizer`` block of the JSON wins over
    ``make_optimizer``."""
    if info.strategy == "deepspeed":
        import deepspeed
        runner = Runner(model)
        named = [(n, p) for n, p in runner.named_parameters() if p.requires_grad]
        has_opt = "optimizer" in ds_config
        engine, optimizer, _, scheduler = deepspeed.initialize(
            model=runner, model_parameters=[p for _, p in named], config=ds_config,
            optimizer=None if has_opt else make_optimizer(named), lr_scheduler=make_scheduler)
        stage = ds_config["zero_optimization"].get("stage", 0)
        if stage == 3:
            deepspeed.zero.register_external_parameter(runner, lm_head_weight(model))
        return Wrapped(engine, model, "deepspeed", precision, optimizer, scheduler, engine, stage)
    if info.strategy == "fsdp2":
        runner = _fully_shard(model, info, precision)
    else:
        model.to(info.device)
        runner = Runner(model)
        if info.strategy == "ddp":
            runner = nn.parallel.DistributedDataParallel(
                runner, device_ids=[info.local_rank] if info.device.type == "cuda" else None)
    optimizer = make_optimizer([(n, p) for n, p in runner.named_parameters() if p.requires_grad])
    return Wrapped(runner, model, info.strategy, precision, optimizer, make_scheduler(optimizer))


def wrap_reference(model: nn.Module, info: DistInfo, *, precision: Precision,
                   ds_config: Optional[dict] = None) -> Wrapped:
    """The frozen reference, wrapped like the policy so that it computes as the policy does at step 1
    (``precision.precision_plan``): sharded by FSDP2 with the same mixed precision, a DeepSpeed engine with the same
    bf16 block (ZeRO-3: partitioned; ZeRO-2: stage 0, a replica, as TRL's ``prepare_deepspeed``), a plain replica
    under none / DDP (run under the same autocast, :func:`autocast`). Its dtype is the caller's (built as the
    policy was); nothing here casts it."""
    model.requires_grad_(False).eval()
    if info.strategy == "deepspeed":
        import deepspeed
        stage = ds_config["zero_optimization"].get("stage", 0)
        runner = Runner(model)
        ref_cfg = {k: v for k, v in ds_config.items() if k not in ("optimizer", "scheduler")}
        ref_cfg["zero_optimization"] = dict(ds_config["zero_optimization"], stage=3 if stage == 3 else 0)
        engine, *_ = deepspeed.initialize(model=runner, config=ref_cfg)
        if stage == 3:
            deepspeed.zero.register_external_parameter(runner, lm_head_weight(model))
        engine.eval()
        return Wrapped(engine, model, "deepspeed", precision, engine=engine, zero_stage=3 if stage == 3 else 0)
    if info.strategy == "fsdp2":
        return Wrapped(_fully_shard(model, info, precision), model, "fsdp2", precision)
    model.to(info.device)
    return Wrapped(Runner(model), model, info.strategy, precision)


def autocast(wrapped: Wrapped, device: torch.device):
    """The plan's torch autocast (none, DDP) around a forward of ``wrapped``, policy or reference; FSDP2
    (``MixedPrecisionPolicy``) and DeepSpeed (its bf16 block) bring their own mixed precision."""
    dtype = wrapped.precision.autocast
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def rollout_call(wrapped: Wrapped, fn: Callable, *args, **kwargs):
    """Run ``fn(model, ...)`` for generation. Under FSDP2 and ZeRO-3 the full weights are gathered once for the
    call (:func:`gathered_for_generation`), so no collective runs inside ``fn`` and ranks may generate different
    numbers of tokens (no ``synced_gpus``). The gather itself is a collective: every rank must make the same
    number of calls (sharded strategies with more than one rank). DDP / ZeRO-2 replicas are whole already."""
    with gathered_for_generation(wrapped):
        if wrapped.strategy == "fsdp2":
            return wrapped.runner(fn, *args, **kwargs)
        return fn(wrapped.model, *args, **kwargs)


@contextlib.contextmanager
def gathered_for_generation(wrapped: Wrapped):
    """Full weights on every rank for the body, sharded again after; a no-op for DDP / ZeRO-2 / none.

    ZeRO-3: ``GatheredParameters`` over all parameters (read-only, ``modifier_rank=None``) with the per-module
    fetch/release hooks removed and re-registered after, as Video-R1 gets through TRL's
    ``unwrap_model_for_generation``. FSDP2: every FSDP unit (decoder layers, vision tower, root) is unsharded
    with resharding after forward switched off, then resharded and its setting restored. Memory: the whole
    model (in FSDP2's ``param_dtype``) lives on every rank during generation, as in Video-R1."""
    if wrapped.strategy == "fsdp2":
        with _fsdp_unsharded(wrapped.runner):
            yield
    elif wrapped.zero_stage == 3:
        with _zero3_gathered(wrapped.engine):
            yield
    else:
        yield


@contextlib.contextmanager
def _fsdp_unsharded(root: nn.Module):
    from torch.distributed.fsdp import FSDPModule

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


@contextlib.contextmanager
def _zero3_gathered(engine):
    import deepspeed

    offload = getattr(engine.optimizer, "parameter_offload", engine.optimizer)
    with deepspeed.zero.GatheredParameters(list(engine.module.parameters()), modifier_rank=None):
        for hook in offload.forward_hooks + offload.backward_hooks:
            hook.remove()
        offload.forward_hooks, offload.backward_hooks = [], []
        try:
            yield
        finally:
            offload._register_deepspeed_module(offload.module)


@contextlib.contextmanager
def grad_sync(wrapped: Wrapped, sync: bool):
    """Skip the gradient all-reduce on accumulation micro-steps that are not the last (DeepSpeed does its own)."""
    if wrapped.strategy == "ddp" and not sync:
        with wrapped.runner.no_sync():
            yield
        return
    if wrapped.strategy == "fsdp2":
        wrapped.runner.set_requires_gradient_sync(sync)
    yield


def backward(wrapped: Wrapped, loss: torch.Tensor, last: bool) -> None:
    """``loss`` is already divided by the accumulation steps. DeepSpeed needs ``step()`` after every micro-batch."""
    if wrapped.engine is not None:
        wrapped.engine.backward(loss, scale_wrt_gas=False)
        if not last:
            wrapped.engine.step()
    else:
        loss.backward()


def clip_grad_norm(wrapped: Wrapped, max_norm: float) -> Optional[torch.Tensor]:
    """Clip to ``max_norm`` and return the pre-clip global norm (None under DeepSpeed: it clips inside ``step``
    from the ``gradient_clipping`` of its config, and reports the norm after)."""
    if wrapped.engine is not None:
        return None
    norm = nn.utils.clip_grad_norm_([p for p in wrapped.runner.parameters() if p.grad is not None], max_norm)
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm


def optimizer_step(wrapped: Wrapped) -> Optional[torch.Tensor]:
    """Apply the update and advance the LR schedule; returns DeepSpeed's grad norm (None for the others)."""
    if wrapped.engine is not None:
        wrapped.engine.step()
        norm = wrapped.engine.get_global_grad_norm()
        return None if norm is None else torch.as_tensor(float(norm))
    wrapped.optimizer.step()
    wrapped.scheduler.step()
    wrapped.optimizer.zero_grad(set_to_none=True)
    return None
