"""benchmarks/bench_step.py: both steps (Video-R1-style and vr1fast's) run side by side in its ``--cpu-smoke`` mode
(the tiny model, in-memory frames, two depths) and write every row; the extrapolation to 28 layers / 768 tokens
follows its stated rule. The smoke numbers mean nothing."""
import argparse
import csv
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
STAGES = ("data", "processor", "rollout", "reward", "ref", "policy_fwd_bwd", "optimizer")


def test_cpu_smoke_times_both_steps(tmp_path):
    proc = subprocess.run([sys.executable, str(BENCH / "bench_step.py"), "--cpu-smoke", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = list(csv.DictReader((tmp_path / "step.csv").open()))
    by = {(r["case"], r["impl"]): r for r in rows}
    assert len(by) == len(rows) == 3 * (len(STAGES) + 1) + 3
    for case in (*STAGES, "step"):
        for impl in ("videor1", "vr1fast"):
            r = by[(case, impl)]
            assert 0 < float(r["ms_p20"]) <= float(r["ms_p50"]) <= float(r["ms_p80"]), r
            assert "p50 at 1 layer(s)" in r["note"] and r["gpu"] == "cpu (smoke)" and r["commit"], r
        ratio = by[(case, "videor1/vr1fast")]
        assert float(ratio["rate"]) == pytest.approx(
            float(by[(case, "videor1")]["ms_p50"]) / float(by[(case, "vr1fast")]["ms_p50"]), rel=1e-3)
    for impl in ("videor1", "vr1fast"):
        step = by[("step", impl)]
        assert step["unit"] == "tok/s" and float(step["rate"]) > 0 and int(step["N"]) == 4 * 8  # G=4, 8 tokens
        est = by[("step_28L_768tok_est", impl)]
        assert float(est["ms_p50"]) > float(step["ms_p50"]) and int(est["N"]) == 4 * 768
    verdict = by[("step_28L_768tok_est", "videor1/vr1fast")]["note"]
    assert verdict.startswith("SPEC one T-GRPO step >= 10x the Video-R1-style step: ")
    assert verdict.split(": ")[1].split(";")[0] in ("PASS", "FAIL")


def test_extrapolation_rule():
    """Depth stages get the per-layer slope (clamped at 0) times the missing layers, then the token factor."""
    sys.path.insert(0, str(BENCH))
    try:
        from bench_step import STAGES as BENCH_STAGES, extrapolate
    finally:
        sys.path.remove(str(BENCH))
    assert BENCH_STAGES == STAGES
    at_4 = dict(data=1.0, processor=2.0, rollout=400.0, reward=3.0, ref=50.0, policy_fwd_bwd=80.0, optimizer=9.0)
    at_1 = dict(data=1.5, processor=2.0, rollout=100.0, reward=3.0, ref=20.0, policy_fwd_bwd=20.0, optimizer=12.0)
    args = argparse.Namespace(layers=4, base_layers=1, tokens=128)
    est = extrapolate(at_4, at_1, args, prompt_len=1000.0)
    seq = (1000 + 768) / (1000 + 128)
    assert est["rollout"] == pytest.approx((400 + 24 * 100) * 768 / 128)
    assert est["ref"] == pytest.approx((50 + 24 * 10) * seq)
    assert est["policy_fwd_bwd"] == pytest.approx((80 + 24 * 20) * seq)
    assert est["optimizer"] == 9.0  # a negative slope (noise) adds nothing
    assert (est["data"], est["processor"], est["reward"]) == (1.0, 2.0, 3.0)
    assert est["step"] == pytest.approx(sum(est[s] for s in STAGES))


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present: the script would run")
def test_refuses_without_gpu(tmp_path):
    proc = subprocess.run([sys.executable, str(BENCH / "bench_step.py"), "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "needs a CUDA GPU" in proc.stderr and not any(tmp_path.iterdir())
