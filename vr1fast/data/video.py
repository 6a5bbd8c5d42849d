"""Frames on CPU: qwen-vl-utils' video and image preprocessing as Video-R1 trains it, without torchvision.

Video (``fetch_video`` with Video-R1's constants, all in :class:`~vr1fast.config.VideoConfig`)::

    n   = floor_2( min( max(total / video_fps · fps, ceil_2(min_frames)), floor_2(min(max_frames, total)), total ) )
          (or round_2(cfg.nframes) when set; 2 ≤ n ≤ total, else an error)
    idx = round_half_even( linspace(0, total − 1, n) )      float32 linspace, as torch computes it
    sample_fps = n / total · video_fps
    per-frame pixels: min = min_pixels, max = max( min(max_pixels, total_pixels / n · 2), int(1.05 · min_pixels) )
    (H, W) → smart_resize → bicubic, antialias, clamp, round → uint8

``total`` and ``video_fps`` come from the decoder's index (:mod:`vr1fast.data.decode`), not duration × fps.
Training settings (``VideoConfig()``): 2 fps, 4..16 frames, 100 352..105 369 pixels per frame, so 1280×720
becomes 224×420. Evaluation: ``config.eval_video(frames)`` (256·28·28, 16/32/64 frames).

Images (``fetch_image``): Pillow decode, RGBA pasted on white through its alpha (other modes
``convert("RGB")``), smart_resize with the image bounds (3 136..200 704 pixels), Pillow bicubic resize.

Deviations from Video-R1, all deliberate: frames are returned as uint8 [T, H, W, 3] (qwen-vl-utils returns
the same integer values as float32 [T, 3, H, W]); smart_resize keeps every side ≥ 28 when shrinking (newer
qwen-vl-utils and transformers do; Video-R1's copy returns a 0 side for aspect ratios beyond ~130:1 and then
crashes); an unreadable file raises :class:`~vr1fast.errors.MediaError` instead of falling back to
torchvision or to another sample; ``video_start``/``video_end`` are not supported (Video-R1's decord path
raises for them too).

With a :class:`~vr1fast.data.frame_cache.FrameCache` (``data.frame_cache``) the sampled, resized frames of a video
are read back from disk after the first time, keyed by the file and :func:`cache_settings`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from vr1fast.config import VideoConfig
from vr1fast.data.decode import decode_frames, decord_available
from vr1fast.data.frame_cache import FrameCache
from vr1fast.errors import MediaError
from vr1fast.model.qwen import IMAGE_FACTOR

PathLike = Union[str, Path]
_DEFAULTS = VideoConfig()
_RESIZE_CHUNK_ELEMS = 1 << 25  # float32 elements per interpolate call (128 MiB in, bounded memory)
_NOT_FRAME_SETTINGS = ("image_min_pixels", "image_max_pixels", "decode_timeout_s")
FRAME_CACHE_VERSION = 1  # part of every frame-cache key: bump when decoding, sampling or resizing changes its output


@dataclass(frozen=True, eq=False)
class Frames:
    """Sampled, resized frames of one video and what qwen-vl-utils reports about them."""

    frames: torch.Tensor        # uint8 [T, H, W, 3], H and W multiples of 28
    indices: tuple[int, ...]    # frame indices into the decoder's index, ascending, len T
    total_frames: int           # frame count from the decoder's index
    video_fps: float            # the container's average frame rate
    sample_fps: float           # T / total_frames · video_fps


def _round_by(x: float, factor: int) -> int:
    return round(x / factor) * factor  # Python round: half to even


def _ceil_by(x: float, factor: int) -> int:
    return math.ceil(x / factor) * factor


def _floor_by(x: float, factor: int) -> int:
    return math.floor(x / factor) * factor


def num_frames(total_frames: int, video_fps: float, cfg: Optional[VideoConfig] = None) -> int:
    """qwen-vl-utils' ``smart_nframes``: the frame count n of the module docstring; ValueError if n ∉ [2, total]."""
    cfg = cfg or _DEFAULTS
    factor = cfg.frame_factor
    if cfg.nframes is not None:
        n = _round_by(cfg.nframes, factor)
    else:
        if not (video_fps > 0 and math.isfinite(video_fps)):
            raise ValueError(f"video fps must be a positive number, got {video_fps}")
        min_frames = _ceil_by(cfg.min_frames, factor)
        max_frames = _floor_by(min(cfg.max_frames, total_frames), factor)
        n = min(max(total_frames / video_fps * cfg.fps, min_frames), max_frames, total_frames)
        n = _floor_by(n, factor)
    if not factor <= n <= total_frames:
        raise ValueError(f"cannot sample {n} of {total_frames} frame(s) (need {factor} <= n <= frame count)")
    return n


