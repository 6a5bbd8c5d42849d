"""A deterministic teacher-forced warm start of the tiny model on the synthetic SFT records (the demo only).

A randomly initialised model never writes ``<answer>`` tags, so every T-GRPO reward is 0 and nothing is learned.
Video-R1 starts RL from an SFT checkpoint (Qwen2.5-VL-7B-COT-SFT); the demo does the same at toy scale: a few
hundred AdamW steps of next-token cross-entropy on the synthetic set's ``sft.json`` conversations, then RL.

Per record (``vr1fast.data.prompts``): prompt = the chat template of ``build_sft_messages(sample)`` without its
assistant turn, with the generation prompt (system "You are a helpful assistant", the user turn with the media,
``<|im_start|>assistant\\n``), built by ``data.processor.build_prompt_batch`` exactly as a rollout prompt is;
target = ``sft_target(sample) + "<|im_end|>"`` (``<think>…</think>\\n<answer>…</answer>`` and the EOS the rollout
stops at). Rows are ``prompt ‖ target``, left-padded; labels are the input ids on target positions and -100 on
the prompt and padding, and the loss is

    L = (1 / N) Σ_{b, t : label[b, t+1] ≠ -100} −log softmax(logits[b, t])[label[b, t+1]],   N = supervised tokens

(mean over the batch's target tokens). Deviations from Video-R1's SFT (``sft_video.py``): its labels are the whole
sequence, system and user prompt included (only padding and image pads masked), at lr 1e-6 with a linear decay;
this warm start supervises the assistant tokens only, at a toy learning rate, because it only has to teach a
0.3M-parameter model the answer format quickly. As in Video-R1, the SFT prompt's system turn ("You are a helpful
assistant", no period) differs from the RL prompt's default one.

Each media file is decoded and patchified once and kept in memory for every step. The order of records is a
seeded permutation per epoch; the learning rate decays from ``lr`` to 0 on a cosine; gradients are clipped to
norm 1. Training runs on one CPU thread: at this size threads only add overhead (on a loaded 2-core machine one
thread was 10x faster than two), and the result does not depend on the machine's core count.
:func:`cached_warm_start` writes the result as an HF checkpoint ``warm_<key>/`` (key = hash of the settings, the
tiny model's seed and M-RoPE rule, the video settings and the SFT file) atomically, and reuses it.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from vr1fast.config import Config, VideoConfig
from vr1fast.data.dataset import Sample, load_records
from vr1fast.data.loader import synthetic_set
from vr1fast.data.processor import PromptBatch, build_prompt_batch
from vr1fast.data.prompts import build_sft_messages, sft_target
from vr1fast.data.video import load_media
from vr1fast.model.load import tiny_model
from vr1fast.model.tokenizer import token_ids

VERSION = 1               # bump when the recipe changes: old caches are then ignored
IGNORE = -100             # label of unsupervised positions
MAX_GRAD_NORM = 1.0
STATS_FILE = "warmstart.json"


@dataclass(frozen=True)
class SFTExample:
    """One SFT conversation, its media already patchified."""

    prompt: PromptBatch    # one unpadded row ending in "<|im_start|>assistant\n"
    target: list[int]      # token ids of sft_target(sample) + "<|im_end|>"


@dataclass(frozen=True)
class WarmStart:
    path: Path             # the HF checkpoint folder (config.json, model.safetensors, warmstart.json)
    stats: dict            # what warm_start returned when the checkpoint was made
    reused: bool           # True: found in the cache, nothing was trained


def sft_examples(tokenizer, records: Sequence[Sample], video_cfg: Optional[VideoConfig] = None) -> list[SFTExample]:
    """Decode each record's media once and tokenise its SFT prompt and target."""
    eos = token_ids(tokenizer).eos
    out = []
    for sample in records:
        media = load_media(sample.path, sample.data_type, video_cfg)
        prompt = build_prompt_batch(tokenizer, [build_sft_messages(sample)[:-1]], [media])
        target = tokenizer(sft_target(sample), add_special_tokens=False)["input_ids"] + [eos]
        out.append(SFTExample(prompt, target))
    return out


def _cat(examples: Sequence[SFTExample], name: str) -> Optional[torch.Tensor]:
    parts = [getattr(e.prompt, name) for e in examples if getattr(e.prompt, name) is not None]
    return torch.cat(parts) if parts else None


