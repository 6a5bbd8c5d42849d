"""Video decoding with NVIDIA DALI (``video.backend = "dali"``): NVDEC on a GPU, DALI's CPU decoder elsewhere.

Same contract as the CPU path (:func:`vr1fast.data.video.read_video`): :class:`~vr1fast.data.video.Frames` with uint8
[T, H, W, 3] frames (on the GPU when decoded there), the same indices, frame count, fps and size. One DALI pipeline
per process and setting, built on first use and fed through ``external_source``::

    encoded bytes, frame indices[, size] ──► fn.decoders.video(device="mixed" | "cpu", frames=, pad_mode="none")
      resize="dali"  (GPU default) ──► fn.resize(size, INTERP_CUBIC, antialias=True) ──► torch by DLPack
      resize="torch" (CPU default) ──► torch by DLPack ──► video.resize_frames (the CPU path's own resize)

* Indices: :func:`~vr1fast.data.video.sample_frame_indices` of the frame count and fps of a PyAV probe, by the rule of
  :mod:`vr1fast.data.decode` (packets of the video stream, ``avg_frame_rate``), never DALI's ``uniform_sample``
  (it rounds ``floor(x + 0.5)``, torch half to even). The probe (that module's PyAV index pass, then the first
  frame for the rotation) runs once per file identity (path, size, mtime) and is kept for the process.
  ``pad_mode="none"``: an index past DALI's own frame count is an error, not a padded frame.
* Several videos in flight: :func:`read_videos` hands up to ``max_batch`` files to one pipeline run; DALI decodes
  the samples of a batch in parallel (across the NVDEC engines on a GPU).
* Outputs reach torch through DLPack with no copy (device memory on a GPU, ordered after DALI's stream by the
  protocol, no host sync): the pipeline runs DALI's dynamic executor (``exec_dynamic=True``), whose outputs belong
  to their holder and are not overwritten by the next run.
* Resize: on a GPU DALI's cubic (Keys a = −0.5) antialiased resize; on CPU by default the CPU path's own torch
  resize, so that the decoder is the only difference there (DALI's resize differs from it by at most 2, mean 0.003,
  on 640×360 → 420×224).
* Rotation: DALI ignores display matrices, so frames are resized to the unrotated size and turned afterwards with
  ``torch.rot90`` (the resize is separable and symmetric, so the order does not matter).
* Colours differ from FFmpeg's swscale (the CPU path): DALI converts with exact BT.601 limited-range coefficients
  (a flat colour comes out 1–2 off) and upsamples chroma differently. Measured on CPU, VP9: raw decodes against
  PyAV mean |Δ| 0.7–1.8 per channel, 99.9th percentile 2–5 on flat or smooth content, up to 50 (max ~100) at sharp
  chroma edges; :func:`read_videos` against ``read_video`` on 640×360 and 480×360 clips of flat coloured cells
  (tests/data/test_dali.py) mean ≤ 1.63 per channel, 99.9th percentile 27–34, max 59.
* Codecs: DALI's CPU decoder has only VP8, VP9 and MJPEG (its bundled FFmpeg lacks H.264 and HEVC since 2.1.1), so
  on CPU every other codec is decoded by PyAV (:func:`vr1fast.data.video.decode_cpu`) whatever the backend says,
  and the log says so once per process. On a GPU, codecs outside the Mixed backend's list go to PyAV, and a file
  DALI fails on is decoded by PyAV with a warning naming it (as qwen-vl-utils falls back from decord).
* ``video.decode_timeout_s`` bounds the probe and the PyAV fallback; a DALI run is not interrupted.
"""
from __future__ import annotations

import functools
import logging
import os
import threading
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal, Optional, Sequence, Union

import numpy as np
import torch

from vr1fast.config import VideoConfig
from vr1fast.data.decode import CCW_TURNS, clockwise_rotation, decode_frames, one_line, pyav
from vr1fast.data.video import Frames, decode_cpu, frame_size, resize_frames, sample_frame_indices
from vr1fast.errors import MediaError, Vr1fastError

logger = logging.getLogger(__name__)

PathLike = Union[str, Path]
Device = Literal["cpu", "gpu"]
INSTALL = "pip install 'vr1fast[dali]' (the nvidia-dali-cuda130 wheel, about 200 MB)"
CPU_CODECS = frozenset({"vp8", "vp9", "mjpeg"})  # DALI's CPU decoder (2.1.1 and later)
GPU_CODECS = CPU_CODECS | {"h264", "hevc", "av1", "libdav1d", "mpeg4"}  # Mixed backend (NVDEC; AV1 not on Hopper)
MAX_BATCH = 8     # videos per pipeline run
NUM_THREADS = 2   # DALI CPU threads per pipeline


class DaliNotInstalled(Vr1fastError, ImportError):
    """``video.backend=dali`` without NVIDIA DALI installed."""


