"""``python -m vr1fast.experiments.temporal``: does T-GRPO's temporal reward make a model use frame order?

One command, on the CPU: a task whose answers need frame order and whose training split carries a static shortcut
(:mod:`vr1fast.data.temporal_task`: ``fade``, the scene gets brighter or darker, the tint predicting the answer for
``cue_rate`` of the training items and for half of the test items); per seed a warm start by ``vr1fast.sft`` on the
training split (with this plan the warm-started model leans on the tint: the test items where the tint misleads are
mostly answered wrong, as a video LLM that answers from one frame would); then, from that same checkpoint,
``vr1fast.train`` RL runs of each variant on the same training split:

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
seeds) and ``temporal.png``. Each row carries the commit, date and machine. ``--quick`` runs the same plumbing at
toy size (CI); its numbers mean nothing.

Runs go through the same entry points a user calls (``sft.run``, ``train.run``, ``eval.run.run`` with the config
parsed from command-line arguments), ``--jobs`` at a time in worker processes of one CPU thread each.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import datetime
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Optional

VARIANTS = {"grpo": ["--reward.temporal=false"],
            "tgrpo_code": ["--reward.temporal_rule=code"],
            "tgrpo_strict": ["--reward.temporal_rule=strict"],
            "tgrpo_advantage": ["--reward.temporal_rule=advantage"]}
HALVES = ("cue_agree", "cue_conflict")
STEP_KEYS = ("reward", "reward_std", "rewards/accuracy_reward", "rewards/format_reward", "temporal_rewards",
             "temporal_adv_delta", "temporal_adv_changed", "all_correct", "all_wrong", "kl", "completion_length")
TEST_KEYS = ("test_ordered", "test_shuffled", "test_gap", "conflict_ordered")
BONUS_KEYS = ("temporal_rewards", "temporal_adv_changed", "temporal_adv_delta")
COLOURS = {"grpo": "tab:blue", "tgrpo_code": "tab:orange", "tgrpo_strict": "tab:green", "tgrpo_advantage": "tab:red"}
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}  # t_{0.975, df}


@dataclasses.dataclass(frozen=True)
class Plan:
    """The experiment's sizes; ``FULL`` is the committed run, ``QUICK`` the CI plumbing check."""

    seeds: int = 3
    kind: str = "fade"
    signal: float = 0.5          # the order signal: brightness change over the clip, a fraction of the range
    noise: float = 0.1           # per-frame brightness jitter, same unit
    cue_rate: float = 0.8        # training items whose tint predicts the answer
    n_train: int = 256
    n_test: int = 64             # two halves: tint agrees / conflicts
    sft_steps: int = 160
    sft_batch: int = 8
    sft_lr: float = 3e-3
    rl_steps: int = 80
    prompts: int = 4             # prompts per RL step
    generations: int = 8         # G ordered (+ G/2 shuffled, Video-R1's)
    max_new_tokens: int = 32
    rl_lr: float = 1e-4
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


def eval_args(plan: Plan, data: Path, model: Path, out: Path) -> list[str]:
    return ["--preset=demo", "--model.warmstart_steps=0", f"--model.path={model}", *VIDEO,
            f"--eval.benchmarks={_list(data / f'eval_{h}.json' for h in HALVES)}", "--eval.shuffled=true",
            "--eval.sampling=greedy", f"--eval.max_new_tokens={plan.max_new_tokens}", "--eval.batch_size=32",
            f"--eval.output_dir={out}", "--eval.resume=false"]