def collate_sft(examples: Sequence[SFTExample], pad_id: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """(model inputs, labels [B, L]) for rows ``prompt ‖ target`` left-padded to the longest; labels hold the
    target ids on target positions and -100 elsewhere (prompt and padding)."""
    rows = [e.prompt.input_ids[0].tolist() + e.target for e in examples]
    length = max(len(r) for r in rows)
    ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    labels = torch.full_like(ids, IGNORE)
    mask, types = torch.zeros_like(ids), torch.zeros_like(ids)
    for b, (e, row) in enumerate(zip(examples, rows)):
        start, n_prompt = length - len(row), e.prompt.input_ids.shape[1]
        ids[b, start:] = torch.tensor(row)
        mask[b, start:] = 1
        types[b, start:start + n_prompt] = e.prompt.mm_token_type_ids[0]
        labels[b, start + n_prompt:] = torch.tensor(e.target)
    batch = PromptBatch(ids, mask, types, _cat(examples, "pixel_values_videos"), _cat(examples, "video_grid_thw"),
                        _cat(examples, "second_per_grid_ts"), _cat(examples, "pixel_values"),
                        _cat(examples, "image_grid_thw"))
    return batch.model_inputs(), labels


def assistant_loss(model, inputs: dict[str, torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy (fp32) over the positions whose next label is not -100."""
    logits = model(**inputs, use_cache=False).logits[:, :-1]
    targets = labels[:, 1:]
    keep = targets != IGNORE
    return F.cross_entropy(logits[keep].float(), targets[keep])


def _batches(n: int, batch_size: int, seed: int):
    """Endless stream of index batches: a fresh seeded permutation of range(n) per epoch."""
    rng, stream = random.Random(seed), []
    while True:
        while len(stream) < batch_size:
            order = list(range(n))
            rng.shuffle(order)
            stream.extend(order)
        yield stream[:batch_size]
        stream = stream[batch_size:]


def warm_start(model, tokenizer, records: Sequence[Sample], video_cfg: Optional[VideoConfig] = None, *, steps: int,
               lr: float, batch_size: int, seed: int) -> dict:
    """Train ``model`` in place for ``steps`` AdamW steps of :func:`assistant_loss` on ``records`` (each needs
    ``process``); returns {steps, loss_first, loss_last, supervised_tokens, examples, seconds}.

    ``loss_first`` / ``loss_last`` are the mean losses of the first and last ``min(10, steps)`` steps."""
    if steps < 1 or batch_size < 1 or not records:
        raise ValueError(f"warm_start: need steps >= 1, batch_size >= 1 and records, got {steps}, {batch_size}, "
                         f"{len(records)} records")
    started = time.perf_counter()
    examples = sft_examples(tokenizer, records, video_cfg)
    device = next(model.parameters()).device
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    was_training, threads, losses, tokens = model.training, torch.get_num_threads(), [], 0
    model.train()
    torch.set_num_threads(1)
    try:
        for _, picked in zip(range(steps), _batches(len(examples), batch_size, seed)):
            inputs, labels = collate_sft([examples[i] for i in picked], tokenizer.pad_token_id)
            loss = assistant_loss(model, {k: v.to(device) for k, v in inputs.items()}, labels.to(device))
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_GRAD_NORM)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
            tokens += int((labels != IGNORE).sum())
    finally:
        torch.set_num_threads(threads)
        model.train(was_training)
    k = min(10, steps)
    return dict(steps=steps, loss_first=sum(losses[:k]) / k, loss_last=sum(losses[-k:]) / k,
                supervised_tokens=tokens, examples=len(examples), seconds=time.perf_counter() - started)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else ""


def cache_key(sft_json: Path, video_cfg: VideoConfig, *, tiny_seed: int, rope_positions: str, steps: int,
              lr: float, batch_size: int, seed: int) -> str:
    """16 hex digits naming the warm start: recipe version, settings, model seed, video settings, the SFT file
    and the ``manifest.json`` beside it (the synthetic set's generator parameters, which fix the media)."""
    sft_json = Path(sft_json)
    spec = dict(version=VERSION, tiny_seed=tiny_seed, rope_positions=rope_positions, steps=steps, lr=lr,
                batch_size=batch_size, seed=seed, video=dataclasses.asdict(video_cfg), sft=_sha(sft_json),
                manifest=_sha(sft_json.parent / "manifest.json"))
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def cached_warm_start(sft_json: str | Path, video_cfg: VideoConfig, *, tiny_seed: int = 0,
                      rope_positions: str = "videor1", steps: int, lr: float, batch_size: int = 4,
                      seed: int = 0) -> WarmStart:
    """The tiny model (``tiny_seed``) warm-started on ``sft_json``, as ``<sft_json's folder>/warm_<key>/``.

    A folder holding ``warmstart.json`` is complete and is reused as is; otherwise the model is trained, saved
    to a temporary folder beside it and renamed into place (a concurrent writer's folder is kept, ours dropped).
    Run it on one process and let the others wait (``vr1fast.train`` does this on rank 0).
    """
    sft_json = Path(sft_json)
    key = cache_key(sft_json, video_cfg, tiny_seed=tiny_seed, rope_positions=rope_positions, steps=steps, lr=lr,
                    batch_size=batch_size, seed=seed)
    final = sft_json.parent / f"warm_{key}"
    if (final / STATS_FILE).is_file():
        return WarmStart(final, json.loads((final / STATS_FILE).read_text()), True)
    records = load_records(sft_json, require_process=True)
    model, tokenizer = tiny_model(tiny_seed, rope_positions=rope_positions)
    stats = warm_start(model, tokenizer, list(records), video_cfg, steps=steps, lr=lr, batch_size=batch_size,
                       seed=seed)
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
    m = cfg.model
    if not m.warmstart_steps:
        return None
    return cached_warm_start(synthetic_set(cfg.data).sft_json, cfg.video, tiny_seed=m.tiny_seed,
                             rope_positions=m.rope_positions, steps=m.warmstart_steps, lr=m.warmstart_lr,
                             batch_size=m.warmstart_batch_size, seed=cfg.train.seed)
