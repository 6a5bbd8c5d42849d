"""The record stream of a run: which records, and each step's samples with their decoded media.

``run_records`` picks the records (``data.path``, or the synthetic set when it is unset); ``next_prompts`` takes
this rank's next prompts from the global stream position and returns the position after them, so the caller
(the training state, a checkpoint) owns the position and nothing here mutates it.
"""
from __future__ import annotations

import random
from typing import Any, Callable, Optional

import torch

from vr1fast.config import Config, DataConfig
from vr1fast.data.dataset import Position, Records, Sample, Sampler, load_records
from vr1fast.data.frame_cache import frame_cache
from vr1fast.data.synthetic import generate_synthetic
from vr1fast.data.video import load_media
from vr1fast.errors import MediaError, RecordError

MEDIA_RETRIES = 16  # with data.skip_bad: replacement draws for one broken media file before giving up


def synthetic_set(cfg: DataConfig):
    """The synthetic set of ``cfg`` (written on the first call, reused after: ``data.synthetic``)."""
    return generate_synthetic(cfg.synthetic_dir, n=cfg.synthetic_size, seed=cfg.synthetic_seed)


def run_records(cfg: DataConfig, once: Callable[[Callable], Any] = lambda make: make()) -> Records:
    """The RL records: ``cfg.path``, or the synthetic set's ``rl.json`` when it is unset, made through ``once``
    (``dist.once``: rank 0 writes the set, the other ranks reuse it)."""
    if cfg.path is not None:
        return load_records(cfg.path, cfg)
    return load_records(once(lambda: synthetic_set(cfg)).rl_json, cfg)


def next_prompts(records: Records, sampler: Sampler, position: Position, cfg: Config, *, rank: int,
                 world_size: int, seed: int) -> tuple[list[Sample], list[torch.Tensor], int, Position]:
    """This rank's ``train.prompts_per_rank`` samples and decoded media from ``position`` of the global stream,
    the number of broken media files skipped, and the stream position after this step's prompts (all ranks').
    Decoding as :func:`load_samples`; ``vr1fast.data.prefetch.PromptStream`` gives the same from worker threads."""
    indices, after = sampler.take(position, cfg.train.prompts_per_rank, rank, world_size)
    return (*load_samples(records, indices, cfg, seed), after)


def load_samples(records: Records, indices: list[int], cfg: Config, seed: int,
                 primary: Optional[list[Callable[[], torch.Tensor]]] = None
                 ) -> tuple[list[Sample], list[torch.Tensor], int]:
    """The samples of ``indices`` with their decoded media and the number of broken media files skipped.

    ``primary[k]()`` gives index k's media (a prefetched decode; default: decoded here). Videos go through the
    on-disk frame cache when ``data.frame_cache`` is set. With ``data.skip_bad`` a broken file is replaced by a
    draw seeded by ``seed`` (the stream position is global, so the ranks stay in step), decoded here, and counted;
    without it the ``MediaError`` names the file."""
    draw, samples, media, skipped = random.Random(seed), [], [], 0
    cache = frame_cache(cfg.data)  # None unless data.frame_cache is set
    for k, index in enumerate(indices):
        for attempt in range(MEDIA_RETRIES):
            sample = records[index]
            try:
                media.append(primary[k]() if primary and attempt == 0 else
                             load_media(sample.path, sample.data_type, cfg.video, cache))
                samples.append(sample)
                break
            except MediaError:
                if not cfg.data.skip_bad:
                    raise
                skipped, index = skipped + 1, draw.randrange(len(records))
        else:
            raise MediaError(sample.path, f"and {MEDIA_RETRIES - 1} replacement draws could not be decoded")
    return samples, media, skipped


def check_prompt_lengths(lengths: list[int], samples: list[Sample], limit: int) -> None:
    """Video-R1 left-truncates prompts to ``max_prompt_length`` (harmless at 16384); a cut through the video's
    tokens cannot be fed to the model, so a longer prompt is an error naming its record instead."""
    for n, sample in zip(lengths, samples):
        if n > limit:
            raise RecordError(sample.source, sample.index, "path", f"the prompt with {sample.path} has {n} tokens, "
                              f"over rollout.max_prompt_length={limit}; lower video.max_frames / video.max_pixels "
                              f"or raise the limit")
