"""Real test media, encoded with PyAV into a folder the test owns: indexed videos, images and broken files.

Every frame of an *indexed* video carries its own index: the frame is a 2×4 grid of flat cells, cell
j = row·4 + col shows ``PALETTE[j]`` when bit j of the index is set and a dark shade of it otherwise. The
colours differ per cell, so the pattern also tells orientation (a rotated or mirrored frame no longer matches),
and flat cells survive lossy encoding and resizing; :func:`frame_index` reads the index back from a decoded,
possibly resized frame. Indices up to 255 fit.

API (import as ``from media import ...``; ``tests/`` is on sys.path through its conftest)::

    indexed_frames(n, height, width)                    -> uint8 [n, H, W, 3]
    frame_index(frame)                                  -> int       (frame: uint8 [H, W, 3], any size)
    write_video(path, frames, fps, codec="h264", rotate=0, pts=None, gop=None) -> Path
    make_indexed_video(path, n_frames, fps, height, width, **write_video_kwargs) -> Path
    vfr_timestamps(n_fast, fast_fps, n_slow, slow_fps)  -> list[float]   seconds, spacing changes mid-file
    make_broken_media(folder)                           -> dict[str, Path]
    decode_all_frames(path)                             -> uint8 [N, H, W, 3]  (plain sequential PyAV decode)
    sample_media(sample, frames)                        -> a record's media, frames evenly spaced (for later stages)
    prompt_inputs(tokenizer, picks)                     -> model inputs of the PromptBatch of (sample, frames) picks
    random_frames(t, h, w, seed=0)                      -> uint8 [t, h, w, 3] uniform noise
    conversation(question, kind)                        -> one user turn: a "video"/"image" entry, then the text

``codec`` is "h264" (libx264, .mp4/.mkv), "vp9" (libvpx-vp9, .webm/.mkv/.mp4), "hevc" (libx265, .mp4/.mkv) or
"mpeg4"; ``rotate`` writes a display matrix rotating the picture ``rotate`` degrees counter-clockwise for display (PyAV's
``set_display_rotation``; players, decord and vr1fast turn the frames accordingly); ``pts`` gives per-frame
timestamps in seconds for variable frame rate files.
"""
from __future__ import annotations

from fractions import Fraction
from pathlib import Path
from typing import Optional, Sequence

import av
import numpy as np
import torch

PALETTE = np.array([[230, 40, 40], [40, 220, 40], [40, 60, 230], [230, 220, 40],
                    [220, 40, 220], [40, 220, 220], [240, 140, 30], [150, 60, 240]], dtype=np.uint8)
