"""``python -m vr1fast.experiments.temporal``: does T-GRPO's temporal reward make a model use frame order?

One command, on the CPU: a task whose answers need frame order and whose training split carries a static shortcut
(:mod:`vr1fast.data.temporal_task`: ``fade``, the scene gets brighter or darker, the tint predicting the answer for
``cue_rate`` of the training items and for half of the test items); per seed a warm start by ``vr1fast.sft`` on the
training split (the warm starts differ by seed: some read the order, some lean on the tint and miss the test items
where it misleads, as a video LLM that answers from one frame would); then, from that same checkpoint,
``vr1fast.train`` RL runs of each variant on the same training split. The task is drawn once (its seed is 0): a
seed varies the model's initialisation, the data order and the sampling, so the intervals leave out data variation.
Variants:

| variant | reward |
|---|---|
| ``grpo`` | accuracy + format, no temporal reward (``reward.temporal=false``) |
| ``tgrpo_code`` | + Video-R1's code rule (``temporal_rule=code``: p >= 0.8 p~, in the reward) |
| ``tgrpo_strict`` | + the paper's rule (``strict``: p > p~, in the reward) |
| ``tgrpo_advantage`` | + ``advantage``: p > p~, alpha added to the correct answers' advantages after normalisation |

Every ``eval_every`` steps the policy answers the two test halves greedily on ordered and on shuffled frames
(``eval.every``, ``eval.benchmarks``). Written to ``--results``: ``temporal_steps.csv`` (every logged step of every
run: rewards, ``temporal_rewards``, ``temporal_adv_delta`` / ``_changed``, test accuracies), ``temporal_summary.csv``
(per variant: the start and final test ordered / shuffled accuracy, their gap, the cue-conflict half's ordered
accuracy, the fraction of video groups whose advantages the bonus moved, each as mean and 95% t-interval over the
seeds, and each minus GRPO from the same warm start) and ``temporal.png``. Each row carries the commit, date and
machine. ``--quick`` runs the same plumbing at
toy size (CI); its numbers mean nothing.

Runs go through the same entry points a user calls (``sft.run``, ``train.run``, ``eval.run.run`` with the config
parsed from command-line arguments), ``--jobs`` at a time in worker processes of one CPU thread each.
"""
from __future__ import annotations

import argparse
import contextlib
import ctypes
import dataclasses
import json
import os
import shutil
import signal
import sys
import time
import traceback
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, Optional

from vr1fast.experiments.temporal_results import (HALVES, plot, provenance, report, step_rows, summary_rows,
                                                  write_csv)

VARIANTS = {"grpo": ["--reward.temporal=false"],
            "tgrpo_code": ["--reward.temporal_rule=code"],
            "tgrpo_strict": ["--reward.temporal_rule=strict"],
            "tgrpo_advantage": ["--reward.temporal_rule=advantage"]}


@dataclasses.dataclass(frozen=True)
class Plan:
    """The experiment's sizes; ``FULL`` is the committed run, ``QUICK`` the CI plumbing check."""

    seeds: int = 5
    kind: str = "fade"
    signal: float = 0.5          # the order signal: brightness change over the clip, a fraction of the range
    noise: float = 0.1           # per-frame brightness jitter, same unit
    cue_rate: float = 0.8        # training items whose tint predicts the answer
    n_train: int = 256
    n_test: int = 64             # two halves: tint agrees / conflicts
    sft_steps: int = 160
    sft_batch: int = 8
    sft_lr: float = 3e-3
    rl_steps: int = 100
    prompts: int = 4             # prompts per RL step
    generations: int = 8         # G ordered (+ G/2 shuffled, Video-R1's)
    max_new_tokens: int = 32
    rl_lr: float = 3e-4
    eval_every: int = 10


FULL = Plan()
QUICK = Plan(seeds=2, n_train=16, n_test=4, sft_steps=4, sft_batch=4, rl_steps=2, prompts=2, generations=4,
             max_new_tokens=24, eval_every=2)
VIDEO = ["--video.max_frames=8", "--video.min_pixels=3136", "--video.max_pixels=3136"]  # 8 frames of 56x56
QUIET = ["--metrics.tensorboard=false", "--metrics.plot=false", "--metrics.progress_bar=false"]


def _list(paths) -> str:
    return "[" + ",".join(str(p) for p in paths) + "]"


def sft_args(plan: Plan, data: Path, out: Path, seed: int) -> list[str]:
    return ["--preset=sft_demo", f"--data.path={data / 'train_sft.json'}", *VIDEO, *QUIET,
            f"--train.max_steps={plan.sft_steps}", f"--train.prompts_per_rank={plan.sft_batch}",
            f"--optim.lr={plan.sft_lr}", f"--train.seed={seed}", f"--model.tiny_seed={seed}",
            f"--train.output_dir={out}", f"--train.save_every={plan.sft_steps}", "--train.log_every=10"]


