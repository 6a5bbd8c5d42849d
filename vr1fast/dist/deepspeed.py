"""DeepSpeed config for vr1fast: a user's ``zero2.json`` / ``zero3.json`` (Video-R1's shape: "auto" values, no
optimizer block) completed from vr1fast's config, and the ZeRO-3 hook that makes ``from_pretrained`` load
partitioned. Rank logic stays in ``vr1fast.dist``; this module only builds dictionaries."""
from __future__ import annotations

import copy
import json
from pathlib import Path

from vr1fast.config import ConfigError, DistConfig
from vr1fast.precision import Precision


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