def rl_args(plan: Plan, data: Path, model: Path, out: Path, seed: int, variant: str) -> list[str]:
    return ["--preset=demo", "--model.warmstart_steps=0", f"--model.path={model}", f"--data.path={data / 'train.json'}",
            *VIDEO, *QUIET, *VARIANTS[variant], "--reward.len_control=false",
            f"--rollout.num_generations={plan.generations}", f"--rollout.max_new_tokens={plan.max_new_tokens}",
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
            raise RuntimeError(f"{kind} run failed: {type(error).__name__}: {error} (log {log})") from None
    if code:
        raise RuntimeError(f"{kind} run exited with {code} (log {log})")
    return time.perf_counter() - started


def _final(out: Path, steps: int) -> Path:
    return out / "checkpoints" / f"step_{steps:06d}"


def _prepare(plan: Plan, out: Path) -> Path:
    """The task under ``out/data`` (reused when it is there); refuses an ``out`` that holds another plan's runs."""
    from vr1fast.data.temporal_task import generate_temporal_task
    out.mkdir(parents=True, exist_ok=True)
    stored, wanted = out / "plan.json", json.dumps(dataclasses.asdict(plan), indent=1)
    if stored.is_file() and stored.read_text() != wanted:
        raise SystemExit(f"vr1fast.experiments.temporal: {out} holds runs of another plan ({stored}); pass a new --out")
    stored.write_text(wanted)
    return generate_temporal_task(out / "data", kind=plan.kind, n_train=plan.n_train, n_test=plan.n_test,
                                  cue_rate=plan.cue_rate, signal=plan.signal, noise=plan.noise).root


def run_all(plan: Plan, out: Path, jobs: int, variants: tuple[str, ...]) -> dict[str, float]:
    """Every run of the plan not already finished under ``out`` (seconds per run kind, summed)."""
    data = _prepare(plan, out)
    os.environ["OMP_NUM_THREADS"] = "1"  # the spawned workers' OpenMP teams
    seconds: dict[str, float] = {}
    import multiprocessing
    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
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
            later.append(("eval", submit("eval", eval_args(plan, data, model, where), where,
                                         (where / f"{HALVES[-1]}.summary.json").is_file())))
            for variant in variants:
                where = out / f"rl-{variant}-{seed}"
                finished = _final(where, plan.rl_steps).is_dir()
                later.append(("rl", submit("rl", rl_args(plan, data, model, where, seed, variant), where, finished)))
        for kind, future in later:
            if future is not None:
                seconds[kind] = seconds.get(kind, 0.0) + future.result()
    return seconds


# ---------------------------------------------------------------- collecting


def _test_numbers(values: dict[str, Optional[float]]) -> dict[str, float]:
    """From ``{<half>/ordered_accuracy, <half>/shuffled_accuracy}``: the test split's ordered and shuffled accuracy
    (the mean of the equal halves), their gap, and the conflict half's ordered accuracy."""
    ordered = sum(values[f"{h}/ordered_accuracy"] for h in HALVES) / len(HALVES)
    shuffled = sum(values[f"{h}/shuffled_accuracy"] for h in HALVES) / len(HALVES)
    return {"test_ordered": ordered, "test_shuffled": shuffled, "test_gap": ordered - shuffled,
            "conflict_ordered": values["cue_conflict/ordered_accuracy"]}


def step_rows(plan: Plan, out: Path, variants: tuple[str, ...]) -> list[dict]:
    """Every logged step of every RL run, with the test numbers on the eval steps (step 0: the warm start's)."""
    from vr1fast.metrics import read_jsonl
    rows = []
    for seed in range(plan.seeds):
        start = {f"{h}/{k}": json.loads((out / f"start-{seed}" / f"{h}.summary.json").read_text())[k]
                 for h in HALVES for k in ("ordered_accuracy", "shuffled_accuracy")}
        for variant in variants:
            rows.append({"variant": variant, "seed": seed, "step": 0, **_test_numbers(start)})
            for r in read_jsonl(out / f"rl-{variant}-{seed}" / "metrics.jsonl"):
                row = {"variant": variant, "seed": seed, "step": r["step"], **{k: r.get(k) for k in STEP_KEYS}}
                if f"eval/{HALVES[0]}/ordered_accuracy" in r:
                    row.update(_test_numbers({k[len("eval/"):]: v for k, v in r.items() if k.startswith("eval/")}))
                rows.append(row)
    return rows


def interval(values: list[float]) -> tuple[float, float]:
    """(mean, half-width of the 95% t-interval over the values; nan for one value)."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, float("nan")
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return mean, T95.get(n - 1, 1.96) * sd / math.sqrt(n)


def _final_per_seed(plan: Plan, rows: list[dict], variant: str, start: bool) -> list[dict]:
    """Per seed: the last tested row of ``variant`` (step 0 for ``start``) with the run's mean of each bonus metric."""
    out = []
    for seed in range(plan.seeds):
        runs = [r for r in rows if r["variant"] == variant and r["seed"] == seed]
        final = dict([r for r in runs if "test_ordered" in r and (r["step"] == 0) == start][-1])
        for k in BONUS_KEYS:
            seen = [r[k] for r in runs if r.get(k) is not None]
            final[k] = sum(seen) / len(seen) if seen and not start else None
        out.append(final)
    return out


def summary_rows(plan: Plan, rows: list[dict], variants: tuple[str, ...]) -> list[dict]:
    """Per variant (and ``start``, the warm start): mean and 95% interval over seeds of the final test numbers and of
    the run's mean ``temporal_rewards`` / ``temporal_adv_changed`` / ``temporal_adv_delta``; and, paired by seed
    (same warm start), each final test number minus GRPO's (``<key>_vs_grpo``), when GRPO ran."""
    finals = {v: _final_per_seed(plan, rows, v, False) for v in variants}
    finals = {"start": _final_per_seed(plan, rows, variants[0], True), **finals}
    out = []
    for variant, per_seed in finals.items():
        row = {"variant": variant, "seeds": plan.seeds, "step": per_seed[0]["step"]}
        columns = {k: [r[k] for r in per_seed if r.get(k) is not None] for k in (*TEST_KEYS, *BONUS_KEYS)}
        if "grpo" in finals and variant != "start":
            columns.update({f"{k}_vs_grpo": [r[k] - g[k] for r, g in zip(per_seed, finals["grpo"])]
                            for k in TEST_KEYS})
        for k, values in columns.items():
            if values:
                row[k], row[f"{k}_ci95"] = interval(values)
                row[f"{k}_seeds"] = " ".join(f"{v:.4f}" for v in values)
        out.append(row)
    return out


# ---------------------------------------------------------------- writing


def provenance() -> dict[str, str]:
    """commit (``+dirty`` with uncommitted changes), UTC date, machine."""
    import torch

    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], capture_output=True, text=True, check=True,
                                  cwd=Path(__file__).parent).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return ""
    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    dirty = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit + ("+dirty" if dirty else ""),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "machine": f"{platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}"}