def eval_args(plan: Plan, data: Path, model: Path, out: Path, seed: int) -> list[str]:
    """The warm start's held-out eval, with the frame shuffles of the RL runs' evals (seeded by ``train.seed``)."""
    return ["--preset=demo", "--model.warmstart_steps=0", f"--model.path={model}", *VIDEO, f"--train.seed={seed}",
            f"--eval.benchmarks={_list(data / f'eval_{h}.json' for h in HALVES)}", "--eval.shuffled=true",
            "--eval.sampling=greedy", f"--eval.max_new_tokens={plan.max_new_tokens}", "--eval.batch_size=32",
            f"--eval.output_dir={out}", "--eval.resume=false"]


def rl_args(plan: Plan, data: Path, model: Path, out: Path, seed: int, variant: str) -> list[str]:
    return ["--preset=demo", "--model.warmstart_steps=0", f"--model.path={model}", f"--data.path={data / 'train.json'}",
            *VIDEO, *QUIET, *VARIANTS[variant], "--reward.len_control=false",
            f"--rollout.num_generations={plan.generations}", f"--rollout.num_shuffled={plan.generations // 2}",
            f"--rollout.max_new_tokens={plan.max_new_tokens}",
            f"--optim.lr={plan.rl_lr}", f"--train.max_steps={plan.rl_steps}",
            f"--train.prompts_per_rank={plan.prompts}", f"--train.seed={seed}", f"--train.output_dir={out}",
            f"--train.save_every={plan.rl_steps}", "--metrics.samples_every=0",
            f"--eval.benchmarks={_list(data / f'eval_{h}.json' for h in HALVES)}", f"--eval.every={plan.eval_every}",
            "--eval.final=false", "--eval.sampling=greedy", f"--eval.max_new_tokens={plan.max_new_tokens}",
            "--eval.batch_size=32"]


# ---------------------------------------------------------------- running


def _job(kind: str, args: list[str], log: Path) -> float:
    """One ``vr1fast`` run in this worker process (one CPU thread), its output in ``log``; returns its seconds."""
    import torch

    from vr1fast import cli, sft, train
    from vr1fast.eval import run as eval_run
    torch.set_num_threads(1)
    started = time.perf_counter()
    with open(log, "w") as f, contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
        try:
            code = {"sft": sft.run, "rl": train.run, "eval": eval_run.run}[kind](cli.parse(args))
        except Exception as error:
            traceback.print_exc()
            raise RuntimeError(f"{kind} run failed: {type(error).__name__}: {error} (log {log})") from None
    if code:
        raise RuntimeError(f"{kind} run exited with {code} (log {log})")
    return time.perf_counter() - started


def _die_with_parent(parent: int) -> None:
    """A worker's initializer: on Linux the kernel kills it when the experiment's process dies (a killed parent
    would otherwise leave it training, unread, to the end of its run; the next call starts that run again)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)           # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:                  # the parent died before prctl took effect
        os._exit(1)


def _final(out: Path, steps: int) -> Path:
    """The checkpoint a run in ``out`` writes after ``steps`` steps (there once that run finished)."""
    from vr1fast import ckpt
    return ckpt.step_dir(ckpt.checkpoint_root(out), steps)


def _prepare(plan: Plan, out: Path) -> Path:
    """The task under ``out/data`` (reused when it is there); refuses an ``out`` that holds another plan's runs."""
    from vr1fast.data.temporal_task import generate_temporal_task
    out.mkdir(parents=True, exist_ok=True)
    stored, wanted = out / "plan.json", dataclasses.asdict(plan)
    if stored.is_file() and {**json.loads(stored.read_text()), "seeds": plan.seeds} != wanted:  # seeds may grow
        raise SystemExit(f"vr1fast.experiments.temporal: {out} holds runs of another plan ({stored}); pass a new --out")
    stored.write_text(json.dumps(wanted, indent=1))
    return generate_temporal_task(out / "data", kind=plan.kind, n_train=plan.n_train, n_test=plan.n_test,
                                  cue_rate=plan.cue_rate, signal=plan.signal, noise=plan.noise).root


def run_all(plan: Plan, out: Path, jobs: int, variants: tuple[str, ...]) -> dict[str, float]:
    """Every run of the plan not already finished under ``out`` (seconds per run kind, summed)."""
    data = _prepare(plan, out)
    os.environ["OMP_NUM_THREADS"] = "1"  # the spawned workers' OpenMP teams
    seconds: dict[str, float] = {}
    import multiprocessing
    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"), initializer=_die_with_parent,
                             initargs=(os.getpid(),)) as pool:
        def submit(kind: str, args: list[str], where: Path, done: bool):
            if done:
                return None
            shutil.rmtree(where, ignore_errors=True)  # an unfinished run starts again
            where.mkdir(parents=True)
            return pool.submit(_job, kind, args, where / "run.log")
        warm = {seed: submit("sft", sft_args(plan, data, out / f"sft-{seed}", seed), out / f"sft-{seed}",
                             _final(out / f"sft-{seed}", plan.sft_steps).is_dir()) for seed in range(plan.seeds)}
        later = []
        for seed, future in warm.items():
            if future is not None:
                seconds["sft"] = seconds.get("sft", 0.0) + future.result()
            model = _final(out / f"sft-{seed}", plan.sft_steps) / "model"
            where = out / f"start-{seed}"
            later.append(("eval", submit("eval", eval_args(plan, data, model, where, seed), where,
                                         (where / f"{HALVES[-1]}.summary.json").is_file())))
            for variant in variants:
                where = out / f"rl-{variant}-{seed}"
                finished = _final(where, plan.rl_steps).is_dir()
                later.append(("rl", submit("rl", rl_args(plan, data, model, where, seed, variant), where, finished)))
        for kind, future in later:
            if future is not None:
                seconds[kind] = seconds.get(kind, 0.0) + future.result()
    return seconds


