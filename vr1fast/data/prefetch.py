"""The prompt stream of a run, its next micro-batches decoded (and, for T-GRPO, processed) by worker threads while
the step runs.

The stream's future is known: each call takes the next ``train.prompts_per_rank × world_size`` items from the
position the previous call returned (``Sampler.take``), whatever the decoding gave, and the calls of a run come in
(step, micro-batch) order: ``train.grad_accum`` micro-batches per step, steps consecutive. So with
``data.prefetch_workers`` > 0, :class:`PromptStream` works on the next ``data.prefetch_depth`` micro-batches in a
thread pool (PyAV, decord, the torch resize and patchify and the Rust tokenizer run without the GIL):

* :meth:`PromptStream.next_prompts` (SFT): the primary media are decoded (and resized, through the frame cache when
  it is on) in the workers; replacement draws (``data.skip_bad``) are decoded at consume time by the synchronous
  :func:`~vr1fast.data.loader.load_samples` with the step's seed;
* :meth:`PromptStream.next_prepared` (T-GRPO): given ``prepare`` (the step's processor stage) and ``seed_of``
  (step, micro → the step's seed), a worker also runs ``load_samples`` (its replacement draws too, with the seed
  the step will use) and ``prepare`` for each predicted (position, step, micro), with a tokenizer of its own
  (HF fast tokenizers are not safe to share across threads; a ``copy.deepcopy`` per worker, made here).

What the caller gets is the synchronous path's answer exactly: a decode error (naming the file), a replacement
that cannot be decoded or an error of ``prepare`` is stored with its micro-batch and raised when that micro-batch
is consumed; the caller owns the position (a checkpoint stores the consumed samples' only) and a call other than
the predicted one (the first call, a resume) discards the work in flight and starts again from it. ``with
stream:`` stops the workers on return and on an exception (queued work is cancelled, a running one finishes).

A worker's torch ops run in an OpenMP team of one thread. With GNU OpenMP a thread's first parallel region
starts a team of ``omp_get_max_threads()`` threads that lives on; once a process manages more OpenMP threads than
it has cores, libgomp stops spin-waiting and every small op of the main thread pays a futex wake-up: measured on
2 cores, the demo's rollout went from 0.60 to 1.1-1.25 s per step with default-size worker teams and back to
0.61 s with teams of one. ``torch.set_num_threads`` would change the main thread's count too (and with it the
float summation order), so the worker calls the OpenMP runtime's own per-thread ``omp_set_num_threads``. The
processor's ops are elementwise or copies: their results do not depend on the thread count.
"""
from __future__ import annotations

import copy
import ctypes
import functools
import queue
import threading
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from vr1fast.config import Config
from vr1fast.data.dataset import Position, Records, Sample, Sampler
from vr1fast.data.frame_cache import frame_cache
from vr1fast.data.loader import load_samples, next_prompts
from vr1fast.data.video import load_media

# prepare(tokenizer, samples, media, seed) → what the step's processor stage makes of them
Prepare = Callable[[Any, list[Sample], list[torch.Tensor], int], Any]


@functools.cache
def _openmp_runtime() -> Optional[ctypes.CDLL]:
    """The OpenMP runtime this process loaded (torch's libgomp, or an Intel / LLVM one), None if none is mapped."""
    maps = Path("/proc/self/maps")
    names = {line.split()[-1] for line in maps.read_text().splitlines()} if maps.exists() else set()
    found = sorted(n for n in names if Path(n).name.startswith(("libgomp", "libiomp", "libomp")) and ".so" in n)
    return ctypes.CDLL(found[0]) if found else None


def _one_openmp_thread() -> None:
    """A worker's torch ops run in an OpenMP team of one (module docstring)."""
    runtime = _openmp_runtime()
    if runtime is not None:
        runtime.omp_set_num_threads(1)


@dataclass(frozen=True)
class _Window:
    """One future call: its start position, (step, micro) when prepared, this rank's indices, the position after
    it, their primary decodes and, when prepared, the future of (samples, media, skipped, prepared)."""

    position: Position
    at: Optional[tuple[int, int]]
    indices: list[int]
    after: Position
    media: list[Future]
    prepared: Optional[Future] = None