def write_csv(path: Path, rows: list[dict], extra: dict[str, str]) -> None:
    columns = list(dict.fromkeys(k for r in rows for k in r)) + list(extra)
    tmp = path.with_name(path.name + ".part")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, columns)
        writer.writeheader()
        for r in rows:
            writer.writerow({**{k: ("" if v is None else round(v, 6) if isinstance(v, float) else v)
                                for k, v in r.items()}, **extra})
    os.replace(tmp, path)


def _curve(rows: list[dict], variant: str, key: str, smooth: int = 1) -> tuple[list[int], list[float], list[float]]:
    """(steps, mean over seeds, 95% half-width) of ``key``; ``smooth`` > 1 first averages each seed's values over a
    trailing window of that many logged steps."""
    seeds = sorted({r["seed"] for r in rows if r["variant"] == variant})
    per_seed = {s: {r["step"]: r[key] for r in rows if r["variant"] == variant and r["seed"] == s
                    and r.get(key) is not None} for s in seeds}
    steps = sorted(set.intersection(*(set(v) for v in per_seed.values()))) if per_seed else []
    def trailing(values: dict[int, float], i: int) -> float:
        window = [values[u] for u in steps[max(0, i - smooth + 1):i + 1]]
        return sum(window) / len(window)
    per_seed = {s: {t: trailing(v, i) for i, t in enumerate(steps)} for s, v in per_seed.items()}
    stats = [interval([per_seed[s][t] for s in seeds]) for t in steps]
    return steps, [m for m, _ in stats], [0.0 if math.isnan(h) else h for _, h in stats]


def _paired(rows: list[dict], variant: str, key: str) -> list[dict]:
    """Rows of ``variant`` with ``key`` replaced by its difference to GRPO's value at the same seed and step."""
    grpo = {(r["seed"], r["step"]): r.get(key) for r in rows if r["variant"] == "grpo"}
    return [{**r, key: r[key] - grpo[(r["seed"], r["step"])]} for r in rows if r["variant"] == variant
            and r.get(key) is not None and grpo.get((r["seed"], r["step"])) is not None]


