"""Result rows on disk, resuming, and the numbers a benchmark reports.

``<output_dir>/<name>.jsonl`` holds one JSON row per item (``vr1fast.eval.answer.answer_batch``), appended as
batches finish. Resuming (``eval.resume``) keeps the scored rows of an earlier run, checked to be the same records
of the same file, and answers the rest; a torn last line and ``broken`` rows are dropped (broken media is retried).
The summary is always computed over every scored row, old and new (Video-R1's resume reports ``final_acc`` over the
newly processed items only).

Numbers (:func:`summarize`), all from ``vr1fast.eval.scoring``: ``mean_acc`` (non-regression items) and
``mean_mra`` (regression items) as Video-R1's ``final_acc``, and the benchmark's ``score``:
``(mean_acc + mean_mra) / 2`` when it has both kinds (VSI-Bench, the only one of Video-R1's six that has regression
items, Video-R1 #121), else whichever mean exists. With shuffled answers: ``ordered_accuracy`` and
``shuffled_accuracy``, the same ``score`` rule over the video items answered both ways, and ``gap`` = ordered −
shuffled. ``accuracy`` is the plain mean score of all items (the progress bar's running number).
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Optional

from vr1fast.errors import ConfigError
from vr1fast.eval.benchmarks import Benchmark
from vr1fast.eval.scoring import benchmark_means

MAX_BROKEN_LISTED = 20


def headline(pairs: list[tuple[str, float]]) -> Optional[float]:
    """The benchmark score of ``(problem_type, score)`` pairs (module docstring); None when there are none."""
    means = benchmark_means(pairs)
    acc, mra = means["mean_acc"], means["mean_mra"]
    if acc is not None and mra is not None:
        return (acc + mra) / 2
    return acc if acc is not None else mra


def _read_rows(path: Path) -> list[dict]:
    rows = []
    lines = path.read_text().splitlines()
    for n, line in enumerate(lines):
        try:
            rows.append(json.loads(line))
        except ValueError:
            if n < len(lines) - 1:
                raise ConfigError(f"{path}: line {n + 1} is not JSON; delete the file or pass --eval.resume=false")
    return rows


def resume_rows(path: Path, benchmark: Benchmark, resume: bool) -> dict[int, dict]:
    """The scored rows of an earlier run by record index (empty without ``resume`` or a file); rewrites ``path``
    with just them. A row whose record differs from the benchmark file's is an error naming both files."""
    if not resume or not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("")
        return {}
    expected = {s.index: r for s, r in zip(benchmark.samples, benchmark.records)}
    done = {}
    for row in _read_rows(path):
        if "score" not in row:
            continue
        if expected.get(row.get("index")) != row.get("record"):
            raise ConfigError(f"{path}: row for record {row.get('index')} does not match {benchmark.file}; it was "
                              f"written for another file: delete it or pass --eval.resume=false")
        done[row["index"]] = row
    tmp = path.with_name(path.name + ".part")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in done.values()))
    os.replace(tmp, path)
    return done


def _mean(values: list[float]) -> Optional[float]:
    return sum(values) / len(values) if values else None


def summarize(benchmark: Benchmark, rows: list[dict], **extra) -> dict:
    """The summary JSON of ``benchmark`` from all its rows (module docstring); ``extra`` is stored as it is."""
    scored = [r for r in rows if "score" in r]
    broken = [r for r in rows if "broken" in r]
    types = [r["record"]["problem_type"] for r in scored]
    means = benchmark_means(zip(types, (r["score"] for r in scored)))
    both = [(t, r) for t, r in zip(types, scored) if "shuffled_score" in r]
    ordered = headline([(t, r["score"]) for t, r in both])
    shuffled = headline([(t, r["shuffled_score"]) for t, r in both])
    return {
        "benchmark": benchmark.name, "file": benchmark.file, "records": len(benchmark) + benchmark.skipped,
        "skipped_records": benchmark.skipped, "scored": len(scored), "broken": len(broken),
        **means, "score": headline(list(zip(types, (r["score"] for r in scored)))),
        "accuracy": _mean([r["score"] for r in scored]), "video_items": len(both), "ordered_accuracy": ordered,
        "shuffled_accuracy": shuffled, "gap": None if ordered is None else ordered - shuffled,
        "broken_items": [{"index": r["index"], "reason": r["broken"]} for r in broken[:MAX_BROKEN_LISTED]],
        "skip_reasons": list(benchmark.skip_reasons), **extra,
    }


def write_summary(path: Path, summary: dict) -> None:
    tmp = path.with_name(path.name + ".part")
    tmp.write_text(json.dumps(summary, indent=1) + "\n")
    os.replace(tmp, path)


def _cell(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.3f}" if isinstance(value, float) else str(value)


TABLE_COLUMNS = ("score", "mean_acc", "mean_mra", "ordered_accuracy", "shuffled_accuracy", "gap", "scored", "broken")
_HEADERS = {"ordered_accuracy": "ordered", "shuffled_accuracy": "shuffled"}


def table(rows: dict[str, dict]) -> str:
    """A plain-text table, one line per ``label: summary`` (benchmarks, or models side by side)."""
    header = ["", *(_HEADERS.get(c, c) for c in TABLE_COLUMNS)]
    body = [[label, *(_cell(s.get(c)) for c in TABLE_COLUMNS)] for label, s in rows.items()]
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in
                               enumerate(zip(r, widths))) for r in [header, *body])
