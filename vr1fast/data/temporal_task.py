"""A synthetic task family for the frame-order experiment (``vr1fast.experiments.temporal``): every answer needs the
order of the frames, and in the training split a static cue, visible in any single frame, predicts the answer for a
chosen fraction of the items (``cue_rate``); in the test split it predicts nothing.

| kind | question | answer (A / B) | order signal | static cue |
|---|---|---|---|---|
| ``fade`` | does the scene get brighter or darker? | brighter / darker | the grey level ramps up or down | red or blue tint |
| ``direction`` | which way does the bar move? | left / right | a white bar crosses the frame | red or blue background |

Cue ``red`` goes with answer A, ``blue`` with B: a training item's cue agrees with its answer with probability
``cue_rate`` (drawn per item), so a model reading only the cue scores ``cue_rate`` on the training split and 0.5 on
the test split. Shuffled frames keep the cue and destroy the order signal: a model that uses order scores ~1 on
ordered and ~0.5 on shuffled frames; one that uses the cue scores the same on both.

``generate_temporal_task(out_dir, ...)`` writes H.264 videos and four files in Video-R1's schemas: ``train.json`` (RL),
``train_sft.json`` (the same records with a one-sentence ``process``) and the test split in two halves of equal size,
``eval_cue_agree.json`` and ``eval_cue_conflict.json`` (their mean is the test accuracy; the conflict half is where
the cue points to the wrong answer). Item ``i`` of a split is drawn from ``default_rng([seed, split, i])``; a folder
whose manifest matches the parameters is reused (files atomic, manifest last, an exclusive lock for concurrent
callers), as :func:`vr1fast.data.synthetic.generate_synthetic` does.
"""
from __future__ import annotations

import fcntl
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from vr1fast.data.synthetic import encode_h264, reusable, sha256_text, write_text

VERSION = 1
ANSWERS = {"fade": ("brighter", "darker"), "direction": ("left", "right")}
QUESTIONS = {"fade": "Does the scene get brighter or darker over time?",
             "direction": "A white bar crosses the frame. Which way does it move?"}
CUES = ("red", "blue")                           # CUES[k] goes with answer k (A, B)
TINT = {"red": (1.0, 0.55, 0.55), "blue": (0.55, 0.6, 1.0)}
BACKGROUND = {"red": (110, 30, 30), "blue": (30, 40, 120)}
SPLITS = {"train": 0, "cue_agree": 1, "cue_conflict": 2}


@dataclass(frozen=True)
class TemporalTask:
    """Where a generated task lives; ``tests`` maps a test half's name to its eval file (``vr1fast.eval`` names a
    file ``eval_<name>.json`` as ``<name>``)."""

    root: Path
    train: Path          # RL records
    train_sft: Path      # the same records + "process"
    tests: dict[str, Path]
    cue_agreement: float  # the fraction of training items whose cue agrees with the answer (as drawn)
    reused: bool


def _ramp(rng: np.random.Generator, answer: int, T: int, span: float, signal: float, noise: float) -> np.ndarray:
    """T values rising (answer 0) or falling by ``signal * span`` inside [0, span], each moved by a uniform draw in
    ``±noise * span`` (clipped to the range)."""
    travel = signal * span
    start = float(rng.uniform(0, span - travel))
    values = np.linspace(start, start + travel, T)[::1 if answer == 0 else -1]
    return np.clip(values + rng.uniform(-noise, noise, T) * span, 0, span)


def _fade(rng: np.random.Generator, answer: int, cue: str, T: int, H: int, W: int, signal: float,
          noise: float) -> np.ndarray:
    levels = 40 + _ramp(rng, answer, T, 190, signal, noise)
    frames = levels[:, None, None, None] * np.asarray(TINT[cue])[None, None, None, :]
    return np.broadcast_to(frames, (T, H, W, 3)).round().astype(np.uint8)


