"""Evaluation inside a training run: the held-out numbers every ``eval.every`` steps, and the start-vs-last table.

:func:`heldout_metrics` answers every item of the configured benchmarks (``eval.benchmarks``, or the synthetic
held-out set) with the policy as it trains, data-parallel over the ranks and inside one ``dist.rollout_call`` per
benchmark (the sharded strategies gather the weights once), under the run's autocast, ordered and shuffled alike;
it returns ``eval/accuracy`` (the benchmark score over all items), ``eval/ordered_accuracy``,
``eval/shuffled_accuracy`` and ``eval/gap`` (over the video items; ``vr1fast.eval.results``) and ``eval/broken`` on
rank 0. With several benchmarks the keys are ``eval/<name>/...``.

:func:`compare_models` is the demo's ending (``eval.final``): the model training started from and the last
checkpoint, each loaded from its folder (whole, on every rank), evaluated on the same items with the shuffled branch,
written to ``<out_dir>/<label>/`` and printed side by side.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from vr1fast import dist
from vr1fast.config import Config
from vr1fast.eval.answer import Item
from vr1fast.eval.benchmarks import Benchmark, configured_benchmarks
from vr1fast.eval.results import summarize, table
from vr1fast.eval.run import BATCH_SEED, answer_or_stop, batches, evaluate_benchmark, load_eval_model, raise_together

METRICS = {"accuracy": "score", "ordered_accuracy": "ordered_accuracy", "shuffled_accuracy": "shuffled_accuracy",
           "gap": "gap", "broken": "broken"}


def _answer_mine(model, tokenizer, bench: Benchmark, cfg: Config, info: dist.DistInfo):
    """This rank's batches (k ≡ rank mod world) of ``bench``, answered in order; stops at the first failure."""
    todo = batches([Item(s, r) for s, r in zip(bench.samples, bench.records)], cfg.eval.batch_size)
    rows = []
    for k in range(info.rank, len(todo), info.world_size):
        new, error = answer_or_stop(model, tokenizer, todo[k], cfg, device=info.device, shuffled=True,
                                    seed=dist.step_seed(cfg.train.seed, BATCH_SEED, k))
        if error is not None:
            return rows, error
        rows.extend(new)
    return rows, None


def heldout_metrics(wrapped: dist.Wrapped, tokenizer, benchmarks: list[Benchmark], cfg: Config,
                    info: dist.DistInfo) -> dict[str, float]:
    """The policy's held-out numbers (module docstring): on rank 0 a dict of floats, ``{}`` elsewhere. Collective."""
    out = {}
    for bench in benchmarks:
        with torch.no_grad(), dist.autocast(wrapped, info.device):
            rows, error = dist.rollout_call(wrapped, _answer_mine, tokenizer, bench, cfg, info)
        raise_together(error)
        rows = dist.gather_to_main(rows)
        if info.is_main:
            summary = summarize(bench, rows)
            prefix = "eval/" if len(benchmarks) == 1 else f"eval/{bench.name}/"
            out.update({prefix + k: float(summary[v]) for k, v in METRICS.items() if summary[v] is not None})
    return out


def compare_models(cfg: Config, models: dict[str, Optional[str | Path]], info: dist.DistInfo, out_dir: Path) -> str:
    """Evaluate each ``label: model folder`` (None = the tiny model) on the configured benchmarks; the side-by-side
    table (rank 0; ``""`` elsewhere). Collective."""
    benchmarks = configured_benchmarks(cfg, dist.once)
    rows = {}
    for label, path in models.items():
        model, tokenizer = load_eval_model(cfg, path, info.device)
        for bench in benchmarks:
            summary = evaluate_benchmark(model, tokenizer, bench, cfg, info, out_dir / label, shuffled=True,
                                         resume=False, model_path=path, progress=False)
            rows[label if len(benchmarks) == 1 else f"{label} {bench.name}"] = summary
        del model
    if not info.is_main:
        return ""
    first = next(iter(rows.values()))
    head = (f"eval on {', '.join(b.name for b in benchmarks)} ({first['scored'] + first['broken']} items, "
            f"{first['video_items']} videos also shuffled; {cfg.eval.sampling}, {cfg.eval.max_new_tokens} tokens); "
            f"rows in {out_dir}")
    return head + "\n" + table(rows)