@functools.lru_cache(maxsize=1)
def _dali():
    """The ``nvidia.dali`` package, or None when it cannot be imported."""
    try:
        import nvidia.dali
        import nvidia.dali.fn  # noqa: F401 - registers the operators used below
    except ImportError:
        return None
    return nvidia.dali


def available() -> bool:
    return _dali() is not None


def require():
    """``nvidia.dali``, or DaliNotInstalled saying how to install it."""
    dali = _dali()
    if dali is None:
        raise DaliNotInstalled(f"video.backend='dali' needs NVIDIA DALI, which is not installed: {INSTALL}")
    return dali


def default_device() -> Device:
    """Where :func:`read_videos` decodes by default: "gpu" (NVDEC) when CUDA is available, else "cpu"."""
    return "gpu" if torch.cuda.is_available() else "cpu"


@dataclass(frozen=True)
class VideoInfo:
    """What the probe learns of a file; height and width are the coded size, before rotation."""

    total_frames: int
    video_fps: float
    height: int
    width: int
    codec: str       # PyAV's decoder name: "h264", "hevc", "vp9", ...
    rotation: int    # clockwise degrees to turn the decoded frames, as vr1fast.data.decode reads it


def _probe_pyav(path: str, timeout_s: float) -> VideoInfo:
    """Frame count and fps from vr1fast.data.decode itself (PyAV, first frame only: its rule, its timeout), then
    the codec, coded size and rotation from the stream and its first frame."""
    count = decode_frames(path, lambda total, fps: [0], backend="pyav", timeout_s=timeout_s)
    av = pyav()
    try:
        with av.open(path) as container:
            stream = container.streams.best("video")
            height, width, codec = stream.codec_context.height, stream.codec_context.width, stream.codec_context.name
            first = next(container.decode(stream), None)
            rotation = clockwise_rotation(stream, first) if first is not None else 0
    except av.error.FFmpegError as e:
        raise MediaError(path, one_line(e)) from e
    return VideoInfo(count.total_frames, count.video_fps, height, width, codec, rotation)


@functools.lru_cache(maxsize=65536)
def _probe_cached(path: str, size: int, mtime_ns: int, timeout_s: float) -> VideoInfo:
    return _probe_pyav(path, timeout_s)


def probe(path: PathLike, timeout_s: float = VideoConfig.decode_timeout_s) -> VideoInfo:
    """Frame count, fps, size, codec and rotation of ``path``, probed once per (path, size, mtime) in this process;
    MediaError naming the file for one that cannot be read."""
    try:
        st = os.stat(path)
    except OSError as e:
        raise MediaError(path, "no such file" if isinstance(e, FileNotFoundError) else one_line(e)) from e
    if st.st_size == 0:
        raise MediaError(path, "empty file (0 bytes)")
    return _probe_cached(str(path), st.st_size, st.st_mtime_ns, timeout_s)


@dataclass(frozen=True)
class _Job:
    path: PathLike
    info: VideoInfo
    indices: tuple[int, ...]
    size: tuple[int, int]    # (h, w) of the output frames, upright


def _plan(path: PathLike, cfg: VideoConfig) -> _Job:
    info = probe(path, cfg.decode_timeout_s)
    try:
        indices = sample_frame_indices(info.total_frames, info.video_fps, cfg)
    except ValueError as e:
        raise MediaError(path, str(e)) from e
    upright = (info.width, info.height) if info.rotation in (90, 270) else (info.height, info.width)
    return _Job(path, info, tuple(indices), frame_size(path, len(indices), *upright, cfg))


class _Pipeline:
    """One built DALI pipeline: encoded files and their indices in, decoded (and maybe resized) frames out."""

    def __init__(self, device: Device, resize: bool, max_batch: int, num_threads: int):
        dali = require()
        fn, types = dali.fn, dali.types
        self.resize = resize

        @dali.pipeline_def(batch_size=max_batch, num_threads=num_threads, prefetch_queue_depth=1, exec_dynamic=True,
                           device_id=torch.cuda.current_device() if device == "gpu" else None)
        def graph():
            encoded = fn.external_source(name="encoded", dtype=types.UINT8, ndim=1)
            indices = fn.external_source(name="indices", dtype=types.INT32, ndim=1)
            video = fn.decoders.video(encoded, device="mixed" if device == "gpu" else "cpu", frames=indices,
                                      pad_mode="none")
            if not resize:
                return video
            size = fn.external_source(name="size", dtype=types.FLOAT, ndim=1)
            return fn.resize(video, size=size, interp_type=types.INTERP_CUBIC, antialias=True)

        self.pipe = graph()
        self.pipe.build()

    def run(self, jobs: Sequence[_Job]) -> list[torch.Tensor]:
        """uint8 [T, h, w, 3] per job, unrotated (h, w: the job's size before rotation when resizing here)."""
        self.pipe.feed_input("encoded", [np.fromfile(job.path, dtype=np.uint8) for job in jobs])
        self.pipe.feed_input("indices", [np.asarray(job.indices, dtype=np.int32) for job in jobs])
        if self.resize:
            self.pipe.feed_input("size", [np.asarray(_coded_size(job), dtype=np.float32) for job in jobs])
        (out,) = self.pipe.run()
        return [torch.from_dlpack(out[i]) for i in range(len(jobs))]


