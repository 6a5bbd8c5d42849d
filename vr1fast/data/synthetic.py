"""The embedded default data: a small synthetic temporal video-QA set in Video-R1's JSON schema.

``generate_synthetic(out_dir)`` writes real media and two record files:

- ``videos/NNNN_<kind>.mp4``: H.264 (libx264, yuv420p) encoded with PyAV, ``frames`` frames at ``fps``;
  ``images/NNNN_<kind>.png``;
- ``rl.json``: a JSON list in the Video-R1-260k schema (``problem_id, problem, data_type, problem_type,
  options, solution="<answer>…</answer>", path="./videos/…", data_source``);
- ``sft.json``: the same records plus ``process="<think>…</think>"`` (Video-R1-COT-165k schema), a short
  templated chain of thought that states the evidence and the answer;
- ``manifest.json``: the parameters and hashes, written last, so a complete set is reused as it is.

Record ``i`` is of kind ``KINDS[i % len(KINDS)]`` and is drawn from ``numpy.random.default_rng([seed, i])``, so
it does not depend on ``n``. Every kind needs the order of frames:

| kind | problem_type | question |
|---|---|---|
| direction | multiple choice | direction of motion of a square |
| first_colour | multiple choice | which of two squares came first (the last frame shows both: no 1-frame cue) |
| flashes | numerical | how many times a light flashes |
| ocr | OCR | words shown one after another |
| distance | regression | how many grid cells a dot travels |
| describe | free-form | one sentence on what moves where |
| count_image / colour_image | numerical / multiple choice | image questions (count squares, colour of the circle) |

The timeline of a video is cut into ``SLOTS = 8`` equal slots and every event lasts whole slots, so each state
is seen by uniform sampling of 8 or more frames (``linspace(0, T-1, n)`` puts one index in every slot).
Same seed, size, frames and fps give the same JSON and the same decoded frames; the mp4 container bytes may
differ across encoder versions, so determinism is a property of the decoded pixels, not of the files.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from vr1fast.data.decode import pyav

GENERATOR_VERSION = 1
SLOTS = 8
BACKGROUND = (20, 20, 28)
GRID_LINE = (70, 70, 70)
PALETTE = {"red": (220, 40, 40), "green": (40, 190, 70), "blue": (50, 90, 230), "yellow": (235, 215, 50),
           "purple": (160, 70, 210), "orange": (240, 140, 30)}
LIGHT = (250, 250, 250)
DIRECTIONS = ("left", "right", "up", "down")
PHRASES = {"left": "from right to left", "right": "from left to right", "up": "from bottom to top",
           "down": "from top to bottom"}
WORDS = ("red", "cat", "sun", "box", "dog", "car", "tree", "door", "road", "star", "ball", "light", "blue", "cube")
LETTERS = "ABCD"


@dataclass(frozen=True)
class SyntheticSet:
    """Where a generated set lives."""

    root: Path          # media paths in the records are relative to this folder
    rl_json: Path       # RL records (Video-R1-260k schema)
    sft_json: Path      # SFT records (+ "process")
    num_records: int
    reused: bool        # True when a complete set with the same parameters was already there


@dataclass(frozen=True)
class _Item:
    media: np.ndarray   # video uint8 [T, H, W, 3] or image uint8 [H, W, 3]
    problem: str
    problem_type: str
    answer: str         # the text inside <answer></answer>
    options: list[str]
    think: str          # the reasoning inside <think></think>


# ---------------------------------------------------------------- drawing


def _canvas(shape: tuple[int, ...]) -> np.ndarray:
    img = np.empty((*shape, 3), np.uint8)
    img[...] = BACKGROUND
    return img


def _rect(img: np.ndarray, x: int, y: int, w: int, h: int, colour) -> None:
    img[..., y:y + h, x:x + w, :] = colour


def _disc(img: np.ndarray, cx: float, cy: float, r: float, colour) -> None:
    yy, xx = np.mgrid[: img.shape[-3], : img.shape[-2]]
    img[..., (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r, :] = colour


def _even(v: float) -> int:
    return 2 * int(round(v / 2))


def _slot_frames(T: int, first: int, last: int) -> slice:
    """Frames of slots ``first .. last-1`` (slot k covers frames [k*T/8, (k+1)*T/8))."""
    return slice(first * T // SLOTS, last * T // SLOTS)


def _choice(rng: np.random.Generator, seq, k: int | None = None):
    if k is None:
        return seq[int(rng.integers(len(seq)))]
    return [seq[int(i)] for i in rng.permutation(len(seq))[:k]]


def _mc(rng: np.random.Generator, correct: str, pool) -> tuple[list[str], str]:
    """Four options (``"A. x"``) holding ``correct`` and three distractors from ``pool``; returns (options, letter)."""
    others = _choice(rng, [p for p in pool if p != correct], 3)
    values = [correct, *others]
    order = rng.permutation(4)
    values = [values[int(i)] for i in order]
    letter = LETTERS[values.index(correct)]
    return [f"{LETTERS[i]}. {v}" for i, v in enumerate(values)], letter


def _path(rng: np.random.Generator, direction: str, T: int, H: int, W: int, s: int) -> list[tuple[int, int]]:
    """Top-left corners of a size-``s`` object moving linearly across at least half the free range."""
    span = (W if direction in ("left", "right") else H) - s
    travel = int(rng.integers(span // 2, span + 1))
    start = int(rng.integers(0, span - travel + 1))
    other = int(rng.integers(0, (H if direction in ("left", "right") else W) - s + 1))
    sign = 1 if direction in ("right", "down") else -1
    begin = start if sign > 0 else start + travel
    out = []
    for t in range(T):
        p = min(span, _even(begin + sign * travel * t / (T - 1)))
        out.append((p, other) if direction in ("left", "right") else (other, p))
    return out


# ---------------------------------------------------------------- kinds


def _direction(rng, T, H, W) -> _Item:
    colour, direction = _choice(rng, list(PALETTE)), _choice(rng, DIRECTIONS)
    s = _even(min(H, W) / 4)
    video = _canvas((T, H, W))
    for t, (x, y) in enumerate(_path(rng, direction, T, H, W, s)):
        _rect(video[t], x, y, s, s, colour=PALETTE[colour])
    options, letter = _mc(rng, direction, DIRECTIONS)
    think = (f"Let me track the {colour} square frame by frame. Comparing its position in the first frames with "
             f"the last frames, it moves {PHRASES[direction]}. So it moves {direction}, option {letter}.")
    return _Item(video, f"In which direction does the {colour} square move?", "multiple choice", letter,
                 options, think)


def _first_colour(rng, T, H, W) -> _Item:
    c1, c2 = _choice(rng, list(PALETTE), 2)
    s = _even(min(H, W) / 4)
    k1 = int(rng.integers(0, 3))
    k2 = int(rng.integers(k1 + 2, SLOTS - 1))
    xs = [int(rng.integers(0, W // 2 - s)), int(rng.integers(W // 2, W - s))]
    if rng.integers(2):
        xs.reverse()
    video = _canvas((T, H, W))
    for colour, slot, x in ((c1, k1, xs[0]), (c2, k2, xs[1])):
        y = int(rng.integers(0, H - s + 1))
        _rect(video[_slot_frames(T, slot, SLOTS)], x, y, s, s, PALETTE[colour])
    options, letter = _mc(rng, c1, list(PALETTE))
    think = (f"Hmm, the last frame shows both a {c1} and a {c2} square, so one frame alone cannot tell the order. "
             f"Looking at the frames in order, the {c1} square is there before the {c2} one appears. "
             f"The answer is {letter}.")
    return _Item(video, "Two squares appear one after the other and both stay. Which colour appears first?",
                 "multiple choice", letter, options, think)


def _flashes(rng, T, H, W) -> _Item:
    count = int(rng.integers(1, 5))
    while True:
        slots = sorted(int(k) for k in rng.choice(SLOTS, size=count, replace=False))
        if all(b - a >= 2 for a, b in zip(slots, slots[1:])):
            break
    video = _canvas((T, H, W))
    for k in slots:
        _disc(video[_slot_frames(T, k, k + 1)], W / 2, H / 2, min(H, W) / 5, LIGHT)
    think = (f"Let me count the times the light turns on. It lights up in {count} separate moments, with dark "
             f"frames in between. So it flashes {count} times.")
    return _Item(video, "A light in the middle of the video turns on and off. How many times does it flash?",
                 "numerical", str(count), [], think)


def _font(size: int):
    return ImageFont.load_default(size=size)


def _ocr(rng, T, H, W) -> _Item:
    words = _choice(rng, WORDS, int(rng.integers(2, 5)))
    per = SLOTS // len(words)
    font = _font(max(10, H // 4))
    video = _canvas((T, H, W))
    for i, word in enumerate(words):
        img = Image.fromarray(_canvas((H, W)))
        ImageDraw.Draw(img).text((W / 2, H / 2), word, fill=LIGHT, font=font, anchor="mm")
        video[_slot_frames(T, i * per, (i + 1) * per)] = np.asarray(img)
    text = " ".join(words)
    think = (f"The video shows one word at a time. Reading them in order: {', '.join(words)}. "
             f"Together the text is \"{text}\".")
    return _Item(video, "Words are shown one after another. What text do they form, in order?", "OCR", text, [],
                 think)


def _grid(img: np.ndarray, cell: int) -> None:
    img[..., ::cell, :, :] = GRID_LINE
    img[..., :, ::cell, :] = GRID_LINE


def _distance(rng, T, H, W) -> _Item:
    cell = W // SLOTS
    cols, rows = W // cell, H // cell
    cells = int(rng.integers(1, cols))
    sign = 1 if rng.integers(2) else -1
    start = int(rng.integers(0, cols - cells)) + (0 if sign > 0 else cells)
    row = int(rng.integers(0, rows))
    video = _canvas((T, H, W))
    _grid(video, cell)
    lo, hi = T // SLOTS, T - T // SLOTS
    for t in range(T):
        moved = int(np.clip((t - lo) * cells / (hi - lo), 0, cells))
        _rect(video[t], (start + sign * moved) * cell + 2, row * cell + 2, cell - 3, cell - 3, PALETTE["green"])
    think = (f"Let me follow the green dot along the grid. It starts in column {start + 1} and ends in column "
             f"{start + sign * cells + 1}, so it travels {cells} cells.")
    return _Item(video, "A green dot moves along a grid of square cells. How many cells does it travel in total?",
                 "regression", str(cells), [], think)


def _describe(rng, T, H, W) -> _Item:
    colour, shape, direction = _choice(rng, list(PALETTE)), _choice(rng, ("square", "circle")), _choice(rng, DIRECTIONS)
    s = _even(min(H, W) / 4)
    video = _canvas((T, H, W))
    for t, (x, y) in enumerate(_path(rng, direction, T, H, W, s)):
        if shape == "square":
            _rect(video[t], x, y, s, s, PALETTE[colour])
        else:
            _disc(video[t], x + s / 2, y + s / 2, s / 2, PALETTE[colour])
    answer = f"A {colour} {shape} moves {PHRASES[direction]}."
    think = f"There is one {colour} {shape}. Watching the frames in order, it moves {PHRASES[direction]}."
    return _Item(video, "Describe in one sentence what moves in the video and in which direction.", "free-form",
                 answer, [], think)


def _image_cells(rng, H, W, k: int) -> list[tuple[int, int, int, int]]:
    """``k`` distinct cells of a 4x3 layout as (x, y, w, h)."""
    cw, ch = W // 4, H // 3
    return [((i % 4) * cw, (i // 4) * ch, cw, ch) for i in sorted(int(j) for j in rng.choice(12, k, replace=False))]


def _count_image(rng, T, H, W) -> _Item:
    count = int(rng.integers(1, 7))
    img = _canvas((H, W))
    for x, y, cw, ch in _image_cells(rng, H, W, count):
        s = _even(min(cw, ch) * 0.6)
        _rect(img, x + (cw - s) // 2, y + (ch - s) // 2, s, s, PALETTE[_choice(rng, list(PALETTE))])
    think = f"Let me count the squares one by one, row by row. I count {count} squares."
    return _Item(img, "How many squares are in the image?", "numerical", str(count), [], think)


def _colour_image(rng, T, H, W) -> _Item:
    colours = _choice(rng, list(PALETTE), 3)
    img = _canvas((H, W))
    cells = _image_cells(rng, H, W, 3)
    for i, (x, y, cw, ch) in enumerate(cells):
        s = _even(min(cw, ch) * 0.7)
        if i == 0:
            _disc(img, x + cw / 2, y + ch / 2, s / 2, PALETTE[colours[0]])
        else:
            _rect(img, x + (cw - s) // 2, y + (ch - s) // 2, s, s, PALETTE[colours[i]])
    options, letter = _mc(rng, colours[0], list(PALETTE))
    think = (f"There are one circle and two squares. The squares are {colours[1]} and {colours[2]}; the circle is "
             f"{colours[0]}. So the answer is {letter}.")
    return _Item(img, "What colour is the circle?", "multiple choice", letter, options, think)


KINDS: tuple[tuple[str, Callable[..., _Item]], ...] = (
    ("direction", _direction), ("first_colour", _first_colour), ("flashes", _flashes), ("ocr", _ocr),
    ("distance", _distance), ("describe", _describe), ("count_image", _count_image),
    ("colour_image", _colour_image),
)


# ---------------------------------------------------------------- writing


def encode_h264(frames: np.ndarray, path: str | Path, fps: float, crf: int = 10) -> None:
    """Encode uint8 [T, H, W, 3] RGB frames (H, W even) to an H.264 yuv420p mp4 at ``fps`` with PyAV."""
    av, path = pyav(), Path(path)
    tmp = path.with_name(path.name + ".part")
    with av.open(str(tmp), "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1000))
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": str(crf), "preset": "medium"}
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")))
        container.mux(stream.encode())
    os.replace(tmp, path)


def write_text(path: Path, text: str) -> None:  # atomic: .part + rename
    tmp = path.with_name(path.name + ".part")
    tmp.write_text(text)
    os.replace(tmp, path)


def _write_png(path: Path, img: np.ndarray) -> None:
    tmp = path.with_name(path.name + ".part")
    Image.fromarray(img).save(tmp, format="PNG")
    os.replace(tmp, path)


def _record(i: int, kind: str, item: _Item, rel: str) -> dict:
    return {"problem_id": i, "problem": item.problem, "data_type": "image" if item.media.ndim == 3 else "video",
            "problem_type": item.problem_type, "options": item.options, "solution": f"<answer>{item.answer}</answer>",
            "path": rel, "data_source": f"vr1fast-synthetic/{kind}"}


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def reusable(root: Path, params: dict, checksums: dict[str, str]) -> bool:
    """``root/manifest.json`` lists ``params``, the SHA-256 of each ``{file: manifest key}`` and media that exist."""
    try:
        manifest = json.loads((root / "manifest.json").read_text())
    except (OSError, ValueError):
        return False
    same = manifest.get("params") == params and all((root / name).is_file() and sha256_text(
        (root / name).read_text()) == manifest.get(key) for name, key in checksums.items())
    return same and all((root / f).is_file() for f in manifest.get("files", []))


def generate_synthetic(out_dir: str | Path, n: int = 24, seed: int = 0, size: tuple[int, int] = (112, 84),
                       frames: int = 32, fps: float = 4.0) -> SyntheticSet:
    """Write (or reuse) ``n`` synthetic records with their media under ``out_dir``.

    ``size`` is (width, height), both even and at least 56x56; ``frames`` a multiple of ``SLOTS`` (8). The
    default 32 frames at 4 fps last 8 s, so Video-R1's sampling (2 fps, at most 16 frames) takes 16 of them.
    Files are written atomically (``.part`` + rename) and the manifest last; a folder whose manifest matches
    the parameters and whose files are present is returned as is (``reused=True``). Concurrent calls on one
    folder (several ranks or test workers) are serialised by an exclusive lock on ``out_dir/.lock``.
    """
    W, H = size
    if n < 1 or W % 2 or H % 2 or W < 56 or H < 56 or frames < SLOTS or frames % SLOTS:
        raise ValueError(f"generate_synthetic: bad n={n}, size={size} or frames={frames} "
                         f"(need n>=1, even W,H >= 56, frames a multiple of {SLOTS})")
    root = Path(out_dir)
    params = dict(version=GENERATOR_VERSION, n=n, seed=seed, size=[W, H], frames=frames, fps=fps)
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        reused = reusable(root, params, {"rl.json": "rl_sha256", "sft.json": "sft_sha256"})
        if not reused:
            _write_set(root, params)
    return SyntheticSet(root, root / "rl.json", root / "sft.json", n, reused)


def _write_set(root: Path, params: dict) -> None:
    n, seed, (W, H), frames, fps = params["n"], params["seed"], params["size"], params["frames"], params["fps"]
    (root / "videos").mkdir(exist_ok=True)
    (root / "images").mkdir(exist_ok=True)
    (root / "manifest.json").unlink(missing_ok=True)
    rl, sft, files = [], [], []
    for i in range(n):
        kind, build = KINDS[i % len(KINDS)]
        item = build(np.random.default_rng([seed, i]), frames, H, W)
        if item.media.ndim == 4:
            rel = f"videos/{i:04d}_{kind}.mp4"
            encode_h264(item.media, root / rel, fps)
        else:
            rel = f"images/{i:04d}_{kind}.png"
            _write_png(root / rel, item.media)
        files.append(rel)
        rl.append(_record(i, kind, item, "./" + rel))
        sft.append({**rl[-1], "process": f"<think>{item.think}</think>"})
    _remove_stale(root, set(files))
    rl_text, sft_text = json.dumps(rl, indent=1) + "\n", json.dumps(sft, indent=1) + "\n"
    write_text(root / "rl.json", rl_text)
    write_text(root / "sft.json", sft_text)
    manifest = dict(params=params, files=files, rl_sha256=sha256_text(rl_text), sft_sha256=sha256_text(sft_text))
    write_text(root / "manifest.json", json.dumps(manifest, indent=1) + "\n")


def _remove_stale(root: Path, keep: set[str]) -> None:
    """Delete media this generator wrote earlier (``NNNN_<kind>.*``) that the new set does not list."""
    kinds = {k for k, _ in KINDS}
    for sub in ("videos", "images"):
        for p in (root / sub).iterdir():
            stem = p.name.split(".")[0]
            if stem[5:] in kinds and stem[:4].isdigit() and f"{sub}/{p.name}" not in keep:
                p.unlink()
