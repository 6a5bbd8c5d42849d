"""The frame-order experiment's results (:mod:`vr1fast.experiments.temporal`): the step rows of every run, the
summary over seeds (means, 95% t-intervals, differences to GRPO paired by seed), the CSVs and the plot."""
from __future__ import annotations

import csv
import datetime
import json
import math
import os
import platform
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from vr1fast.provenance import commit

if TYPE_CHECKING:
    from vr1fast.experiments.temporal import Plan

HALVES = ("cue_agree", "cue_conflict")  # the test split's halves (eval_<half>.json): tint agrees / conflicts
STEP_KEYS = ("reward", "reward_std", "rewards/accuracy_reward", "rewards/format_reward", "temporal_rewards",
             "temporal_adv_delta", "temporal_adv_changed", "all_correct", "all_wrong", "kl", "completion_length")
TEST_KEYS = ("test_ordered", "test_shuffled", "test_gap", "conflict_ordered")
BONUS_KEYS = ("temporal_rewards", "temporal_adv_changed", "temporal_adv_delta")
COLOURS = {"grpo": "tab:blue", "tgrpo_code": "tab:orange", "tgrpo_strict": "tab:green", "tgrpo_advantage": "tab:red"}
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}  # t_{0.975, df}
Z975 = 1.959963985


def t95(df: int) -> float:
    """Student's t quantile 0.975 with ``df`` degrees of freedom: the table up to 9, above it the Cornish-Fisher
    expansion around the normal quantile (within 5e-4 of the exact value from df 9 on)."""
    if df in T95:
        return T95[df]
    z = Z975
    return (z + (z ** 3 + z) / (4 * df) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * df ** 2)
            + (3 * z ** 7 + 19 * z ** 5 + 17 * z ** 3 - 15 * z) / (384 * df ** 3))


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
    return mean, t95(n - 1) * sd / math.sqrt(n)


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
    return {"commit": commit(), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
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