def _coded_size(job: _Job) -> tuple[int, int]:
    h, w = job.size
    return (w, h) if job.info.rotation in (90, 270) else (h, w)


_PIPELINES: dict[tuple, _Pipeline] = {}
_LOCK = threading.Lock()  # a DALI pipeline serves one caller at a time


_cpu_fallback_logged = threading.Event()


def _log_cpu_fallback(codec: str) -> None:
    """Says once per process that files DALI's CPU decoder cannot read go to PyAV."""
    if _cpu_fallback_logged.is_set():
        return
    _cpu_fallback_logged.set()
    logger.warning("video.backend=dali on CPU: DALI's CPU decoder has no %s decoder (it decodes only VP8, VP9 "
                   "and MJPEG), so such files are decoded with PyAV (logged once)", codec)


def _pyav(job: _Job, cfg: VideoConfig, device: Device) -> Frames:
    """PyAV's Frames for ``job``, on the GPU when DALI would have put them there."""
    frames = decode_cpu(job.path, replace(cfg, backend="pyav"))
    return replace(frames, frames=frames.frames.cuda()) if device == "gpu" else frames


def _finish(job: _Job, frames: torch.Tensor, resized: bool) -> Frames:
    if not resized:
        frames = resize_frames(frames, *_coded_size(job))
    turns = CCW_TURNS.get(job.info.rotation, 0)
    if turns:
        frames = torch.rot90(frames, turns, dims=(1, 2)).contiguous()
    info = job.info
    sample_fps = len(job.indices) / max(info.total_frames, 1e-6) * info.video_fps
    return Frames(frames, job.indices, info.total_frames, info.video_fps, sample_fps)


def _decode_batch(jobs: Sequence[_Job], key: tuple, cfg: VideoConfig) -> list[Frames]:
    """Decode ``jobs`` in one run; if DALI fails, the pipeline is rebuilt and each job retried alone, a job that
    fails alone going to PyAV with a warning naming its file."""
    device, resize = key[0], key[1]
    with _LOCK:
        try:
            pipeline = _PIPELINES.get(key)
            if pipeline is None:
                pipeline = _PIPELINES[key] = _Pipeline(*key)
            return [_finish(j, f, resize) for j, f in zip(jobs, pipeline.run(jobs))]
        except RuntimeError as e:
            _PIPELINES.pop(key, None)  # a failed run leaves the pipeline unusable
            if len(jobs) == 1:
                logger.warning("DALI (%s) could not decode %s (%s): decoding it with PyAV", device, jobs[0].path,
                               one_line(e))
                return [_pyav(jobs[0], cfg, device)]
    return [frames for job in jobs for frames in _decode_batch([job], key, cfg)]


def read_videos(paths: Sequence[PathLike], cfg: Optional[VideoConfig] = None, *, device: Optional[Device] = None,
                resize: Optional[Literal["dali", "torch"]] = None, max_batch: int = MAX_BATCH,
                num_threads: int = NUM_THREADS) -> list[Frames]:
    """:class:`Frames` of each of ``paths``, as :func:`vr1fast.data.video.read_video` gives them, decoded by DALI
    ``max_batch`` at a time (module docstring). ``device``: "gpu" (Mixed backend, NVDEC) or "cpu", default
    :func:`default_device`; ``resize``: "dali" or "torch", default "dali" on a GPU and "torch" on CPU. Raises
    DaliNotInstalled without DALI, MediaError naming the file for one that cannot be read."""
    require()
    cfg = cfg or VideoConfig()
    device = device or default_device()
    key = (device, (resize or ("dali" if device == "gpu" else "torch")) == "dali", max_batch, num_threads)
    jobs = [_plan(path, cfg) for path in paths]
    codecs = GPU_CODECS if device == "gpu" else CPU_CODECS
    out: dict[int, Frames] = {}
    for k, job in enumerate(jobs):
        if job.info.codec not in codecs:
            if device == "cpu":
                _log_cpu_fallback(job.info.codec)
            out[k] = _pyav(job, cfg, device)
    todo = [k for k in range(len(jobs)) if k not in out]
    for start in range(0, len(todo), max_batch):
        chunk = todo[start:start + max_batch]
        out.update(zip(chunk, _decode_batch([jobs[k] for k in chunk], key, cfg)))
    return [out[k] for k in range(len(jobs))]
