"""Strategy ``deepspeed``: ZeRO-2/3 engines from a user's ``zero2.json`` / ``zero3.json`` (Video-R1's shape:
"auto" values, no optimizer block) completed from vr1fast's config. An optimizer block gets ``torch_adam: true``
(no JIT build of fused Adam); without one, torch AdamW is passed in, as HF Trainer does for Video-R1. The policy
and the reference are engines with the same bf16 block; ``lm_head.weight`` is registered as an external parameter
under ZeRO-3 (the loss reads it without calling the head); the engine clips inside ``step`` from the config's
``gradient_clipping`` and saves/loads its own partitioned state."""
from __future__ import annotations

import contextlib
import copy
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import nn

from vr1fast.config import Config, DistConfig
from vr1fast.dist.group import DistInfo, teardown
from vr1fast.dist.wrapped import Runner, Wrapped, lm_head_weight, strip_runner_prefix, trainable
from vr1fast.errors import ConfigError
from vr1fast.precision import Precision

ENGINE_DIR, TAG = "deepspeed", "state"   # engine.save_checkpoint(<checkpoint>/deepspeed, tag="state")


@dataclass
class Plan:
    """What DeepSpeed needs before the models exist: the filled config and, under ZeRO-3, the HfDeepSpeedConfig
    that transformers reads (``from_pretrained`` then builds the checkpoint partitioned); it is kept alive here
    (transformers holds only a weak reference) until :func:`close`."""

    config: dict
    zero_stage: int
    keepalive: Optional[Any] = None


