"""``python -m vr1fast.eval [--eval.benchmarks=[A.json, ...]] [--model.path=DIR] ...``: Video-R1's benchmark
evaluation (``src/eval_bench.py``) with the ``videor1_eval`` preset unless another is named; ``torchrun
--nproc_per_node=N -m vr1fast.eval ...`` runs it data-parallel and rank 0 writes the results.

The model is ``model.path``: an HF Qwen2.5-VL folder, a vr1fast checkpoint's ``model/`` folder (LoRA adapters too) or
the checkpoint folder itself; unset, the tiny random model (``model.tiny_seed``). It is loaded whole on every rank in
``model.dtype`` (auto: bf16 on CUDA, fp32 on the CPU) and answers in batches of ``eval.batch_size`` prompts
(``vr1fast.eval.answer``); batch k of a benchmark runs on rank k mod N, so a batch holds the same items whatever N
is. Per benchmark (``vr1fast.eval.benchmarks``) in ``eval.output_dir``: ``<name>.jsonl``, the item rows written as
each round of batches finishes (``vr1fast.eval.results``: resumable, ``eval.resume``), and ``<name>.summary.json``;
a progress bar shows the running mean score; a table of every benchmark is printed at the end.

Deviations from Video-R1's script: generation through ``vr1fast.rollout.generate`` (HF or the paged engine) rather
than vLLM with tensor parallelism; batches of ``eval.batch_size`` (Video-R1: 64 prompts per vLLM call); a resumed run
reports the score over every item; broken media is counted and reported, never scored; the benchmark score
combines mean_acc and mean_mra for VSI-Bench as the authors do (#121), which the script leaves to the reader.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

import torch

from vr1fast import cli, dist
from vr1fast.config import Config
from vr1fast.errors import Vr1fastError
from vr1fast.eval.answer import Item, answer_batch
from vr1fast.eval.benchmarks import Benchmark, configured_benchmarks
from vr1fast.eval.results import resume_rows, summarize, table, write_summary
from vr1fast.model import lora
from vr1fast.model.load import build_model, freeze

BATCH_SEED = -1  # step_seed(train.seed, BATCH_SEED, k): the sampling seed of batch k


def model_dir(path: str | Path) -> Path:
    """``path``, or its ``model/`` folder when ``path`` is a vr1fast checkpoint folder."""
    path = Path(path)
    return path / "model" if not any((path / f).is_file() for f in ("config.json", lora.CONFIG_FILE)) and \
        (path / "model").is_dir() else path


def load_eval_model(cfg: Config, path: Optional[str | Path], device: torch.device):
    """``(model, tokenizer)``: ``path`` (module docstring) or the tiny model when None, frozen, on ``device``. A LoRA
    checkpoint's folder (adapters only) is loaded onto the base its adapter config names (None: the tiny model) with
    ``model.lora``'s settings."""
    folder = None if path is None else model_dir(path)
    adapters = folder is not None and (folder / lora.CONFIG_FILE).is_file() and not (folder / "config.json").is_file()
    base = json.loads((folder / lora.CONFIG_FILE).read_text()).get("base_model_name_or_path") if adapters else folder
    source = dataclasses.replace(cfg.model, path=None if base is None else str(base), gradient_checkpointing=False)
    model, tokenizer = build_model(source, device=device)
    if adapters:
        lora.load_adapter(lora.apply_lora(model, cfg.model.lora, base=base), folder)
    return freeze(model), tokenizer


def batches(items: Sequence[Item], batch_size: int) -> list[list[Item]]:
    return [list(items[i:i + batch_size]) for i in range(0, len(items), batch_size)]


def answer_or_stop(model, tokenizer, batch: list[Item], cfg: Config, *, device: torch.device, seed: int,
                   shuffled: bool) -> tuple[list[dict], Optional[Vr1fastError]]:
    """:func:`answer_batch`, with an expected failure returned instead of raised (see :func:`raise_together`)."""
    try:
        return answer_batch(model, tokenizer, batch, cfg, device=device, seed=seed, shuffled=shuffled), None
    except Vr1fastError as e:
        return [], e


def raise_together(error: Optional[Vr1fastError]) -> None:
    """Every rank stops when any rank failed: the failing rank raises its error (one line naming the file), the
    others a line pointing to it, instead of waiting in the next collective forever."""
    if dist.any_rank(error is not None):
        raise error or Vr1fastError("stopped: another rank failed (its error names the file)")