def _direction(rng: np.random.Generator, answer: int, cue: str, T: int, H: int, W: int, signal: float,
               noise: float) -> np.ndarray:
    width = max(2, W // 8)
    xs = _ramp(rng, 1 - answer, T, W - width, signal, noise).round().astype(int)  # answer 0 = left: x falls
    frames = np.empty((T, H, W, 3), np.uint8)
    frames[...] = BACKGROUND[cue]
    top, height = int(rng.integers(0, H // 4)), int(rng.integers(H // 2, 3 * H // 4))
    for t, x in enumerate(xs):
        frames[t, top:top + height, x:x + width] = 240
    return frames


KINDS: dict[str, Callable[..., np.ndarray]] = {"fade": _fade, "direction": _direction}


def _item(kind: str, rng: np.random.Generator, agree: bool, T: int, H: int, W: int, signal: float,
          noise: float) -> tuple[np.ndarray, dict]:
    answer = int(rng.integers(2))
    cue = CUES[answer if agree else 1 - answer]
    words = ANSWERS[kind]
    record = {"problem": QUESTIONS[kind], "data_type": "video", "problem_type": "multiple choice",
              "options": [f"A. {words[0]}", f"B. {words[1]}"], "solution": f"<answer>{'AB'[answer]}</answer>",
              "cue": cue, "cue_agrees": agree}
    return KINDS[kind](rng, answer, cue, T, H, W, signal, noise), record


def generate_temporal_task(out_dir: str | Path, *, kind: str = "fade", n_train: int = 256, n_test: int = 64,
                           cue_rate: float = 0.8, signal: float = 0.5, noise: float = 0.1, seed: int = 0,
                           size: tuple[int, int] = (56, 56), frames: int = 8, fps: float = 2.0) -> TemporalTask:
    """Write (or reuse) the task under ``out_dir`` (module docstring). ``n_test`` is split evenly between the two
    halves; ``size`` is (width, height), even, at least 28. ``signal`` (0, 1] is the change from the first to the last
    frame as a fraction of the full range (grey levels 40..230, the bar's free width) and ``noise`` the per-frame
    uniform jitter in the same unit: a small signal under noise makes the order harder to read than the cue."""
    W, H = size
    if kind not in KINDS:
        raise ValueError(f"generate_temporal_task: unknown kind {kind!r} ({' | '.join(KINDS)})")
    if n_train < 1 or n_test < 2 or n_test % 2 or not 0.0 <= cue_rate <= 1.0 or W % 2 or H % 2 or min(W, H) < 28 \
            or frames < 2 or not 0.0 < signal <= 1.0 or noise < 0:
        raise ValueError(f"generate_temporal_task: bad n_train={n_train}, n_test={n_test} (even, >= 2), "
                         f"cue_rate={cue_rate} (in [0, 1]), signal={signal} (in (0, 1]), noise={noise} (>= 0), size={size} "
                         f"(even, >= 28) or frames={frames} (>= 2)")
    root = Path(out_dir)
    params = dict(version=VERSION, kind=kind, n_train=n_train, n_test=n_test, cue_rate=cue_rate, signal=signal,
                  noise=noise, seed=seed, size=[W, H], frames=frames, fps=fps)
    names = {"train": "train.json", "train_sft": "train_sft.json", "cue_agree": "eval_cue_agree.json",
             "cue_conflict": "eval_cue_conflict.json"}
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        reused = reusable(root, params, {name: name for name in names.values()})
        if not reused:
            _write(root, params, names)
    train = json.loads((root / names["train"]).read_text())
    return TemporalTask(root, root / names["train"], root / names["train_sft"],
                        {k: root / names[k] for k in ("cue_agree", "cue_conflict")},
                        sum(r["cue_agrees"] for r in train) / len(train), reused)


def _write(root: Path, params: dict, names: dict[str, str]) -> None:
    kind, seed, (W, H), T = params["kind"], params["seed"], params["size"], params["frames"]
    (root / "videos").mkdir(exist_ok=True)
    (root / "manifest.json").unlink(missing_ok=True)
    splits = {"train": params["n_train"], "cue_agree": params["n_test"] // 2, "cue_conflict": params["n_test"] // 2}
    records: dict[str, list[dict]] = {}
    files = []
    for split, n in splits.items():
        records[split] = []
        for i in range(n):
            rng = np.random.default_rng([seed, SPLITS[split], i])
            agree = bool(rng.random() < params["cue_rate"]) if split == "train" else split == "cue_agree"
            video, record = _item(kind, rng, agree, T, H, W, params["signal"], params["noise"])
            rel = f"videos/{split}_{i:04d}.mp4"
            encode_h264(video, root / rel, params["fps"])
            files.append(rel)
            records[split].append({"problem_id": i, **record, "path": "./" + rel,
                                   "data_source": f"vr1fast-temporal/{kind}/{split}"})
    word = dict(zip("AB", ANSWERS[kind]))
    texts = {"train": records["train"], "cue_agree": records["cue_agree"], "cue_conflict": records["cue_conflict"],
             "train_sft": [{**r, "process": f"<think>Frame by frame: {word[r['solution'][8]]}.</think>"}
                           for r in records["train"]]}
    manifest = dict(params=params, files=files)
    for key, rows in texts.items():
        text = json.dumps(rows, indent=1) + "\n"
        write_text(root / names[key], text)
        manifest[names[key]] = sha256_text(text)
    write_text(root / "manifest.json", json.dumps(manifest, indent=1) + "\n")
