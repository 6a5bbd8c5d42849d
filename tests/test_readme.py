"""The README's pipeline (SFT → T-GRPO → eval for Qwen2.5-VL-7B on 8 GPUs) runs as written, on CPU.

The bash block between ``<!-- pipeline:start -->`` and ``<!-- pipeline:end -->`` is run by bash with the model
and data paths swapped for the tiny model and the synthetic set, ``runs/`` moved into a temporary folder, and,
so that it fits in CI on 2 cores: 2 processes instead of 8, one RL step instead of 1200 and 8 new tokens instead
of 768 / 1024 (arguments appended to the README's, which the last one wins). Everything else (presets,
DeepSpeed ZeRO-2 for SFT and ZeRO-3 for RL through the README's JSON files, the checkpoint hand-offs through
``ls``, the six benchmark files, the shuffled eval) is the README's.
"""
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from vr1fast.data.synthetic import generate_synthetic
from vr1fast.model.load import save_tiny

REPO = Path(__file__).resolve().parents[1]
BENCHMARKS = ("vsibench", "videommmu", "mmvu", "mvbench", "tempcompass", "videomme")


def pipeline_block() -> str:
    text = (REPO / "README.md").read_text()
    found = re.search(r"<!-- pipeline:start -->\s*```bash\n(.*?)```\s*<!-- pipeline:end -->", text, re.DOTALL)
    assert found, "README.md has no pipeline block"
    return found.group(1)


def cpu_version(block: str, tiny: Path, data: Path, runs: Path) -> str:
    """The README's commands with the paths swapped and the CI sizes appended (module docstring)."""
    swaps = {"/models/Qwen2.5-VL-7B-Instruct": str(tiny), "/data/Video-R1-COT-165k.json": str(data / "sft.json"),
             "/data/Video-R1-260k.json": str(data / "rl.json"), "/data/Video-R1-data": str(data),
             "/data/Evaluation": str(data), "runs/": f"{runs}/", "--nproc_per_node=8": "--nproc_per_node=2"}
    for old, new in swaps.items():
        assert old in block, old
        block = block.replace(old, new)
    sizes = {"-m vr1fast.train": "--train.max_steps=1 --rollout.max_new_tokens=8",
             "-m vr1fast.eval": "--eval.max_new_tokens=8"}
    commands = re.split(r"(?<!\\)\n", block)  # one element per logical line (continuations kept)
    for i, command in enumerate(commands):
        for module, extra in sizes.items():
            if module in command:
                commands[i] = f"{command} {extra}"
    return "set -euo pipefail\n" + "\n".join(commands)


@pytest.mark.slow
def test_readme_pipeline_runs_on_cpu(tmp_path):
    data = generate_synthetic(tmp_path / "data", n=8, seed=0).root
    for name in BENCHMARKS:  # Video-R1's eval schema is its RL schema: the synthetic records stand in for each
        shutil.copy(data / "rl.json", data / f"eval_{name}.json")
    script = cpu_version(pipeline_block(), save_tiny(tmp_path / "tiny"), data, tmp_path / "runs")
    bin_dir = Path(sys.executable).parent
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", OMP_NUM_THREADS="1",
               DS_ACCELERATOR="cpu")
    proc = subprocess.run(["bash", "-c", script], cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, (proc.stdout[-3000:] + proc.stderr[-3000:])
    runs = tmp_path / "runs"
    sft = sorted((runs / "sft_7b" / "checkpoints").glob("step_*"))
    rl = sorted((runs / "videor1_7b" / "checkpoints").glob("step_*"))
    assert sft and (sft[-1] / "COMPLETE").is_file() and [p.name for p in rl] == ["step_000001"]
    rl_config = (runs / "videor1_7b" / "config.yaml").read_text()
    assert f"{sft[-1]}/model" in rl_config  # step 2 started from step 1's checkpoint
    records = json.loads((data / "rl.json").read_text())
    for name in BENCHMARKS:
        summary = json.loads((runs / "eval_7b" / f"{name}.summary.json").read_text())
        rows = (runs / "eval_7b" / f"{name}.jsonl").read_text().splitlines()
        assert len(rows) == len(records), name
        videos = sum(r["data_type"] == "video" for r in records)
        assert summary["scored"] == len(records) and summary["broken"] == 0, summary
        assert summary["video_items"] == videos and summary["gap"] is not None, summary  # --eval.shuffled=true
    assert "vsibench" in proc.stdout and "tempcompass" in proc.stdout  # the final table