def prepare(cfg: Config, info: DistInfo, precision: Precision, data_types: set[str], hidden_size: int) -> Plan:
    """Initialise DeepSpeed's comm on the process group, fill the config, check what ZeRO-3 cannot run, and under
    ZeRO-3 with a checkpoint folder install the partitioned-loading hook."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # DeepSpeed would guess, and say so
    import deepspeed
    deepspeed.init_distributed(dist_backend=info.backend)  # wraps the group; zero.Init reads its world size
    ds = deepspeed_config(
        cfg.dist, hidden_size=hidden_size, prompts_per_rank=cfg.train.prompts_per_rank,
        grad_accum=cfg.train.grad_accum, world_size=info.world_size, max_grad_norm=cfg.optim.max_grad_norm,
        precision=precision, optim={k: getattr(cfg.optim, k) for k in ("lr", "betas", "eps", "weight_decay")})
    plan = Plan(ds, ds["zero_optimization"].get("stage", 0))
    if plan.zero_stage == 3 and cfg.train.prompts_per_rank > 1 and len(data_types) > 1:
        raise ConfigError("train.prompts_per_rank > 1 with images and videos mixed cannot run under DeepSpeed ZeRO-3 "
                          "(ranks would run the vision tower a different number of times); use 1 or fsdp2")
    if plan.zero_stage == 3 and cfg.model.path is not None:
        plan.keepalive = hf_deepspeed_config(ds)
    return plan


def deepspeed_config(cfg: DistConfig, *, hidden_size: int, prompts_per_rank: int, grad_accum: int,
                     world_size: int, max_grad_norm: float, precision: Precision, optim: dict) -> dict:
    """Load ``cfg.deepspeed_config`` (or a minimal ZeRO-``cfg.zero_stage`` one) and fill every "auto" value.

    The bf16 block is ``precision.deepspeed_bf16`` (the run's one precision plan, ``precision.precision_plan``); a JSON
    whose explicit bf16 / fp16 ``enabled`` disagrees with it is an error. ``optim`` holds lr, betas, eps,
    weight_decay for an optimizer block, which also gets ``torch_adam: true``."""
    if cfg.deepspeed_config:
        path = Path(cfg.deepspeed_config)
        try:
            ds = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ConfigError(f"dist.deepspeed_config: cannot read {path}: {e}") from None
    else:
        ds = {"zero_optimization": {"stage": cfg.zero_stage}}
    ds = copy.deepcopy(ds)
    fills = {
        "train_micro_batch_size_per_gpu": prompts_per_rank, "gradient_accumulation_steps": grad_accum,
        "train_batch_size": prompts_per_rank * grad_accum * world_size, "gradient_clipping": max_grad_norm,
        "reduce_bucket_size": hidden_size * hidden_size,
        "stage3_prefetch_bucket_size": int(0.9 * hidden_size * hidden_size),
        "stage3_param_persistence_threshold": 10 * hidden_size,
        "lr": optim["lr"], "betas": list(optim["betas"]), "eps": optim["eps"],
        "weight_decay": optim["weight_decay"],
    }
    for key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size",
                "gradient_clipping"):
        ds.setdefault(key, "auto")
    ds.setdefault("zero_optimization", {"stage": cfg.zero_stage})
    for half, on in (("bf16", precision.deepspeed_bf16), ("fp16", False)):
        block = ds.setdefault(half, {"enabled": "auto"})
        if block.get("enabled", "auto") == "auto":
            block["enabled"] = on
        elif block["enabled"] != on:
            raise ConfigError(f"dist.deepspeed_config: {half}.enabled={block['enabled']} disagrees with the "
                              f"precision plan ({precision.describe()}); set it to \"auto\" or change train.bf16")
    if "optimizer" in ds:
        ds["optimizer"].setdefault("params", {})["torch_adam"] = True
    _fill_auto(ds, fills, "")
    return ds


def _fill_auto(node: dict, fills: dict, prefix: str) -> None:
    for key, value in node.items():
        where = f"{prefix}{key}"
        if isinstance(value, dict):
            _fill_auto(value, fills, where + ".")
        elif value == "auto":
            if key not in fills:
                raise ConfigError(f"dist.deepspeed_config: no value known for \"auto\" at {where}")
            node[key] = fills[key]


def hf_deepspeed_config(ds_config: dict):
    """For ZeRO-3, the object that makes ``from_pretrained`` build the model partitioned (``zero.Init``).
    The caller keeps it alive until the models are loaded (transformers holds only a weak reference)."""
    from transformers.integrations import HfDeepSpeedConfig
    return HfDeepSpeedConfig(ds_config)


# ---------------------------------------------------------------- the engines


def wrap_policy(model: nn.Module, info: DistInfo, precision: Precision, make_optimizer: Callable,
                make_scheduler: Callable, plan: Plan) -> Wrapped:
    """The policy's engine; an ``optimizer`` block of the JSON wins over ``make_optimizer``."""
    import deepspeed
    if plan.zero_stage == 3 and plan.keepalive is None:  # the tiny model was built whole, as elsewhere
        plan.keepalive = hf_deepspeed_config(plan.config)  # transformers' ZeRO-3 checks read it
    runner = Runner(model)
    named = trainable(runner)
    has_opt = "optimizer" in plan.config
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=runner, model_parameters=[p for _, p in named], config=plan.config,
        optimizer=None if has_opt else make_optimizer(named), lr_scheduler=make_scheduler)
    if plan.zero_stage == 3:
        deepspeed.zero.register_external_parameter(runner, lm_head_weight(model))
    return Wrapped(engine, model, "deepspeed", precision, optimizer, scheduler, engine, plan.zero_stage, plan)


def wrap_reference(model: nn.Module, info: DistInfo, precision: Precision, plan: Plan) -> Wrapped:
    """An engine with the policy's bf16 block: ZeRO-3 partitioned, or under ZeRO-2 stage 0 (a replica, as TRL's
    ``prepare_deepspeed``); no optimizer."""
    import deepspeed
    stage = 3 if plan.zero_stage == 3 else 0
    runner = Runner(model)
    ref_cfg = {k: v for k, v in plan.config.items() if k not in ("optimizer", "scheduler")}
    ref_cfg["zero_optimization"] = dict(plan.config["zero_optimization"], stage=stage)
    engine, *_ = deepspeed.initialize(model=runner, config=ref_cfg)
    if stage == 3:
        deepspeed.zero.register_external_parameter(runner, lm_head_weight(model))
    engine.eval()
    return Wrapped(engine, model, "deepspeed", precision, engine=engine, zero_stage=stage, plan=plan)


