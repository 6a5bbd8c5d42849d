"""The demo's warm start: a short, cached run of :mod:`vr1fast.sft` that teaches the tiny model the answer format.

A randomly initialised model never writes ``<answer>`` tags, so every T-GRPO reward is 0 and nothing is learned.
Video-R1 starts RL from an SFT checkpoint (Qwen2.5-VL-7B-COT-SFT); the demo does the same at toy scale:
``model.warmstart_steps`` steps of ``vr1fast.sft`` on the synthetic set's ``sft.json`` (:func:`warm_start_config`),
then RL. Deviations from Video-R1's SFT recipe, because it only has to teach a 0.3M-parameter model the format
quickly: a toy learning rate (``model.warmstart_lr``) on a cosine schedule, gradients clipped to norm 1,
``model.warmstart_batch_size`` examples per step, fp32; the loss covers the assistant target only
(``sft.labels=completion``, ``vr1fast.sft``'s default). It runs on one process (``vr1fast.train`` calls it on rank
0 while the others wait) and one CPU thread: at this size threads only add overhead (on a loaded 2-core machine one
thread was 10x faster than two), and the result does not depend on the machine's core count. The global RNGs are
left as they were.

:func:`cached_warm_start` writes the result as an HF checkpoint ``warm_<key>/`` beside the SFT file (key = hash of
the whole SFT config, the SFT file and the synthetic set's manifest) atomically, and reuses it.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from vr1fast import sft
from vr1fast.config import Config, ModelConfig, OptimConfig, TrainConfig
from vr1fast.data.loader import synthetic_set

VERSION = 2               # bump when the recipe changes: old caches are then ignored
MAX_GRAD_NORM = 1.0
STATS_FILE = "warmstart.json"


@dataclass(frozen=True)
class WarmStart:
    path: Path             # the HF checkpoint folder (config.json, model.safetensors, warmstart.json)
    stats: dict            # steps, examples, supervised_tokens, loss_first, loss_last, seconds of the run that made it
    reused: bool           # True: found in the cache, nothing was trained


def warm_start_config(cfg: Config) -> Config:
    """The ``vr1fast.sft`` config of ``cfg``'s warm start: the tiny model (``model.tiny_seed``, its M-RoPE rule) on
    the synthetic set of ``cfg.data`` with ``cfg.video``'s frames, ``model.warmstart_*`` steps, learning rate and
    batch, ``train.seed``; one process, fp32."""
    m = cfg.model
    return dataclasses.replace(
        Config(preset="warm_start"), video=cfg.video,
        data=dataclasses.replace(cfg.data, path=None, media_root=None),
        model=ModelConfig(tiny_seed=m.tiny_seed, rope_positions=m.rope_positions, gradient_checkpointing=False),
        optim=OptimConfig(lr=m.warmstart_lr, weight_decay=0.0, scheduler="cosine", max_grad_norm=MAX_GRAD_NORM),
        train=TrainConfig(max_steps=m.warmstart_steps, prompts_per_rank=m.warmstart_batch_size, seed=cfg.train.seed,
                          bf16=False))


@contextlib.contextmanager
def _isolated():
    """One CPU thread and the global python / numpy / torch RNG states restored afterwards."""
    threads, states = torch.get_num_threads(), (random.getstate(), np.random.get_state(), torch.get_rng_state())
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])


def warm_start(sft_cfg: Config):
    """Run ``sft_cfg``'s steps of ``vr1fast.sft`` in this process; returns (model, tokenizer, stats) with stats
    {steps, examples, supervised_tokens, loss_first, loss_last, seconds}: ``loss_first`` / ``loss_last`` are the
    mean losses of the first and last ``min(10, steps)`` steps."""
    started = time.perf_counter()
    with _isolated():
        run, state = sft.build(sft_cfg, local=True)
        rows = [sft.sft_step(run, state, timed=False) for _ in range(run.total_steps)]
    losses, k = [r["loss"] for r in rows], min(10, len(rows))
    stats = dict(steps=len(rows), examples=len(run.records), loss_first=sum(losses[:k]) / k,
                 loss_last=sum(losses[-k:]) / k, supervised_tokens=int(sum(r["labelled_tokens"] for r in rows)),
                 seconds=time.perf_counter() - started)
    return run.policy.model.eval(), run.tokenizer, stats


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else ""


def cache_key(sft_cfg: Config, sft_json: Path) -> str:
    """16 hex digits naming a warm start: recipe version, the whole SFT config (its output folder aside), the SFT
    file and the ``manifest.json`` beside it (the synthetic set's generator parameters, which fix the media)."""
    settings = dataclasses.asdict(sft_cfg)
    settings["train"].pop("output_dir")
    spec = dict(version=VERSION, config=settings, sft=_sha(sft_json), manifest=_sha(sft_json.parent / "manifest.json"))
    return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:16]


def cached_warm_start(sft_cfg: Config) -> WarmStart:
    """The tiny model warm-started by ``sft_cfg`` (:func:`warm_start_config`), as ``<synthetic set>/warm_<key>/``.

    A folder holding ``warmstart.json`` is complete and is reused as is; otherwise the model is trained, saved
    to a temporary folder beside it and renamed into place (a concurrent writer's folder is kept, ours dropped).
    Run it on one process and let the others wait (``vr1fast.train`` does this on rank 0).
    """
    sft_json = synthetic_set(sft_cfg.data).sft_json
    final = sft_json.parent / f"warm_{cache_key(sft_cfg, sft_json)}"
    if (final / STATS_FILE).is_file():
        return WarmStart(final, json.loads((final / STATS_FILE).read_text()), True)
    model, tokenizer, stats = warm_start(sft_cfg)
    tmp = final.with_name(f".{final.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / STATS_FILE).write_text(json.dumps(stats, indent=1) + "\n")
    try:
        os.rename(tmp, final)
    except OSError:  # another process renamed its (identical) folder first
        if not (final / STATS_FILE).is_file():
            raise
        shutil.rmtree(tmp, ignore_errors=True)
    return WarmStart(final, stats, False)


def configured_warm_start(cfg: Config) -> Optional[WarmStart]:
    """With ``model.warmstart_steps``: the tiny model warm-started on ``cfg``'s synthetic set (its ``sft.json``),
    cached beside it; None without. Call it on one rank first (``dist.once``): the others then find the cache."""
    if not cfg.model.warmstart_steps:
        return None
    return cached_warm_start(warm_start_config(cfg))
