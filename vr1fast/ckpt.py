"""Atomic checkpoints and exact resume.

Layout of ``<output_dir>/checkpoints/step_000012/``::

    model/          HF format (config, safetensors, tokenizer/processor files): ``from_pretrained`` loads it
    trainer.pt      optimizer + LR schedule (FSDP2: FQN-keyed full state dicts; not under DeepSpeed)
    deepspeed/      ``engine.save_checkpoint`` (ZeRO partitions of weights and optimizer; DeepSpeed only)
    rng_rank{r}.pt  python / numpy / torch (+ CUDA) RNG states of rank r
    state.json      step, data position, world size
    config.yaml     the resolved config
    COMPLETE        written last

Everything is written into ``.tmp_step_000012`` and renamed by rank 0 once every rank has finished, so a killed
run never leaves a directory that looks complete. ``--train.resume=auto`` picks the newest complete one. The
policy is rebuilt from ``model/`` with ``from_pretrained`` (saved in full precision, so the weights come back
bit-exact), then the optimizer, schedule, RNG and data position are restored. Multi-node runs need a shared
filesystem for ``output_dir`` (each rank writes its RNG file, DeepSpeed its partitions).
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from vr1fast import dist
from vr1fast.config import ConfigError

COMPLETE = "COMPLETE"
_STEP_DIR = re.compile(r"^step_(\d+)$")
# files of a source model dir that describe its processor (copied next to the saved weights when present)
_PROCESSOR_FILES = ("preprocessor_config.json", "video_preprocessor_config.json", "chat_template.json",
                    "processor_config.json")


def checkpoint_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def step_dir(root: Path, step: int) -> Path:
    return root / f"step_{step:06d}"


def is_complete(path: Path) -> bool:
    return (path / COMPLETE).is_file() and (path / "state.json").is_file()


def latest(root: Path) -> Optional[Path]:
    """The complete checkpoint with the highest step under ``root`` (None if there is none)."""
    if not root.is_dir():
        return None
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and is_complete(p)]
    return max(found)[1] if found else None


def resolve(resume: str, output_dir: str | Path) -> Optional[Path]:
    """``none`` → None; ``auto`` → newest complete checkpoint or None; anything else must be a complete one."""
    if resume == "none":
        return None
    if resume == "auto":
        return latest(checkpoint_root(output_dir))
    path = Path(resume)
    if not is_complete(path):
        raise ConfigError(f"train.resume: {path} is not a complete checkpoint (no {COMPLETE} marker)")
    return path


def read_state(path: Path) -> dict[str, Any]:
    return json.loads((path / "state.json").read_text())


# ---------------------------------------------------------------- gathering


def full_state_dict(policy: dist.Wrapped) -> dict[str, torch.Tensor]:
    """The whole policy's weights under HF module keys, on CPU, on rank 0 (maybe empty elsewhere). Collective."""
    if policy.strategy == "fsdp2":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        sd = get_model_state_dict(policy.runner, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    elif policy.zero_stage == 3:
        sd = policy.engine._zero3_consolidated_16bit_state_dict() or {}
    else:
        sd = policy.runner.state_dict() if policy.engine is None else policy.engine.module.state_dict()
    return _strip_runner_prefix({k: v.detach().cpu() for k, v in sd.items()})


def _strip_runner_prefix(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Runner keys are ``model.<hf key>`` (``module.model.<hf key>`` through DDP)."""
    return {k.removeprefix("module.").removeprefix("model."): v for k, v in sd.items()}


def _optimizer_state(policy: dist.Wrapped) -> dict:
    """FSDP2: the full FQN-keyed state on rank 0 (torch's helper; it first gives every parameter an Adam state).
    Otherwise the optimizer's own state dict: the same build gives the same parameter order, and it is exact."""
    if policy.strategy != "fsdp2":
        return policy.optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_optimizer_state_dict(policy.runner, policy.optimizer, options=opts)


def _load_optimizer_state(policy: dist.Wrapped, state: dict, info: dist.DistInfo) -> None:
    if policy.strategy != "fsdp2":
        policy.optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
    opts = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=False)
    set_optimizer_state_dict(policy.runner, policy.optimizer, optim_state_dict=state if info.is_main else {},
                             options=opts)


def _rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------- save / load


def save(root: Path, step: int, policy: dist.Wrapped, *, info: dist.DistInfo, processor: Any,
         source_dir: Optional[str], state: dict[str, Any], config_text: str) -> Path:
    """Write checkpoint ``step`` atomically (collective: every rank calls it). Returns the final directory."""
    final, tmp = step_dir(root, step), root / f".tmp_step_{step:06d}"
    if info.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    weights = full_state_dict(policy)
    if policy.engine is not None:
        policy.engine.save_checkpoint(str(tmp / "deepspeed"), tag="state", save_latest=False)
        trainer = None
    else:
        trainer = {"optimizer": _optimizer_state(policy), "scheduler": policy.scheduler.state_dict()}
    torch.save(_rng_state(), tmp / f"rng_rank{info.rank}.pt")
    if info.is_main:
        policy.model.save_pretrained(tmp / "model", state_dict=weights)
        processor.save_pretrained(tmp / "model")
        for name in _PROCESSOR_FILES:
            src = Path(source_dir or "") / name
            if source_dir and src.is_file() and not (tmp / "model" / name).exists():
                shutil.copy2(src, tmp / "model" / name)
        if trainer is not None:
            torch.save(trainer, tmp / "trainer.pt")
        (tmp / "state.json").write_text(json.dumps({**state, "step": step, "world_size": info.world_size}))
        (tmp / "config.yaml").write_text(config_text)
    dist.barrier()
    if info.is_main:
        (tmp / COMPLETE).write_text(f"{step}\n")
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    dist.barrier()
    return final


def load(path: Path, policy: dist.Wrapped, *, info: dist.DistInfo) -> dict[str, Any]:
    """Restore optimizer, schedule (or the DeepSpeed engine) and this rank's RNG from ``path``; returns
    state.json. The weights were already loaded by building the policy from ``path / "model"``."""
    if policy.engine is not None:
        policy.engine.load_checkpoint(str(path / "deepspeed"), tag="state")
    else:
        trainer = torch.load(path / "trainer.pt", map_location="cpu", weights_only=False)
        _load_optimizer_state(policy, trainer["optimizer"], info)
        policy.scheduler.load_state_dict(trainer["scheduler"])
    rng = path / f"rng_rank{info.rank}.pt"
    if rng.is_file():
        _set_rng_state(torch.load(rng, weights_only=False))
    return read_state(path)