@contextlib.contextmanager
def gathered(wrapped: Wrapped):
    """ZeRO-3: ``GatheredParameters`` over all parameters (read-only, ``modifier_rank=None``) with the per-module
    fetch/release hooks removed and re-registered after, as Video-R1 gets through TRL's
    ``unwrap_model_for_generation``. ZeRO-2 replicas are whole already."""
    if wrapped.zero_stage != 3:
        yield
        return
    import deepspeed
    engine = wrapped.engine
    offload = getattr(engine.optimizer, "parameter_offload", engine.optimizer)
    with deepspeed.zero.GatheredParameters(list(engine.module.parameters()), modifier_rank=None):
        for hook in offload.forward_hooks + offload.backward_hooks:
            hook.remove()
        offload.forward_hooks, offload.backward_hooks = [], []
        try:
            yield
        finally:
            offload._register_deepspeed_module(offload.module)


def rollout_call(wrapped: Wrapped, fn: Callable, *args, **kwargs):
    return fn(wrapped.model, *args, **kwargs)


def grad_sync(wrapped: Wrapped, sync: bool):
    """The engine decides when to reduce (``gradient_accumulation_steps``)."""
    return contextlib.nullcontext()


def backward(wrapped: Wrapped, loss: torch.Tensor, last: bool) -> None:
    """The engine needs ``step()`` after every micro-batch (it only updates at the accumulation boundary)."""
    wrapped.engine.backward(loss, scale_wrt_gas=False)
    if not last:
        wrapped.engine.step()


def clip_grad_norm(wrapped: Wrapped, max_norm: float) -> None:
    """None: the engine clips inside ``step`` and reports the norm after (:func:`optimizer_step`)."""
    return None


def optimizer_step(wrapped: Wrapped) -> Optional[torch.Tensor]:
    wrapped.engine.step()
    norm = wrapped.engine.get_global_grad_norm()
    return None if norm is None else torch.as_tensor(float(norm))


def full_state_dict(wrapped: Wrapped, trainable_only: bool = False) -> dict[str, torch.Tensor]:
    if wrapped.zero_stage == 3:
        sd = wrapped.engine._zero3_consolidated_16bit_state_dict(exclude_frozen_parameters=trainable_only) or {}
    elif trainable_only:
        sd = dict(trainable(wrapped.engine.module))
    else:
        sd = wrapped.engine.module.state_dict()
    return strip_runner_prefix(sd)


def _frozen(wrapped: Wrapped) -> bool:
    return any(not p.requires_grad for p in wrapped.engine.module.parameters())


def save_state(wrapped: Wrapped, folder: Path, info: DistInfo) -> None:
    """``engine.save_checkpoint``: ZeRO partitions of weights and optimizer, the schedule. Collective. Frozen
    parameters (LoRA's base, a frozen vision tower) are left out: the resumed build holds them already (the model
    folder, or the configured base under LoRA), so a LoRA checkpoint does not carry the base model."""
    wrapped.engine.save_checkpoint(str(folder / ENGINE_DIR), tag=TAG, save_latest=False,
                                   exclude_frozen_parameters=_frozen(wrapped))


def load_state(wrapped: Wrapped, folder: Path, info: DistInfo, read: Callable[..., Any]) -> None:
    """DeepSpeed's own loader (it unpickles: the caller screens ``folder / ENGINE_DIR`` first); not strict about
    the module's keys when frozen parameters were left out (the same build: the trainable ones are all there)."""
    wrapped.engine.load_checkpoint(str(folder / ENGINE_DIR), tag=TAG, load_module_strict=not _frozen(wrapped))


def close(info: DistInfo, wrapped: list[Wrapped]) -> None:
    teardown()
    import deepspeed.comm as dscomm
    dscomm.cdb = None
    if any(w.plan is not None and w.plan.keepalive is not None for w in wrapped):
        from transformers.integrations import unset_hf_deepspeed_config
        unset_hf_deepspeed_config()