class PromptStream:
    """``next_prompts(position, seed)`` / ``next_prepared(position, step, micro)`` of one rank, prefetching when
    ``cfg.data.prefetch_workers`` > 0 (module docstring)."""

    def __init__(self, records: Records, sampler: Sampler, cfg: Config, *, rank: int, world_size: int,
                 prepare: Optional[Prepare] = None, tokenizer: Any = None,
                 seed_of: Optional[Callable[[int, int], int]] = None):
        self.records, self.sampler, self.cfg, self.rank, self.world_size = records, sampler, cfg, rank, world_size
        self.prepare, self.seed_of = prepare, seed_of
        workers = cfg.data.prefetch_workers
        self._tokenizers: queue.SimpleQueue = queue.SimpleQueue()  # one copy for each worker thread to take
        if workers and prepare is not None:
            for _ in range(workers):
                self._tokenizers.put(copy.deepcopy(tokenizer))
        self._local = threading.local()
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="vr1fast-prefetch",
                                        initializer=self._start_worker) if workers else None
        self._ahead: deque[_Window] = deque()
        self.restarts = 0  # calls with workers that were not the predicted one (the first, a resume)

    def next_prompts(self, position: Position, seed: int) -> tuple[list[Sample], list[torch.Tensor], int, Position]:
        """This rank's samples and media from ``position``, the broken files skipped and the position after
        (:func:`vr1fast.data.loader.next_prompts`); schedules the next ``data.prefetch_depth`` micro-batches'
        primary decodes."""
        if self._pool is None:
            return next_prompts(self.records, self.sampler, position, self.cfg, rank=self.rank,
                                world_size=self.world_size, seed=seed)
        head = self._head(position, None)
        self._refill(head)
        samples, media, skipped = load_samples(self.records, head.indices, self.cfg, seed,
                                               [future.result for future in head.media])
        return samples, media, skipped, head.after

    def next_prepared(self, position: Position, step: int, micro: int
                      ) -> tuple[list[Sample], list[torch.Tensor], int, Position, Any]:
        """:meth:`next_prompts` with the seed ``seed_of(step, micro)``, and ``prepare(tokenizer, samples, media,
        seed)`` made by a worker (None without workers: the caller prepares with its own tokenizer); schedules the
        next ``data.prefetch_depth`` micro-batches: (step, micro + 1), ..., (step + 1, 0) after the step's last."""
        if self._pool is None or self.prepare is None:
            return (*self.next_prompts(position, self.seed_of(step, micro)), None)
        head = self._head(position, (step, micro))
        samples, media, skipped, prepared = head.prepared.result()  # the worker's error, if any, raised here
        self._refill(head)  # after the wait: workers woken before it would compete with it for the GIL
        return samples, media, skipped, head.after, prepared

    def _head(self, position: Position, at: Optional[tuple[int, int]]) -> _Window:
        """The window of this call: the predicted one, or submitted now after discarding the work in flight."""
        if not self._ahead or (self._ahead[0].position, self._ahead[0].at) != (position, at):
            self.restarts += 1
            self._discard()
            self._ahead.append(self._submit(position, at))
        return self._ahead.popleft()

    def _refill(self, head: _Window) -> None:
        """Submits windows behind ``head`` until ``data.prefetch_depth`` are ahead of it."""
        while len(self._ahead) < self.cfg.data.prefetch_depth:
            last = self._ahead[-1] if self._ahead else head
            self._ahead.append(self._submit(last.after, self._next_at(last.at)))

    def _next_at(self, at: Optional[tuple[int, int]]) -> Optional[tuple[int, int]]:
        if at is None:
            return None
        step, micro = at
        return (step, micro + 1) if micro + 1 < self.cfg.train.grad_accum else (step + 1, 0)

    def _submit(self, position: Position, at: Optional[tuple[int, int]]) -> _Window:
        indices, after = self.sampler.take(position, self.cfg.train.prompts_per_rank, self.rank, self.world_size)
        cache, video = frame_cache(self.cfg.data), self.cfg.video
        media = [self._pool.submit(load_media, s.path, s.data_type, video, cache)
                 for s in (self.records[i] for i in indices)]
        # Submitted after its decodes: a worker takes it only once each of them runs or is done (FIFO), so its
        # wait on them ends.
        prepared = None if at is None else self._pool.submit(self._prepare_window, indices, at, media)
        return _Window(position, at, indices, after, media, prepared)

    def _prepare_window(self, indices: list[int], at: tuple[int, int], media: list[Future]):
        """In a worker: the step's ``load_samples`` (replacement draws included) and ``prepare``."""
        seed = self.seed_of(*at)
        samples, frames, skipped = load_samples(self.records, indices, self.cfg, seed,
                                                [future.result for future in media])
        return samples, frames, skipped, self.prepare(self._local.tokenizer, samples, frames, seed)

    def _start_worker(self) -> None:
        """A worker thread's initializer: an OpenMP team of one, its own tokenizer copy when preparing."""
        _one_openmp_thread()
        self._local.tokenizer = None if self._tokenizers.empty() else self._tokenizers.get_nowait()

    def _discard(self) -> None:
        """Drops the work in flight (a decode already running finishes; its result is never read)."""
        for window in self._ahead:
            for future in (window.prepared, *window.media):
                if future is not None:
                    future.cancel()
        self._ahead.clear()

    def close(self) -> None:
        """Cancels the queued work and joins the workers (a running task finishes first)."""
        self._discard()
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> "PromptStream":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