def sample_frame_indices(total_frames: int, video_fps: float, cfg: Optional[VideoConfig] = None) -> list[int]:
    """``round(linspace(0, total − 1, n))`` in float32 with torch's half-to-even rounding; n from :func:`num_frames`."""
    n = num_frames(total_frames, video_fps, cfg)
    grid = torch.linspace(0, total_frames - 1, n, dtype=torch.float32)
    return grid.round().long().tolist()


def video_pixel_bounds(nframes: int, cfg: Optional[VideoConfig] = None) -> tuple[int, float]:
    """Per-frame (min_pixels, max_pixels) for a video of ``nframes`` sampled frames (VIDEO_TOTAL_PIXELS rule)."""
    cfg = cfg or _DEFAULTS
    budget = cfg.total_pixels / nframes * cfg.frame_factor
    return cfg.min_pixels, max(min(cfg.max_pixels, budget), int(cfg.min_pixels * 1.05))


def smart_resize(height: int, width: int, factor: int = IMAGE_FACTOR,
                 min_pixels: float = _DEFAULTS.image_min_pixels, max_pixels: float = _DEFAULTS.image_max_pixels,
                 max_ratio: float = _DEFAULTS.max_ratio) -> tuple[int, int]:
    """(h, w), multiples of ``factor``, near the aspect ratio of (height, width), about within the pixel bounds.

    Round each side to the nearest multiple (half to even, at least ``factor``); if the area exceeds
    ``max_pixels`` scale by β = √(H·W/max) and floor (at least ``factor``); if below ``min_pixels`` scale by
    β = √(min/(H·W)) and ceil. The result is not re-checked against the bounds (as in qwen-vl-utils). Defaults
    are the image bounds; videos pass :func:`video_pixel_bounds`. ValueError for an aspect ratio > max_ratio.
    """
    if height <= 0 or width <= 0:
        raise ValueError(f"smart_resize: height and width must be positive, got {height}x{width}")
    if max(height, width) / min(height, width) > max_ratio:
        raise ValueError(f"absolute aspect ratio must be at most {max_ratio:g}, got {height}x{width}")
    h_bar = max(factor, _round_by(height, factor))
    w_bar = max(factor, _round_by(width, factor))
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h_bar = max(factor, _floor_by(height / beta, factor))
        w_bar = max(factor, _floor_by(width / beta, factor))
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = _ceil_by(height * beta, factor)
        w_bar = _ceil_by(width * beta, factor)
    return h_bar, w_bar


