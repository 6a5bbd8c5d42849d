"""``python -m vr1fast.experiments.temporal --quick``: the plumbing (runs, CSVs, plot, reuse), not the result."""
import csv
import math
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vr1fast.experiments import temporal
import dataclasses

from vr1fast.cli import parse
from vr1fast.experiments.temporal import FULL, QUICK, VARIANTS, _prepare, eval_args, main, rl_args
from vr1fast.experiments.temporal_results import interval, summary_rows, t95


def read(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("temporal")
    assert main(["--quick", "--out", str(out / "runs"), "--results", str(out / "results"), "--jobs", "2"]) == 0
    return out


def test_quick_writes_steps_summary_and_plot(quick):
    results = quick / "results"
    steps, summary = read(results / "temporal_steps.csv"), read(results / "temporal_summary.csv")
    assert [r["variant"] for r in summary] == ["start", *VARIANTS]
    for r in summary:
        assert r["seeds"] == str(QUICK.seeds) and r["commit"] and r["date"].startswith("20") and "cores" in r["machine"]
        assert r["runs_commit"] and "+" not in r["runs_commit"].replace("+dirty", "")
        assert 0.0 <= float(r["test_ordered"]) <= 1.0 and r["test_gap"] != ""
        assert r["test_gap_seeds"].count(" ") == QUICK.seeds - 1        # one value per seed
    assert float(summary[1]["test_gap_vs_grpo"]) == 0.0                # GRPO paired with itself
    assert summary[0]["test_gap_vs_grpo"] == "" and summary[2]["test_gap_vs_grpo"] != ""   # none for the start
    rl = [r for r in steps if r["step"] != "0"]
    assert {(r["variant"], r["seed"]) for r in rl} == {(v, str(s)) for v in VARIANTS for s in range(QUICK.seeds)}
    assert all(len([r for r in rl if r["variant"] == v and r["seed"] == "0"]) == QUICK.rl_steps for v in VARIANTS)
    tested = [r for r in rl if r["test_ordered"] != ""]
    assert {r["step"] for r in tested} == {str(QUICK.rl_steps)}       # eval_every = rl_steps in the quick plan
    for r in rl:   # the bonus metrics are logged with the temporal reward on, and only then
        assert (r["temporal_adv_delta"] != "") == (r["variant"] != "grpo"), r
        assert r["rewards/accuracy_reward"] != "" and float(r["completion_length"]) > 0
    png = (results / "temporal.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_quick_finished_runs_are_reused(quick, monkeypatch):
    """A second call runs nothing (every run finished) and writes the same numbers."""
    before = read(quick / "results" / "temporal_summary.csv")
    monkeypatch.setattr(temporal, "_job", lambda *a: pytest.fail(f"ran again: {a[0]}"))
    # the pool pickles _job by name in the worker: patching it here would not reach the workers, so no pool may run
    assert temporal.run_all(QUICK, quick / "runs", 2, tuple(VARIANTS)) == {}
    main(["--quick", "--out", str(quick / "runs"), "--results", str(quick / "again")])
    again = read(quick / "again" / "temporal_summary.csv")
    keys = [k for k in before[0] if k.startswith(("test_", "conflict_", "temporal_"))] + ["wall_s", "rl_s", "sft_s"]
    assert float(before[0]["wall_s"]) > 0 and float(before[0]["rl_s"]) > 0   # the runs' time, not the reuse's
    assert [[r[k] for k in keys] for r in again] == [[r[k] for k in keys] for r in before]


def test_another_plan_in_the_same_out_is_refused_more_seeds_are_not(quick):
    with pytest.raises(SystemExit, match="another plan"):
        main(["--quick", "--set", "rl_lr=0.5", "--out", str(quick / "runs")])
    _prepare(dataclasses.replace(QUICK, seeds=QUICK.seeds + 1), quick / "runs")   # the runs of seeds 0..1 stay valid
    _prepare(QUICK, quick / "runs")


def test_runs_are_configured_as_described(tmp_path):
    """G ordered + G/2 shuffled completions (Video-R1's ratio), the variant's rule, and the warm start's eval with
    the frame shuffles of the RL runs' evals (both seeded by train.seed)."""
    model = tmp_path / "model"
    rl = parse(rl_args(FULL, tmp_path, model, tmp_path / "rl", 3, "tgrpo_strict"))
    assert (rl.rollout.num_generations, rl.rollout.shuffled_samples()) == (FULL.generations, FULL.generations // 2)
    assert rl.reward.temporal and rl.reward.temporal_rule == "strict" and not rl.reward.len_control
    assert not parse(rl_args(FULL, tmp_path, model, tmp_path / "rl", 3, "grpo")).reward.temporal
    start = parse(eval_args(FULL, tmp_path, model, tmp_path / "eval", 3))
    assert start.train.seed == rl.train.seed == 3 and start.eval.shuffled and start.eval.sampling == "greedy"
    assert start.eval.benchmarks == rl.eval.benchmarks and start.video == rl.video


def test_summary_by_hand():
    """Two seeds, GRPO and one variant: final numbers (the last evaluated step), the start (step 0), the runs' mean
    bonus metrics and the difference to GRPO paired by seed."""
    plan = dataclasses.replace(QUICK, seeds=2)
    tests = {("grpo", 0): (0.8, 0.5), ("grpo", 1): (0.6, 0.5), ("tgrpo_code", 0): (0.9, 0.5),
             ("tgrpo_code", 1): (0.6, 0.4)}
    rows = []
    for (variant, seed), (ordered, shuffled) in tests.items():
        start = {"test_ordered": 0.5, "test_shuffled": 0.5, "test_gap": 0.0, "conflict_ordered": 0.1 * seed}
        rows.append({"variant": variant, "seed": seed, "step": 0, **start})
        for step, changed in ((1, 0.2), (2, 0.4)):
            row = {"variant": variant, "seed": seed, "step": step}
            if variant != "grpo":
                row.update(temporal_rewards=1.0, temporal_adv_changed=changed + seed, temporal_adv_delta=0.0)
            if step == 2:
                row.update(test_ordered=ordered, test_shuffled=shuffled, test_gap=ordered - shuffled,
                           conflict_ordered=ordered - 0.1)
            rows.append(row)
    got = {r["variant"]: r for r in summary_rows(plan, rows, ("grpo", "tgrpo_code"))}
    assert got["start"]["step"] == 0 and got["start"]["conflict_ordered"] == pytest.approx(0.05)
    assert "test_gap_vs_grpo" not in got["start"] and "temporal_adv_changed" not in got["start"]
    assert got["grpo"]["step"] == 2 and got["grpo"]["test_gap"] == pytest.approx(0.2)
    code = got["tgrpo_code"]
    assert code["test_gap"] == pytest.approx(0.3) and code["test_gap_seeds"] == "0.4000 0.2000"
    assert code["test_gap_vs_grpo"] == pytest.approx(0.1)              # (0.4 - 0.3) and (0.2 - 0.1)
    assert code["test_gap_vs_grpo_ci95"] == pytest.approx(0.0, abs=1e-9)
    assert code["test_ordered_vs_grpo"] == pytest.approx(0.05)         # (0.9 - 0.8) and (0.6 - 0.6)
    assert code["test_ordered_vs_grpo_ci95"] == pytest.approx(t95(1) * 0.05 * math.sqrt(2) / math.sqrt(2))
    assert code["temporal_adv_changed"] == pytest.approx(0.8)          # run means 0.3 and 1.3
    assert code["temporal_rewards"] == 1.0 and "temporal_rewards" not in got["grpo"]


def test_plan_must_end_on_an_eval_step(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["--quick", "--set", "eval_every=3", "--out", str(tmp_path)])
    assert "multiple of eval_every" in capsys.readouterr().err


def test_unknown_variant_is_named(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["--quick", "--variants", "grpo,ppo", "--out", str(tmp_path)])
    assert "ppo" in capsys.readouterr().err


@pytest.mark.parametrize("assignment, message", [("rl_lr=fast", "is not a float"), ("lr=1", "KEY one of"),
                                                 ("rl_steps", "KEY one of")])
def test_bad_plan_change_is_named(tmp_path, capsys, assignment, message):
    with pytest.raises(SystemExit):
        main(["--quick", "--set", assignment, "--out", str(tmp_path)])
    assert message in capsys.readouterr().err


def test_interval():
    mean, half = interval([0.5, 0.7, 0.6])
    assert mean == pytest.approx(0.6) and half == pytest.approx(4.303 * 0.1 / math.sqrt(3))
    assert math.isnan(interval([0.4])[1])
    # past the table: t_{0.975} at df 10, 20, 30 and 120 (Student's tables)
    for df, t in ((10, 2.228), (20, 2.086), (30, 2.042), (120, 1.980)):
        assert t95(df) == pytest.approx(t, abs=1e-3)


def test_workers_die_with_the_experiment(tmp_path):
    """A killed experiment takes its worker processes with it (they would train on, unread, to the end of a run)."""
    script = tmp_path / "parent.py"
    script.write_text(
        "import multiprocessing, os, sys, time\n"
        "from concurrent.futures import ProcessPoolExecutor\n"
        "from vr1fast.experiments.temporal import _die_with_parent\n"
        "if __name__ == '__main__':\n"
        "    pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context('spawn'),\n"
        "                               initializer=_die_with_parent, initargs=(os.getpid(),))\n"
        "    open(sys.argv[1], 'w').write(str(pool.submit(os.getpid).result()))\n"
        "    pool.submit(time.sleep, 60)\n"
        "    time.sleep(0.5)\n"
        "    os._exit(0)\n")
    subprocess.run([sys.executable, str(script), str(tmp_path / "pid")], check=True, timeout=60,
                   stdout=subprocess.DEVNULL)   # no pipe the worker could hold open
    worker = int((tmp_path / "pid").read_text())
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and Path(f"/proc/{worker}").exists():
        time.sleep(0.1)
    assert not Path(f"/proc/{worker}").exists(), "the worker outlived the experiment's process"
