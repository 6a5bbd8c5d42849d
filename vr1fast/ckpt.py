"""Atomic checkpoints and exact resume.

Layout of ``<output_dir>/checkpoints/step_000012/``::

    model/          HF format (config, safetensors, tokenizer/processor files): ``from_pretrained`` loads it;
                    with LoRA the adapters only, in peft's format (``PeftModel.from_pretrained(base, model/)``)
    trainer.pt      optimizer + LR schedule (FSDP2: FQN-keyed full state dicts; not under DeepSpeed)
    deepspeed/      ``engine.save_checkpoint`` (ZeRO partitions of weights and optimizer; DeepSpeed only)
    rng_rank{r}.pt  python / numpy / torch (+ CUDA) RNG states of rank r
    state.json      step, data position, world size
    config.yaml     the resolved config
    COMPLETE        written last: JSON manifest {"step", "files": {relative path: {"size", "sha256"}}}

Everything is written into ``.tmp_step_000012`` and renamed by rank 0 once every rank has finished, so a killed
run never leaves a directory that looks complete. Before resuming, rank 0 checks every file of the checkpoint
against the manifest (size, then SHA-256) and broadcasts the verdict: ``--train.resume=auto`` skips a damaged
checkpoint (naming it and the file) for the previous complete one, and stops with an error when every one is
damaged; ``--train.resume=PATH`` stops at a damaged one. A checkpoint from before manifests (``COMPLETE`` holds
only the step) loads with a warning. The manifest detects damage, not tampering: whoever can edit a file can edit
the manifest. ``trainer.pt`` and the RNG files are read with ``torch.load(weights_only=True)`` and an explicit
allow-list (numpy's RNG state), so a crafted file is refused without running its code; DeepSpeed's files are
unpickled by DeepSpeed's own loader, after :func:`screen_deepspeed` has read each the safe way. The policy is rebuilt from ``model/`` (safetensors) with
``from_pretrained`` (saved in full precision, so the weights come back bit-exact), then the optimizer, schedule,
RNG and data position are restored. Multi-node runs need a shared filesystem for ``output_dir`` (each rank writes
its RNG file, DeepSpeed its partitions).
"""
from __future__ import annotations

import hashlib
import json
import os
import pickle
import random
import re
import shutil
import signal
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from vr1fast import dist
from vr1fast.errors import ConfigError
from vr1fast.model import lora

COMPLETE = "COMPLETE"
_STEP_DIR = re.compile(r"^step_(\d+)$")
# files of a source model dir that describe its processor (copied next to the saved weights when present)
_PROCESSOR_FILES = ("preprocessor_config.json", "video_preprocessor_config.json", "chat_template.json",
                    "processor_config.json")
# the only non-torch globals trainer.pt and rng_rank*.pt may name (numpy's RNG state; numpy 1 spells the module
# numpy.core); everything else torch.load(weights_only=True) refuses
_ALLOWED_GLOBALS = [np.ndarray, np.dtype, np.dtypes.UInt32DType, np._core.multiarray._reconstruct,
                    (np._core.multiarray._reconstruct, "numpy.core.multiarray._reconstruct")]


def checkpoint_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def step_dir(root: Path, step: int) -> Path:
    return root / f"step_{step:06d}"


def is_complete(path: Path) -> bool:
    """Has the marker written last (whether its files are intact is :func:`verify`'s question)."""
    return (path / COMPLETE).is_file()


