"""What ``vr1fast.eval`` evaluates: Video-R1's benchmark files, or the synthetic held-out set.

A benchmark file is a JSON list (or JSON Lines) of records in Video-R1's eval schema, which is its RL schema
(HF ``Video-R1/Video-R1-eval``: ``eval_{mvbench,tempcompass,videomme,videommmu,vsibench,mmvu}.json``; fields
``problem``, ``data_type``, ``problem_type``, ``options``, ``solution`` = ``<answer>…</answer>``, ``path``; others are
kept as they are). Media paths resolve against the file's folder, as Video-R1's ``eval_bench.py`` joins them to
``src/r1-v/Evaluation``, or against ``data.media_root``. The benchmark's name is the file's stem without an
``eval_`` prefix (``eval_vsibench.json`` → ``vsibench``). Records are validated as training's
(``vr1fast.data.dataset.load_records``): a malformed record or a missing media file is an error naming it, or with
``data.skip_bad`` counted in :attr:`Benchmark.skipped` and reported (Video-R1 crashes or scores the batch as
``<answer>error</answer>``).

With ``eval.benchmarks`` empty the benchmark is ``heldout``: a synthetic set (``vr1fast.data.synthetic``) of
``eval.heldout_size`` records drawn with ``eval.heldout_seed`` (records differ from the training set's, which uses
``data.synthetic_seed``), written once to ``<data.synthetic_dir>-heldout``.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from vr1fast.config import Config
from vr1fast.data.dataset import Sample, load_records
from vr1fast.data.synthetic import generate_synthetic
from vr1fast.errors import ConfigError

HELDOUT = "heldout"


@dataclass(frozen=True)
class Benchmark:
    """One benchmark's usable records, each with the raw record it came from (written back into the results)."""

    name: str
    file: str
    samples: tuple[Sample, ...]
    records: tuple[dict, ...]       # records[i] is the file's record behind samples[i]
    skipped: int                    # records refused at load (data.skip_bad)
    skip_reasons: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.samples)


def _raw_records(path: Path) -> list[Any]:
    """The file's records as JSON values (``load_records`` has already checked that they parse)."""
    text = path.read_text(encoding="utf-8-sig")
    if text.lstrip().startswith("["):
        return json.loads(text)
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def load_benchmark(path: str | Path, cfg: Config, name: str | None = None) -> Benchmark:
    """The validated records of one benchmark file (module docstring)."""
    path = Path(path)
    records = load_records(path, dataclasses.replace(cfg.data, path=str(path)))
    raw = _raw_records(path)
    return Benchmark(name or benchmark_name(path), str(path), records.samples,
                     tuple(raw[s.index] for s in records.samples), records.skipped, records.reasons)


def benchmark_name(path: str | Path) -> str:
    """``eval_vsibench.json`` → ``vsibench``; other stems are kept."""
    return Path(path).stem.removeprefix("eval_")


def heldout_dir(cfg: Config) -> Path:
    return Path(f"{cfg.data.synthetic_dir.rstrip('/')}-{HELDOUT}")


def heldout_benchmark(cfg: Config, once: Callable[[Callable], Any] = lambda make: make()) -> Benchmark:
    """The synthetic held-out set (module docstring), written through ``once`` (rank 0 writes, the others reuse)."""
    made = once(lambda: generate_synthetic(heldout_dir(cfg), n=cfg.eval.heldout_size, seed=cfg.eval.heldout_seed))
    return load_benchmark(made.rl_json, cfg, HELDOUT)


def configured_benchmarks(cfg: Config, once: Callable[[Callable], Any] = lambda make: make()) -> list[Benchmark]:
    """``eval.benchmarks`` in order, or the held-out set when it is empty; names must be unique."""
    if not cfg.eval.benchmarks:
        return [heldout_benchmark(cfg, once)]
    names = [benchmark_name(p) for p in cfg.eval.benchmarks]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ConfigError(f"eval.benchmarks: two files share the name {twice[0]!r} (their stems without 'eval_'), "
                          f"so their results would overwrite each other")
    return [load_benchmark(p, cfg) for p in cfg.eval.benchmarks]