_OFF = (PALETTE.astype(np.int32) // 4 + 8).astype(np.uint8)
_ROWS, _COLS = 2, 4

ENCODERS = {"h264": "libx264", "vp9": "libvpx-vp9", "mpeg4": "mpeg4", "hevc": "libx265"}
_ENCODER_OPTIONS = {
    "h264": {"crf": "6", "preset": "veryfast"},
    "vp9": {"crf": "6", "b": "0", "deadline": "realtime", "cpu-used": "8"},
    "mpeg4": {"qscale": "2"},
    "hevc": {"crf": "6", "preset": "ultrafast", "x265-params": "log-level=none"},
}


def _cell_bounds(size: int, parts: int) -> list[int]:
    return [round(k * size / parts) for k in range(parts + 1)]


def indexed_frames(n: int, height: int, width: int) -> np.ndarray:
    """uint8 [n, height, width, 3]; frame i shows the bits of i in the coloured 2×4 cell grid."""
    if n > 2 ** (_ROWS * _COLS):
        raise ValueError(f"indexed_frames: at most {2 ** (_ROWS * _COLS)} frames, got {n}")
    out = np.empty((n, height, width, 3), dtype=np.uint8)
    ys, xs = _cell_bounds(height, _ROWS), _cell_bounds(width, _COLS)
    for i in range(n):
        for r in range(_ROWS):
            for c in range(_COLS):
                j = r * _COLS + c
                colour = PALETTE[j] if (i >> j) & 1 else _OFF[j]
                out[i, ys[r]:ys[r + 1], xs[c]:xs[c + 1]] = colour
    return out


def frame_index(frame) -> int:
    """The index painted by :func:`indexed_frames`, read from the centre half of each cell of ``frame``."""
    f = np.asarray(frame, dtype=np.float64)
    h, w = f.shape[:2]
    ys, xs = _cell_bounds(h, _ROWS), _cell_bounds(w, _COLS)
    index = 0
    for r in range(_ROWS):
        for c in range(_COLS):
            j = r * _COLS + c
            y0, y1, x0, x1 = ys[r], ys[r + 1], xs[c], xs[c + 1]
            dy, dx = (y1 - y0) // 4, (x1 - x0) // 4
            mean = f[y0 + dy:y1 - dy, x0 + dx:x1 - dx].reshape(-1, 3).mean(axis=0)
            if np.linalg.norm(mean - PALETTE[j]) < np.linalg.norm(mean - _OFF[j]):
                index |= 1 << j
    return index


def vfr_timestamps(n_fast: int, fast_fps: float, n_slow: int, slow_fps: float) -> list[float]:
    """Timestamps (s): ``n_fast`` frames at ``fast_fps``, then ``n_slow`` frames at ``slow_fps``."""
    fast = [k / fast_fps for k in range(n_fast)]
    start = n_fast / fast_fps
    return fast + [start + k / slow_fps for k in range(n_slow)]


def write_video(path, frames, fps: float, codec: str = "h264", rotate: int = 0,
                pts: Optional[Sequence[float]] = None, gop: Optional[int] = None) -> Path:
    """Encode ``frames`` (uint8 [T, H, W, 3], RGB, H and W even) into ``path``; the suffix picks the container."""
    frames = np.asarray(frames, dtype=np.uint8)
    if codec not in ENCODERS:
        raise ValueError(f"write_video: codec must be one of {sorted(ENCODERS)}, got {codec!r}")
    path = Path(path)
    with av.open(str(path), "w") as container:
        stream = container.add_stream(ENCODERS[codec], rate=Fraction(fps).limit_denominator(100000))
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        stream.options = dict(_ENCODER_OPTIONS[codec])
        if gop is not None:
            stream.codec_context.gop_size = gop
        if pts is not None:
            stream.codec_context.time_base = Fraction(1, 1000)
        if rotate:
            stream.set_display_rotation(rotate)
        for i, rgb in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
            if pts is not None:
                frame.pts, frame.time_base = round(pts[i] * 1000), Fraction(1, 1000)
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return path


def make_indexed_video(path, n_frames: int, fps: float, height: int = 48, width: int = 64, **kwargs) -> Path:
    """:func:`write_video` of :func:`indexed_frames`; kwargs: codec, rotate, pts, gop."""
    return write_video(path, indexed_frames(n_frames, height, width), fps, **kwargs)


def decode_all_frames(path) -> np.ndarray:
    """Every frame of ``path`` in decode-output order as uint8 RGB [N, H, W, 3], unrotated (plain PyAV)."""
    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


def sample_media(sample, frames: int):
    """A record's media as uint8 [T, H, W, 3] (``frames`` evenly spaced, decoded in order) or [H, W, 3], at the
    file's own size: independent of ``vr1fast.data.video``, for tests of later stages."""
    if sample.data_type == "image":
        from PIL import Image

        return torch.from_numpy(np.array(Image.open(sample.path).convert("RGB")))
    video = decode_all_frames(sample.path)
    return torch.from_numpy(video[np.round(np.linspace(0, len(video) - 1, frames)).astype(int)])


def prompt_inputs(tokenizer, picks):
    """(sample, frames) pairs → ``build_prompt_batch(...).model_inputs()`` of their RL prompts (left-padded)."""
    from vr1fast.data.processor import build_prompt_batch
    from vr1fast.data.prompts import build_messages

    messages, media_list = [build_messages(s) for s, _ in picks], [sample_media(s, f) for s, f in picks]
    return build_prompt_batch(tokenizer, messages, media_list).model_inputs()


def random_frames(t: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (t, h, w, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def conversation(question: str, kind: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": kind}, {"type": "text", "text": question}]}]


def _write_audio_only(path: Path) -> Path:
    with av.open(str(path), "w") as container:
        stream = container.add_stream("aac", rate=16000)
        tone = (0.2 * np.sin(np.arange(16000) / 16000 * 2 * np.pi * 440)).astype(np.float32)
        for start in range(0, 16000, 1024):
            chunk = tone[None, start:start + 1024]
            frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(chunk), format="fltp", layout="mono")
            frame.sample_rate, frame.pts = 16000, start
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return path


def make_broken_media(folder) -> dict[str, Path]:
    """Files no decoder can read, by kind: zero_byte, truncated, garbage, unknown_codec, audio_only, one_frame.

    * truncated: the first half of an H.264 mp4 whose ``moov`` index sits at the end (so it is lost);
    * garbage: 4 KiB of random bytes named ``.mp4``;
    * unknown_codec: a valid mp4 whose sample-entry fourcc ``avc1`` was rewritten to ``zzzz`` (no decoder);
    * audio_only: an AAC-only mp4 (no video stream);
    * one_frame: a valid one-frame H.264 mp4 (too short to sample two frames from).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    good = make_indexed_video(folder / "_source.mp4", 30, 30)
    data = good.read_bytes()
    out = {"zero_byte": folder / "zero_byte.mp4", "truncated": folder / "truncated.mp4",
           "garbage": folder / "garbage.mp4", "unknown_codec": folder / "unknown_codec.mp4"}
    out["zero_byte"].write_bytes(b"")
    out["truncated"].write_bytes(data[: len(data) // 2])
    out["garbage"].write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    entry = data.find(b"avc1", data.find(b"stsd"))
    if data.find(b"stsd") < 0 or entry < 0:
        raise RuntimeError("make_broken_media: no 'avc1' sample entry in the source mp4")
    out["unknown_codec"].write_bytes(data[:entry] + b"zzzz" + data[entry + 4:])
    out["audio_only"] = _write_audio_only(folder / "audio_only.mp4")
    out["one_frame"] = make_indexed_video(folder / "one_frame.mp4", 1, 30)
    return out