def complete_checkpoints(root: Path) -> list[Path]:
    """The complete checkpoints under ``root``, oldest step first."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and is_complete(p)]
    return [p for _, p in sorted(found)]


def latest(root: Path) -> Optional[Path]:
    """The complete checkpoint with the highest step under ``root`` (None if there is none); not verified."""
    found = complete_checkpoints(root)
    return found[-1] if found else None


def resolve(resume: str, output_dir: str | Path, info: Optional[dist.DistInfo] = None) -> Optional[Path]:
    """``none`` → None; ``auto`` → the newest complete checkpoint that passes :func:`verify` (damaged newer ones
    reported and skipped), None if there is none, an error if all are damaged; anything else must be a complete,
    undamaged checkpoint. Rank 0 checks and broadcasts the verdict (collective when ``info`` is given)."""
    verdict: tuple[Optional[Path], Optional[str]] = (None, None)
    if info is None or info.is_main:
        try:
            verdict = (_resolve(resume, output_dir), None)
        except ConfigError as e:
            verdict = (None, str(e))
    path, error = verdict if info is None else dist.broadcast_object(verdict)
    if error is not None:
        raise ConfigError(error)
    return path


def _resolve(resume: str, output_dir: str | Path) -> Optional[Path]:
    if resume == "none":
        return None
    if resume != "auto":
        path = Path(resume)
        if not is_complete(path):
            raise ConfigError(f"train.resume: {path} is not a complete checkpoint (no {COMPLETE} marker)")
        problem = verify(path)
        if problem:
            raise ConfigError(f"train.resume: {problem}")
        return path
    damaged = []
    for path in reversed(complete_checkpoints(checkpoint_root(output_dir))):
        problem = verify(path)
        if problem is None:
            if damaged:
                _warn(f"train.resume=auto: resuming from {path}, the newest undamaged checkpoint")
            return path
        _warn(f"train.resume=auto: skipping {problem}")
        damaged.append(problem)
    if damaged:
        raise ConfigError(f"train.resume=auto: all {len(damaged)} complete checkpoints under "
                          f"{checkpoint_root(output_dir)} are damaged (newest: {damaged[0]}); not starting over")
    return None


def _warn(message: str) -> None:
    print(f"vr1fast.ckpt: {message}", file=sys.stderr, flush=True)


def read_state(path: Path) -> dict[str, Any]:
    return json.loads((path / "state.json").read_text())


# ---------------------------------------------------------------- manifest


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _hash_all(paths: list[Path]) -> list[str]:
    """SHA-256 of each file, several at once (hashlib releases the GIL)."""
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        return list(pool.map(_sha256, paths))


def write_manifest(folder: Path, step: int) -> None:
    """``COMPLETE``: the step and every file under ``folder`` with its size and SHA-256."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != COMPLETE)
    listed = {p.relative_to(folder).as_posix(): {"size": p.stat().st_size, "sha256": digest}
              for p, digest in zip(files, _hash_all(files))}
    (folder / COMPLETE).write_text(json.dumps({"step": step, "files": listed}, indent=1) + "\n")


def read_manifest(path: Path) -> Optional[dict[str, dict]]:
    """The file list of ``path``'s manifest; None for a checkpoint written before manifests."""
    text = (path / COMPLETE).read_text()
    if text.strip().isdigit():
        return None
    try:
        return json.loads(text)["files"]
    except (ValueError, KeyError, TypeError):
        raise ConfigError(f"checkpoint {path}: its {COMPLETE} marker is not a readable manifest") from None


def verify(path: Path) -> Optional[str]:
    """None if every file listed in ``path``'s manifest has its size and SHA-256 (or there is no manifest: then a
    warning), else one line naming the checkpoint and the first damaged file. Sizes are checked before hashing."""
    try:
        files = read_manifest(path)
    except ConfigError as e:
        return str(e)
    if files is None:
        _warn(f"checkpoint {path} has no manifest (written before vr1fast listed checksums): loading it unverified")
        return None
    for name, want in files.items():
        file = path / name
        if not file.is_file():
            return f"checkpoint {path} is damaged: {name} is missing"
        size = file.stat().st_size
        if size != want["size"]:
            return f"checkpoint {path} is damaged: {name} has {size} bytes, the manifest lists {want['size']}"
    names = list(files)
    for name, digest in zip(names, _hash_all([path / n for n in names])):
        if digest != files[name]["sha256"]:
            return f"checkpoint {path} is damaged: {name} does not match its SHA-256 in the manifest"
    return None