def _add_timing(path: Path, seconds: dict[str, float], wall: float) -> dict[str, Any]:
    """``path``'s record of the runs: ``wall`` (seconds of the invocations that ran something), the summed seconds
    per run kind and ``runs_commit`` (the commits those invocations ran), this invocation's added when it ran
    something."""
    timing = json.loads(path.read_text()) if path.is_file() else {}
    if seconds:
        for key, value in {"wall": wall, **seconds}.items():
            timing[key] = timing.get(key, 0.0) + value
        commits = set(filter(None, timing.get("runs_commit", "").split(" "))) | {provenance()["commit"]}
        timing["runs_commit"] = " ".join(sorted(commits))
        path.write_text(json.dumps(timing, indent=1) + "\n")
    return timing


def changed(plan: Plan, assignments: list[str], parser: argparse.ArgumentParser) -> Plan:
    """``plan`` with each ``KEY=VALUE`` applied, the value converted to the field's type."""
    fields = {f.name: type(getattr(plan, f.name)) for f in dataclasses.fields(Plan)}
    for text in assignments:
        key, _, value = text.partition("=")
        if key not in fields or not value:
            parser.error(f"--set {text}: expected KEY=VALUE with KEY one of {', '.join(fields)}")
        try:
            plan = dataclasses.replace(plan, **{key: fields[key](value)})
        except ValueError:
            parser.error(f"--set {text}: {value!r} is not a {fields[key].__name__}")
    return plan


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vr1fast.experiments.temporal", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="toy sizes that check the plumbing (CI, ~2 min)")
    parser.add_argument("--out", default="runs/temporal", help="runs, checkpoints and logs (finished runs reused)")
    parser.add_argument("--results", default=None, help="where the CSVs and the plot go (default: --out)")
    parser.add_argument("--seeds", type=int, default=None, help="seeds per variant (default: the plan's)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="change one field of the plan (repeatable): " + ", ".join(
                            f"{f.name}={getattr(FULL, f.name)}" for f in dataclasses.fields(Plan)))
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated, of " + ", ".join(VARIANTS))
    parser.add_argument("--jobs", type=int, default=2, help="runs at once, one CPU thread each")
    args = parser.parse_args(argv)
    variants = tuple(v for v in args.variants.split(",") if v)
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown or not variants:
        parser.error(f"--variants: unknown {unknown} (of {', '.join(VARIANTS)})")
    plan = QUICK if args.quick else FULL
    if args.seeds is not None:
        plan = dataclasses.replace(plan, seeds=args.seeds)
    plan = changed(plan, args.set, parser)
    if min(plan.seeds, plan.rl_steps, plan.eval_every) < 1 or plan.rl_steps % plan.eval_every:
        parser.error(f"the plan needs seeds, rl_steps and eval_every >= 1 and rl_steps a multiple of eval_every (the "
                     f"final held-out numbers are the last step's), got {plan.seeds}, {plan.rl_steps}, "
                     f"{plan.eval_every}")
    out, results = Path(args.out), Path(args.results or args.out)
    started = time.perf_counter()
    seconds = run_all(plan, out, max(1, args.jobs), variants)
    timing = _add_timing(out / "timing.json", seconds, time.perf_counter() - started)
    rows = step_rows(plan, out, variants)
    summary = summary_rows(plan, rows, variants)
    stamp = {**provenance(), "runs_commit": timing.get("runs_commit", "")}  # commit: this code; runs_commit: theirs
    results.mkdir(parents=True, exist_ok=True)
    write_csv(results / "temporal_steps.csv", rows, stamp)
    runs = {k: v for k, v in timing.items() if k != "runs_commit"}
    write_csv(results / "temporal_summary.csv", summary, {
        **stamp, **{f"{k}_s": f"{v:.0f}" for k, v in runs.items()},
        "jobs": str(args.jobs), "plan": json.dumps(dataclasses.asdict(plan), separators=(",", ":"))})
    plot(results / "temporal.png", rows, variants, f"{plan.kind}: cue_rate {plan.cue_rate}, signal {plan.signal}, "
         f"noise {plan.noise}, {plan.seeds} seeds, {plan.rl_steps} RL steps; runs at {timing.get('runs_commit')}, "
         f"written {stamp['date']}")
    print(report(summary))
    print(f"done in {time.perf_counter() - started:.0f} s; all runs of {out}: "
          f"{', '.join(f'{k} {v:.0f} s' for k, v in runs.items())}; "
          f"{results / 'temporal_summary.csv'}, {results / 'temporal_steps.csv'}, {results / 'temporal.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
