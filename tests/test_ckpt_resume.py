"""Interrupted real runs resume to the metrics of an uninterrupted one: SIGTERM (a preempted job) in one process,
SIGKILL under two-process DDP and FSDP2 (torchrun, gloo, CPU). Runs are tiny: 1 prompt, 2+2 completions of ≤ 6
tokens, weight decay raised so every step moves the weights (and with them every logged number)."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from runs import comparable, small
from vr1fast import ckpt
from vr1fast.metrics import read_jsonl

REPO = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, OMP_NUM_THREADS="1")  # every arm alike: thread count changes float summation order


def _argv(synthetic: Path, out: Path, *extra: str) -> list[str]:
    return small(synthetic, out, "--rollout.max_new_tokens=6", "--metrics.tensorboard=false", "--metrics.plot=false",
                 "--optim.warmup_steps=0", *extra)


def _start(command: list[str]) -> subprocess.Popen:
    """A new session, so a signal can reach torchrun's workers too (``os.killpg``)."""
    return subprocess.Popen(command, cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def _signal_after(proc: subprocess.Popen, jsonl: Path, lines: int, sig: int, group: bool) -> tuple[str, str]:
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if jsonl.is_file() and len(jsonl.read_text().splitlines()) >= lines:
            os.killpg(proc.pid, sig) if group else proc.send_signal(sig)
            break
        time.sleep(0.02)
    return proc.communicate(timeout=120)


def _run(command: list[str]) -> subprocess.CompletedProcess:
    result = subprocess.run(command, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


TRAIN = [sys.executable, "-m", "vr1fast.train"]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
            "vr1fast.train"]


@pytest.mark.slow
def test_sigterm_saves_at_the_step_boundary_and_resumes_to_the_same_metrics(synthetic, tmp_path):
    steps = ["--train.max_steps=5", "--train.save_every=100", "--train.save_total_limit=1"]
    _run([*TRAIN, *_argv(synthetic, tmp_path / "straight", *steps)])
    straight = read_jsonl(tmp_path / "straight" / "metrics.jsonl")

    argv = _argv(synthetic, tmp_path / "stopped", *steps)
    proc = _start([*TRAIN, *argv])
    _, err = _signal_after(proc, tmp_path / "stopped" / "metrics.jsonl", 2, signal.SIGTERM, group=False)
    assert proc.returncode == 143, err[-3000:]
    saved = ckpt.latest(tmp_path / "stopped" / "checkpoints")
    step = ckpt.read_state(saved)["step"]
    assert 2 <= step < 5 and ckpt.verify(saved) is None
    assert f"SIGTERM: stopped after step {step}, checkpoint {saved}" in err
    assert len(read_jsonl(tmp_path / "stopped" / "metrics.jsonl")) == step

    result = _run([*TRAIN, *argv, "--train.resume=auto"])
    assert f"steps {step + 1}..5" in result.stdout
    assert comparable(read_jsonl(tmp_path / "stopped" / "metrics.jsonl")) == comparable(straight)
    assert any(r["kl"] > 0 for r in straight[step:])  # the weights really moved
    assert [p.name for p in ckpt.complete_checkpoints(tmp_path / "stopped" / "checkpoints")] == [
        saved.name, "step_000005"]  # save_total_limit=1, plus the one resumed from


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_two_process_run_killed_resumes_to_the_same_metrics(strategy, synthetic, tmp_path):
    """Killed (SIGKILL to torchrun and its workers) once step 3 is logged, resumed from step 1's checkpoint: the
    re-run steps 2 and 3 log exactly what the killed run logged (step 3 needs the restored Adam moments)."""
    argv = _argv(synthetic, tmp_path / "run", "--train.max_steps=4", "--train.save_every=1",
                 f"--dist.strategy={strategy}")
    jsonl = tmp_path / "run" / "metrics.jsonl"
    proc = _start([*TORCHRUN, *argv])
    _, err = _signal_after(proc, jsonl, 3, signal.SIGKILL, group=True)
    assert proc.returncode == -signal.SIGKILL, err[-3000:]
    before = read_jsonl(jsonl)[:3]
    assert [r["step"] for r in before] == [1, 2, 3]

    first = ckpt.checkpoint_root(tmp_path / "run") / "step_000001"
    result = _run([*TORCHRUN, *argv, f"--train.resume={first}"])
    assert "steps 2..4" in result.stdout
    assert comparable(read_jsonl(jsonl)[:3]) == comparable(before)
    assert before[2]["kl"] > 0