# ---------------------------------------------------------------- gathering


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
    adapters = lora.is_lora(policy.model)  # LoRA: the adapters only are gathered and saved
    weights = dist.full_state_dict(policy, trainable_only=adapters)
    dist.save_state(policy, tmp, info)
    torch.save(_rng_state(), tmp / f"rng_rank{info.rank}.pt")
    if info.is_main:
        if adapters:
            lora.save_adapter(policy.model, weights, tmp / "model")
        else:
            policy.model.save_pretrained(tmp / "model", state_dict=weights)
        processor.save_pretrained(tmp / "model")
        for name in _PROCESSOR_FILES:
            src = Path(source_dir or "") / name
            if source_dir and src.is_file() and not (tmp / "model" / name).exists():
                shutil.copy2(src, tmp / "model" / name)
        (tmp / "state.json").write_text(json.dumps({**state, "step": step, "world_size": info.world_size}))
        (tmp / "config.yaml").write_text(config_text)
    dist.barrier()
    if info.is_main:
        write_manifest(tmp, step)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    dist.barrier()
    return final


def safe_load(path: Path, extra: tuple = (), mmap: bool = False) -> Any:
    """``torch.load(weights_only=True)``: tensors, containers, numbers, strings, :data:`_ALLOWED_GLOBALS` and
    ``extra`` only. A file naming any other global (which unpickling would call) is refused before anything runs."""
    try:
        with torch.serialization.safe_globals([*_ALLOWED_GLOBALS, *extra]):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        named = re.search(r"GLOBAL (\S+)|got <class '([^']+)'>", str(e))
        what = next(n for n in named.groups() if n) if named else "an object of an unknown type"
        raise ConfigError(f"{path}: refused to load: it names {what}, which is not on vr1fast's allow-list for "
                          f"training state (not a file vr1fast wrote; unpickling it could run code)") from None
    except RuntimeError as e:
        raise ConfigError(f"{path}: not a readable torch file ({str(e).strip().splitlines()[0]})") from None


def screen_deepspeed(folder: Path) -> None:
    """DeepSpeed's loader unpickles its files (``weights_only=False``): each ``*.pt`` under ``folder`` is first
    read with :func:`safe_load` (memory-mapped: the pickle only, no tensor data), allowing besides the defaults
    only the DeepSpeed types its ZeRO-2/3 states hold, so a file naming anything else never reaches it."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address
    for file in sorted(folder.rglob("*.pt")):
        safe_load(file, extra=(LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address), mmap=True)


def load(path: Path, policy: dist.Wrapped, *, info: dist.DistInfo) -> dict[str, Any]:
    """Restore optimizer, schedule (or the DeepSpeed engine) and this rank's RNG from ``path``; returns
    state.json. The weights were already loaded by building the policy from ``path / "model"``."""
    if (path / "deepspeed").is_dir():
        screen_deepspeed(path / "deepspeed")
    dist.load_state(policy, path, info, safe_load)
    rng = path / f"rng_rank{info.rank}.pt"
    if rng.is_file():
        _set_rng_state(safe_load(rng))
    return read_state(path)


def prune(root: Path, limit: int, *, protect: Optional[Path], info: dist.DistInfo) -> list[Path]:
    """Rank 0 deletes all but the newest ``limit`` complete checkpoints (0: keeps all), never ``protect`` (the one
    the run resumed from). The marker goes first, so a deletion cut short leaves an incomplete folder."""
    if not limit or not info.is_main:
        return []
    keep = protect.resolve() if protect else None
    doomed = [p for p in complete_checkpoints(root)[:-limit] if p.resolve() != keep]
    for path in doomed:
        (path / COMPLETE).unlink()
        shutil.rmtree(path)
    return doomed


class StopSignal:
    """While entered (main thread only), SIGTERM sets a flag instead of killing the process; :meth:`requested`
    tells every rank whether any rank got it (one all-reduce), so all stop at the same step boundary."""

    def __init__(self) -> None:
        self.received, self._previous = False, None

    def __enter__(self) -> "StopSignal":
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.received = True

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)

    def requested(self) -> bool:
        return dist.any_rank(self.received)
