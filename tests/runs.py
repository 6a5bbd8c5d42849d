"""Helpers of the tests that run the training loop: the small run's arguments and metrics without timings."""
from __future__ import annotations

from pathlib import Path

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