def resize_frames(frames: torch.Tensor, height: int, width: int, chunk: Optional[int] = None) -> torch.Tensor:
    """uint8 [T, H, W, 3] → uint8 [T, height, width, 3] on the same device.

    Equals torchvision v1 ``F.resize(x, [height, width], BICUBIC, antialias=True)`` on the uint8 [T, 3, H, W]
    view qwen-vl-utils passes it: cast to float32, ``F.interpolate(mode="bicubic", align_corners=False,
    antialias=True)`` (Keys a = −0.5 with a widened support, as PIL), clamp to [0, 255], round half to even,
    cast to uint8; unchanged when the size already matches. The input is made contiguous NCHW first: the float
    result is the same as from the channels-last view torchvision receives, and the kernel runs ~1.7× faster
    on CPU. ``interpolate`` takes ``chunk`` frames at a time (default: as many as fit in 2^25 float32
    elements) to bound memory; frames are independent, so chunking does not change the result.
    """
    t, h, w, _ = frames.shape
    if (h, w) == (height, width):
        return frames
    out = torch.empty((t, height, width, 3), dtype=torch.uint8, device=frames.device)
    step = chunk or max(1, _RESIZE_CHUNK_ELEMS // (3 * max(h * w, height * width)))
    for a in range(0, t, step):
        x = frames[a:a + step].permute(0, 3, 1, 2).contiguous().float()
        y = F.interpolate(x, size=(height, width), mode="bicubic", align_corners=False, antialias=True)
        out[a:a + step] = y.clamp_(0, 255).round_().to(torch.uint8).permute(0, 2, 3, 1)
    return out


def frame_size(path: PathLike, nframes: int, height: int, width: int, cfg: VideoConfig) -> tuple[int, int]:
    """The (h, w) ``nframes`` upright frames of ``height``×``width`` are resized to: smart_resize with
    :func:`video_pixel_bounds`; MediaError naming ``path`` for an extreme aspect ratio."""
    min_pixels, max_pixels = video_pixel_bounds(nframes, cfg)
    try:
        return smart_resize(height, width, IMAGE_FACTOR, min_pixels, max_pixels, cfg.max_ratio)
    except ValueError as e:
        raise MediaError(path, str(e)) from e


def decode_cpu(path: PathLike, cfg: VideoConfig) -> Frames:
    """:class:`Frames` of ``path`` from a CPU decoder (``cfg.backend``: auto, decord or pyav) and the torch resize."""
    decoded = decode_frames(path, lambda total, fps: sample_frame_indices(total, fps, cfg),
                            backend=cfg.backend, timeout_s=cfg.decode_timeout_s)
    n, h, w, _ = decoded.frames.shape
    frames = resize_frames(torch.from_numpy(decoded.frames), *frame_size(path, n, h, w, cfg))
    sample_fps = n / max(decoded.total_frames, 1e-6) * decoded.video_fps
    return Frames(frames, decoded.indices, decoded.total_frames, decoded.video_fps, sample_fps)


def _decode_video(path: PathLike, cfg: VideoConfig) -> Frames:
    if cfg.backend == "dali":
        from vr1fast.data import dali  # optional dependency: imported only when asked for

        return dali.read_videos([path], cfg)[0]
    return decode_cpu(path, cfg)


def cache_settings(cfg: VideoConfig) -> dict:
    """What a frame-cache key holds besides the file: every VideoConfig field that can change a video's frames (all
    but the image bounds and the timeout), with ``backend`` resolved (auto is decord where installed; dali names its
    device, "dali-cpu" or "dali-gpu") and the cache format version."""
    settings = {f.name: getattr(cfg, f.name) for f in fields(cfg) if f.name not in _NOT_FRAME_SETTINGS}
    if cfg.backend == "dali":
        from vr1fast.data import dali

        settings["backend"] = f"dali-{dali.default_device()}"
    else:
        settings["backend"] = "decord" if cfg.backend != "pyav" and decord_available() else "pyav"
    return settings | {"version": FRAME_CACHE_VERSION}


def read_video(path: PathLike, cfg: Optional[VideoConfig] = None, cache: Optional[FrameCache] = None) -> Frames:
    """Decode, sample and resize one video as Video-R1 trains (cfg None = ``VideoConfig()``); with ``cache``
    (``frame_cache.frame_cache(data_cfg)``) read back the frames of an earlier call instead, else store them.
    ``cfg.backend == "dali"`` decodes through :mod:`vr1fast.data.dali` (frames on the GPU there, unless cached: the
    cache holds and returns them on the CPU).

    Raises MediaError naming ``path`` for a missing, empty, truncated or undecodable file, one with too few
    frames, an extreme aspect ratio, or a decode slower than ``cfg.decode_timeout_s``.
    """
    cfg = cfg or _DEFAULTS
    if cache is None:
        return _decode_video(path, cfg)

    def build() -> tuple[torch.Tensor, dict]:
        f = _decode_video(path, cfg)
        return f.frames.cpu(), dict(indices=list(f.indices), total_frames=f.total_frames, video_fps=f.video_fps,
                                    sample_fps=f.sample_fps)

    frames, meta = cache.fetch(path, cache_settings(cfg), build)
    return Frames(frames, tuple(meta["indices"]), meta["total_frames"], meta["video_fps"], meta["sample_fps"])


def load_video(path: PathLike, cfg: Optional[VideoConfig] = None, cache: Optional[FrameCache] = None) -> torch.Tensor:
    """uint8 [T, H, W, 3]: the frames of :func:`read_video`."""
    return read_video(path, cfg, cache).frames


def load_media(path: PathLike, data_type: str, cfg: Optional[VideoConfig] = None,
               cache: Optional[FrameCache] = None) -> torch.Tensor:
    """A record's media by its ``data_type``: "video" → :func:`load_video` (through ``cache`` when given),
    otherwise :func:`load_image` (never cached: decoding an image costs about what reading it back would)."""
    return load_video(path, cfg, cache) if data_type == "video" else load_image(path, cfg)


def _to_rgb(image: Image.Image) -> Image.Image:
    """qwen-vl-utils' ``to_rgb``: RGBA is pasted on white through its alpha; every other mode is converted."""
    if image.mode == "RGBA":
        white = Image.new("RGB", image.size, (255, 255, 255))
        white.paste(image, mask=image.split()[3])
        return white
    return image.convert("RGB")


def load_image(path: PathLike, cfg: Optional[VideoConfig] = None) -> torch.Tensor:
    """uint8 [H, W, 3]: qwen-vl-utils' ``fetch_image`` (module docstring) with ``cfg.image_*_pixels`` bounds."""
    cfg = cfg or _DEFAULTS
    try:
        with Image.open(path) as image:
            image.load()
            rgb = _to_rgb(image)
        h, w = smart_resize(rgb.height, rgb.width, IMAGE_FACTOR, cfg.image_min_pixels, cfg.image_max_pixels,
                            cfg.max_ratio)
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise MediaError(path, " ".join(f"{type(e).__name__}: {e}".split())) from e
    resized = rgb.resize((w, h), Image.Resampling.BICUBIC)
    return torch.from_numpy(np.array(resized, dtype=np.uint8))
