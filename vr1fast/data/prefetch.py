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
"""
from __future__ import annotations

from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch

from vr1fast.config import Config
from vr1fast.data.dataset import Position, Records, Sample, Sampler
from vr1fast.data.frame_cache import frame_cache
from vr1fast.data.loader import load_samples, next_prompts
from vr1fast.data.video import load_media


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
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="vr1fast-prefetch") if workers else None
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