def plot(path: Path, rows: list[dict], variants: tuple[str, ...], title: str) -> None:
    """Against the RL step, mean over seeds with its 95% band: the held-out ordered accuracy, the ordered - shuffled
    gap, that gap minus GRPO's from the same warm start (paired by seed), and the fraction of video groups whose
    advantages the bonus moved (5-step trailing mean)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5))
    panels = [("test_ordered", "held-out accuracy, ordered frames", lambda v: rows, 1),
              ("test_gap", "held-out ordered - shuffled accuracy", lambda v: rows, 1),
              ("test_gap", "gap minus GRPO's (same warm start)", lambda v: _paired(rows, v, "test_gap"), 1),
              ("temporal_adv_changed", "video groups whose advantages the bonus moved", lambda v: rows, 5)]
    for ax, (key, label, source, smooth) in zip(axes.flat, panels):
        for variant in variants:
            steps, mean, half = _curve(source(variant), variant, key, smooth)
            if not steps:
                continue
            colour = COLOURS.get(variant)
            ax.plot(steps, mean, label=variant, color=colour, marker="o" if smooth == 1 else None, ms=3)
            ax.fill_between(steps, [m - h for m, h in zip(mean, half)], [m + h for m, h in zip(mean, half)],
                            color=colour, alpha=0.12)
        ax.set_title(label, fontsize=10)
        ax.set_xlabel("RL step")
        ax.grid(alpha=0.3)
        if key != "test_gap" or "minus" not in label:
            ax.set_ylim(-0.05, 1.05)
    axes.flat[0].legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    tmp = path.with_name(path.name + ".part")
    fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    os.replace(tmp, path)


def report(summary: list[dict]) -> str:
    """The summary as a plain table (printed at the end): final held-out numbers, the gap's paired difference to
    GRPO and the fraction of video groups whose advantages the bonus moved."""
    keys = ("test_ordered", "test_shuffled", "test_gap", "conflict_ordered", "test_gap_vs_grpo")
    heads = ("ordered", "shuffled", "gap", "tint misleads", "gap - GRPO's")
    lines = [f"{'variant':16} " + " ".join(f"{h:>15}" for h in heads) + f" {'moved A':>8}"]
    for r in summary:
        cells = [f"{r[k]:+.3f} ± {r[k + '_ci95']:.3f}" if k.endswith("vs_grpo") and k in r else
                 f"{r[k]:.3f} ± {r[k + '_ci95']:.3f}" if k in r else "-" for k in keys]
        moved = f"{r['temporal_adv_changed']:.3f}" if "temporal_adv_changed" in r else "-"
        lines.append(f"{r['variant']:16} " + " ".join(f"{c:>15}" for c in cells) + f" {moved:>8}")
    return "\n".join(lines)


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
    out, results = Path(args.out), Path(args.results or args.out)
    started = time.perf_counter()
    seconds = run_all(plan, out, max(1, args.jobs), variants)
    rows = step_rows(plan, out, variants)
    summary = summary_rows(plan, rows, variants)
    wall = time.perf_counter() - started
    extra = {**provenance(), "wall_s": f"{wall:.0f}", "jobs": str(args.jobs),
             "plan": json.dumps(dataclasses.asdict(plan), separators=(",", ":"))}
    results.mkdir(parents=True, exist_ok=True)
    write_csv(results / "temporal_steps.csv", rows, extra)
    write_csv(results / "temporal_summary.csv", summary, extra)
    plot(results / "temporal.png", rows, variants, f"{plan.kind}: cue_rate {plan.cue_rate}, signal {plan.signal}, "
         f"noise {plan.noise}, {plan.seeds} seeds, {plan.rl_steps} RL steps; {extra['commit']} {extra['date']}")
    print(report(summary))
    print(f"done in {wall:.0f} s (run seconds: {', '.join(f'{k} {v:.0f}' for k, v in seconds.items())}); "
          f"{results / 'temporal_summary.csv'}, {results / 'temporal_steps.csv'}, {results / 'temporal.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
