"""Helpers of the tests that run the training loop: the small run's arguments and metrics without timings."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

TIMING = ("time/", "tokens_per_s")


def small(synthetic: Path, out: Path, *extra: str) -> list[str]:
    """``vr1fast.train`` arguments of a short run of the tiny model on the synthetic set (``extra`` overrides); no
    final start-vs-last eval (the demo's, tested in tests/eval/test_train_eval.py)."""
    return [f"--data.synthetic_dir={synthetic}", "--data.synthetic_size=8", f"--train.output_dir={out}",
            "--train.prompts_per_rank=1", "--rollout.num_generations=2", "--rollout.num_shuffled=2",
            "--rollout.max_new_tokens=8", "--metrics.progress_bar=false", "--optim.lr=1e-3",
            "--optim.weight_decay=0.5", "--model.warmstart_steps=0", "--eval.final=false", *extra]


def comparable(rows: list[dict]) -> list[dict]:
    """Metric rows without their wall-clock keys (which differ between otherwise equal runs)."""
    return [{k: v for k, v in r.items() if not k.startswith(TIMING)} for r in rows]


def two_ranks(*target: str, timeout: int = 420) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node=2 TARGET...`` from the repository root (TARGET: a script and its
    arguments, or ``-m module ...``), each rank with one OpenMP thread and DeepSpeed's CPU accelerator (gloo);
    asserts it exited 0 (the tail of its output in the message) and returns the finished process."""
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu")
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             *target], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    return result