def _settings(cfg: Config, model_path: Optional[str | Path]) -> dict:
    return {"model": str(model_path) if model_path else f"tiny (seed {cfg.model.tiny_seed})",
            "max_frames": cfg.video.max_frames, "max_pixels": cfg.video.max_pixels, "sampling": cfg.eval.sampling,
            "max_new_tokens": cfg.eval.max_new_tokens, "eval_prompt": cfg.data.eval_mode,
            "real_fps": cfg.eval.real_fps, "rules": cfg.eval.rules}


def _progress(info: dist.DistInfo, cfg: Config, total: int, name: str, enabled: bool):
    if not (info.is_main and enabled and cfg.metrics.progress_bar):
        return contextlib.nullcontext()
    from tqdm.auto import tqdm
    return tqdm(total=total, desc=name, unit="item", dynamic_ncols=True)


def evaluate_benchmark(model, tokenizer, bench: Benchmark, cfg: Config, info: dist.DistInfo, out_dir: Path, *,
                       shuffled: bool, resume: bool, model_path=None, progress: bool = True) -> Optional[dict]:
    """Answer and score every item of ``bench`` not already done (module docstring); the summary on rank 0
    (None elsewhere). Collective: every rank calls it."""
    started, path = time.perf_counter(), out_dir / f"{bench.name}.jsonl"
    done = resume_rows(path, bench, resume) if info.is_main else {}
    skip = set(dist.broadcast_object(sorted(done)))
    todo = batches([Item(s, r) for s, r in zip(bench.samples, bench.records) if s.index not in skip],
                   cfg.eval.batch_size)
    rows, scores = list(done.values()), [r["score"] for r in done.values()]
    with _progress(info, cfg, sum(map(len, todo)), bench.name, progress) as bar, \
            (open(path, "a") if info.is_main else contextlib.nullcontext()) as out:
        for first in range(0, len(todo), info.world_size):
            k = first + info.rank
            new, error = answer_or_stop(model, tokenizer, todo[k], cfg, device=info.device, shuffled=shuffled,
                                        seed=dist.step_seed(cfg.train.seed, BATCH_SEED, k)) \
                if k < len(todo) else ([], None)
            raise_together(error)
            new = dist.gather_to_main(new)
            if info.is_main:
                out.write("".join(json.dumps(r) + "\n" for r in new))
                out.flush()
                rows.extend(new)
                scores.extend(r["score"] for r in new if "score" in r)
            if bar:
                bar.update(len(new))
                bar.set_postfix(acc=f"{sum(scores) / max(len(scores), 1):.3f}", refresh=False)
    if not info.is_main:
        return None
    summary = summarize(bench, rows, settings=_settings(cfg, model_path),
                        seconds=round(time.perf_counter() - started, 3))
    write_summary(out_dir / f"{bench.name}.summary.json", summary)
    return summary


def run(cfg: Config) -> int:
    """Evaluate ``model.path`` (or the tiny model) on every configured benchmark; print the table on rank 0."""
    info = dist.init(dataclasses.replace(cfg.dist, strategy="auto"))
    benchmarks = configured_benchmarks(cfg, dist.once)
    model, tokenizer = load_eval_model(cfg, cfg.model.path, info.device)
    out_dir = Path(cfg.eval.output_dir)
    dist.print0(f"vr1fast.eval: {_settings(cfg, cfg.model.path)['model']} on {info.world_size} × {info.device.type}; "
                f"{', '.join(f'{b.name} ({len(b)} items)' for b in benchmarks)}; output {out_dir}")
    summaries = {b.name: evaluate_benchmark(model, tokenizer, b, cfg, info, out_dir, shuffled=cfg.eval.shuffled,
                                            resume=cfg.eval.resume, model_path=cfg.model.path) for b in benchmarks}
    if info.is_main:
        print(table(summaries), flush=True)
        for b in benchmarks:
            if summaries[b.name]["broken"] or b.skipped:
                print(f"{b.name}: {summaries[b.name]['broken']} broken media file(s) and {b.skipped} bad record(s) "
                      f"not scored; see {out_dir / (b.name + '.summary.json')}", flush=True)
    dist.teardown()
    return 0


def main(argv: Optional[list[str]] = None) -> None:
    """``python -m vr1fast.eval [ARGS]``: the ``videor1_eval`` preset unless ``--preset`` or the ``--config`` file
    names one
    (``--preset=demo`` evaluates with the demo's frames, prompt and sampling; its warm start is off, as for every
    preset here: eval never trains); expected failures print one line
    naming the cause (``cli.run_main``)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    # eval never warm-starts: the demo preset's model.warmstart_steps would refuse a model.path
    cli.run_main(run, ["--model.warmstart_steps=0", *argv], "vr1fast.eval", default_preset="videor1_eval")
