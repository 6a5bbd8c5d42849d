"""One batch of benchmark items → the model's answers, scored: the per-item work of ``vr1fast.eval``.

Per item (Video-R1's ``eval_bench.py`` unless named): the media decoded with ``video.*`` (``config.eval_video``: up to
256·28·28 pixels per frame, 16/32/64 frames at 2 fps); the prompt of ``data.prompts.build_messages`` with the eval
template when ``data.eval_mode`` (the ``videor1_eval`` preset; training's held-out eval keeps the template it trains
with); M-RoPE time from the video's sampled fps, ``second_per_grid_ts = 2 / sample_fps`` as Video-R1 passes
``fps`` to its processor at eval (``eval.real_fps``; training uses 1.0); one completion per prompt through
``vr1fast.rollout.generate`` (any engine), greedy or sampled with ``eval.temperature`` / ``eval.top_p`` and top-k
off (``eval.sampling``), at most ``eval.max_new_tokens``, ended at the model's stop tokens; the text decoded without
special tokens and scored by ``vr1fast.eval.scoring.score`` (``eval.rules``).

With ``shuffled`` every video item is also answered on its frames in a shuffled order (``data.shuffle.shuffle_frames``
with ``data.frame_shuffle``, never the identity; the permutation is seeded by ``train.seed`` and the record's index,
so it does not depend on batching, ranks or resuming). Video-R1 has no such branch. Both prompts of an item go
through the same ``generate`` call; with sampling the draws depend on the batch, with greedy they do not.

A video or image that cannot be decoded raises :class:`~vr1fast.errors.MediaError` naming the file, or with
``data.skip_bad`` becomes a ``broken`` row that is counted and never scored (Video-R1 writes
``<answer>error</answer>`` for a whole failing batch and scores it as wrong).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from vr1fast.config import Config
from vr1fast.data.dataset import Sample
from vr1fast.data.loader import check_prompt_lengths
from vr1fast.data.processor import build_prompt_batch
from vr1fast.data.prompts import build_messages
from vr1fast.data.shuffle import shuffle_frames
from vr1fast.data.video import load_image, read_video
from vr1fast.dist import step_seed
from vr1fast.errors import MediaError
from vr1fast.eval.scoring import prediction, process, score
from vr1fast.model.qwen import TEMPORAL_PATCH_SIZE
from vr1fast.rollout import generate

@dataclass(frozen=True)
class Item:
    """A benchmark record to answer: the validated sample and the raw record written back into its row."""

    sample: Sample
    record: dict


@dataclass(frozen=True)
class Loaded:
    item: Item
    media: torch.Tensor             # uint8 video [T, H, W, 3] or image [H, W, 3]
    seconds_per_grid: float         # M-RoPE seconds per temporal patch (videos)


def load_item(item: Item, cfg: Config) -> Loaded:
    """``item``'s decoded media and M-RoPE seconds per temporal patch (module docstring); MediaError if broken."""
    sample = item.sample
    if sample.data_type != "video":
        return Loaded(item, load_image(sample.path, cfg.video), 0.0)
    video = read_video(sample.path, cfg.video)
    spg = TEMPORAL_PATCH_SIZE / video.sample_fps if cfg.eval.real_fps else cfg.data.second_per_grid_ts
    return Loaded(item, video.frames, spg)


def _shuffled(frames: torch.Tensor, sample: Sample, cfg: Config) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(step_seed(cfg.train.seed, sample.index))
    return shuffle_frames(frames, generator, cfg.data.frame_shuffle, cfg.data.shuffle_allow_identity)


def _generate(model, tokenizer, prompts: list[Loaded], media: list[torch.Tensor], cfg: Config,
              device: torch.device, seed: int) -> list[str]:
    """One completion per prompt (``prompts[i]`` with ``media[i]``), decoded."""
    batch = build_prompt_batch(tokenizer, [build_messages(p.item.sample, cfg.data.eval_mode) for p in prompts], media,
                               second_per_grid_ts=[p.seconds_per_grid for p, m in zip(prompts, media) if m.dim() == 4])
    check_prompt_lengths(batch.prompt_lengths.tolist(), [p.item.sample for p in prompts],
                         cfg.rollout.max_prompt_length)
    ev, ro = cfg.eval, cfg.rollout
    out = generate(model, batch.to(device).model_inputs(), num_samples=1, max_new_tokens=ev.max_new_tokens,
                   temperature=ev.temperature, top_p=ev.top_p, top_k=0, greedy=ev.sampling == "greedy", seed=seed,
                   engine=ro.engine, kv_cache_fraction=ro.kv_cache_fraction, page_size=ro.kv_page_size,
                   cuda_graphs=ro.cuda_graphs)
    ids = out.ids.tolist()
    return tokenizer.batch_decode([row[:n] for row, n in zip(ids, out.lengths.tolist())], skip_special_tokens=True)


def _scored(prefix: str, text: str, sample: Sample, cfg: Config) -> dict:
    row = {f"{prefix}output": text, f"{prefix}prediction": prediction(text),
           f"{prefix}score": score(text, sample.solution, sample.problem_type, rules=cfg.eval.rules)}
    thought = process(text)
    if thought:
        row[f"{prefix}process"] = thought
    return row


def answer_batch(model, tokenizer, items: Sequence[Item], cfg: Config, *, device: torch.device, seed: int,
                 shuffled: bool = False) -> list[dict]:
    """The result rows of ``items``, in order (module docstring): ``{"index", "record", "output", "prediction",
    "score", "correct"}`` (and ``process`` when the output thinks, as Video-R1) plus ``shuffled_output``,
    ``shuffled_prediction``, ``shuffled_score`` (``shuffled_process``), ``permutation`` for a
    video with ``shuffled``; ``{"index", "record", "broken": reason}`` for a broken file under ``data.skip_bad``."""
    loaded: list[Optional[Loaded]] = []
    rows: list[dict] = [{"index": it.sample.index, "record": it.record} for it in items]
    for item, row in zip(items, rows):
        try:
            loaded.append(load_item(item, cfg))
        except MediaError as e:
            if not cfg.data.skip_bad:
                raise
            loaded.append(None)
            row["broken"] = str(e)
    good = [(row, x) for row, x in zip(rows, loaded) if x is not None]
    if not good:
        return rows
    prompts, media = [x for _, x in good], [x.media for _, x in good]
    shuffled_rows, perms = [], []
    for row, x in good if shuffled else ():
        if x.media.dim() == 4:
            frames, perm = _shuffled(x.media, x.item.sample, cfg)
            prompts.append(x)
            media.append(frames)
            shuffled_rows.append(row)
            perms.append(perm)
    texts = _generate(model, tokenizer, prompts, media, cfg, device, seed)
    for (row, x), text in zip(good, texts):
        row.update(_scored("", text, x.item.sample, cfg))
        row["correct"] = row["score"] == 1.0
    for row, perm, x, text in zip(shuffled_rows, perms, prompts[len(good):], texts[len(good):]):
        row.update(_scored("shuffled_", text, x.item.sample, cfg), permutation=perm.tolist())
    return rows
