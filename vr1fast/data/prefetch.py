"""The prompt stream of a run, its next micro-batches' media decoded by worker threads while the step runs.

The stream's future is known: each call takes the next ``train.prompts_per_rank × world_size`` items from the
position the previous call returned (``Sampler.take``), whatever the decoding gave. So with
``data.prefetch_workers`` > 0, :class:`PromptStream` decodes (and resizes, through the frame cache when it is on)
the primary media of the next ``data.prefetch_depth`` micro-batches in a thread pool; PyAV, decord and the torch
resize run without the GIL. What the caller gets is :func:`vr1fast.data.loader.next_prompts`' answer exactly:

* a decode error is stored with its sample and raised (naming the file) when that sample is consumed;
* with ``data.skip_bad`` a replacement depends on the failure, so replacement draws are decoded at consume time by
  the synchronous :func:`~vr1fast.data.loader.load_samples` with the step's seed, as without prefetching;
* the caller owns the position (a checkpoint stores the consumed samples' only): a call from a position other than
  the predicted one (the first call, a resume) discards the work in flight and starts again from it.

The processor (tokenising, the shuffled copy) still runs inside the step: it needs the step's seed and the
replacements. ``with stream:`` stops the workers on return and on an exception (queued decodes are cancelled, a
running one finishes).

A worker's torch ops (the resize) run in an OpenMP team of one thread. With GNU OpenMP a thread's first parallel
region starts a team of ``omp_get_max_threads()`` threads that lives on; once a process manages more OpenMP
threads than it has cores, libgomp stops spin-waiting and every small op of the main thread pays a futex wake-up:
measured on 2 cores, the demo's rollout went from 0.60 to 1.1-1.25 s per step with default-size worker teams
and back to 0.61 s with teams of one. ``torch.set_num_threads`` would change the main thread's count too (and
with it the float summation order), so the worker calls the OpenMP runtime's own per-thread
``omp_set_num_threads``.
"""
from __future__ import annotations

import ctypes
import functools
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from vr1fast.config import Config
from vr1fast.data.dataset import Position, Records, Sample, Sampler
from vr1fast.data.frame_cache import frame_cache
from vr1fast.data.loader import load_samples, next_prompts
from vr1fast.data.video import load_media


@functools.cache
def _openmp_runtime() -> Optional[ctypes.CDLL]:
    """The OpenMP runtime this process loaded (torch's libgomp, or an Intel / LLVM one), None if none is mapped."""
    maps = Path("/proc/self/maps")
    names = {line.split()[-1] for line in maps.read_text().splitlines()} if maps.exists() else set()
    found = sorted(n for n in names if Path(n).name.startswith(("libgomp", "libiomp", "libomp")) and ".so" in n)
    return ctypes.CDLL(found[0]) if found else None


def _one_openmp_thread() -> None:
    """A worker's initializer: its torch ops run in an OpenMP team of one (module docstring)."""
    runtime = _openmp_runtime()
    if runtime is not None:
        runtime.omp_set_num_threads(1)


@dataclass(frozen=True)
class _Window:
    """One future call: its start position, this rank's indices, the position after it, their decodes."""

    position: Position
    indices: list[int]
    after: Position
    media: list[Future]


class PromptStream:
    """``next_prompts(position, seed)`` of one rank, prefetching when ``cfg.data.prefetch_workers`` > 0."""

    def __init__(self, records: Records, sampler: Sampler, cfg: Config, *, rank: int, world_size: int):
        self.records, self.sampler, self.cfg, self.rank, self.world_size = records, sampler, cfg, rank, world_size
        workers = cfg.data.prefetch_workers
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="vr1fast-prefetch",
                                        initializer=_one_openmp_thread) if workers else None
        self._ahead: deque[_Window] = deque()

    def next_prompts(self, position: Position, seed: int) -> tuple[list[Sample], list[torch.Tensor], int, Position]:
        """This rank's samples and media from ``position``, the broken files skipped and the position after
        (:func:`vr1fast.data.loader.next_prompts`); schedules the next ``data.prefetch_depth`` micro-batches."""
        if self._pool is None:
            return next_prompts(self.records, self.sampler, position, self.cfg, rank=self.rank,
                                world_size=self.world_size, seed=seed)
        if not self._ahead or self._ahead[0].position != position:
            self._discard()
            self._ahead.append(self._submit(position))
        head = self._ahead.popleft()
        while len(self._ahead) < self.cfg.data.prefetch_depth:
            self._ahead.append(self._submit(self._ahead[-1].after if self._ahead else head.after))
        samples, media, skipped = load_samples(self.records, head.indices, self.cfg, seed,
                                               [future.result for future in head.media])
        return samples, media, skipped, head.after

    def _submit(self, position: Position) -> _Window:
        indices, after = self.sampler.take(position, self.cfg.train.prompts_per_rank, self.rank, self.world_size)
        cache, video = frame_cache(self.cfg.data), self.cfg.video
        media = [self._pool.submit(load_media, s.path, s.data_type, video, cache)
                 for s in (self.records[i] for i in indices)]
        return _Window(position, indices, after, media)

    def _discard(self) -> None:
        """Drops the work in flight (a decode already running finishes; its result is never read)."""
        for window in self._ahead:
            for future in window.media:
                future.cancel()
        self._ahead.clear()

    def close(self) -> None:
        """Cancels the queued decodes and joins the workers (a running decode finishes first)."""
        self._discard()
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> "PromptStream":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
