"""LoRA under two-process torchrun (gloo, CPU): DDP, FSDP2 (with the paged engine) and ZeRO-3 (ZeRO-2 passes the
same test: add ``"zero2"`` with configs/zero2.json; left out to keep CI under its time budget, ~35 s a run).

Each run (``tests/_lora_worker.py``) trains rank-4 adapters of the tiny model for 2 steps in fp32 with β = 0.04,
lora_B drawn at random first. Both ranks must hold the same adapters, every adapter tensor must have moved and no
base weight; the reference (the policy with adapters disabled, run through the strategy's forward) must give a
fresh base model's logits; the checkpoint's ``adapter_model.safetensors`` must hold the ranks' adapters exactly.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vr1fast.metrics import read_jsonl

pytest.importorskip("peft")

REPO = Path(__file__).resolve().parents[1]
STRATEGIES = {
    "ddp": ["--dist.strategy=ddp", "--train.grad_accum=2"],
    "fsdp2_paged": ["--dist.strategy=fsdp2", "--train.grad_accum=2", "--rollout.engine=paged"],
    "zero3": ["--dist.strategy=deepspeed", f"--dist.deepspeed_config={REPO / 'configs' / 'zero3.json'}"],
}


@pytest.mark.slow
@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_lora_ranks_agree(strategy, synthetic, tmp_path):
    from safetensors.torch import load_file
    out = tmp_path / "run"
    argv = [f"--data.synthetic_dir={synthetic}", "--data.synthetic_size=8", f"--train.output_dir={out}",
            "--train.max_steps=2", "--train.save_every=2", "--train.prompts_per_rank=1",
            "--rollout.num_generations=2", "--rollout.num_shuffled=2", "--rollout.max_new_tokens=6",
            "--metrics.progress_bar=false", "--metrics.tensorboard=false", "--metrics.plot=false",
            "--optim.lr=1e-2", "--optim.weight_decay=0.5", "--optim.warmup_steps=0", "--model.warmstart_steps=0",
            "--train.bf16=false", "--loss.beta=0.04", "--model.lora.enabled=true", "--model.lora.rank=4",
            *STRATEGIES[strategy]]
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu")
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         str(REPO / "tests" / "_lora_worker.py"), str(tmp_path / "ranks.json"), *argv],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=420)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    report = json.loads((tmp_path / "ranks.json").read_text())
    assert report["world_size"] == 2
    (a, b) = report["ranks"]
    assert (a["rank"], b["rank"]) == (0, 1) and a["digest"] == b["digest"]
    for rank in (a, b):
        assert rank["base_moved"] == 0.0 and rank["adapter_moved"] > 1e-5
        assert rank["ref_vs_base"] <= 1e-5, rank
    assert all(r["kl"] > 0 for r in read_jsonl(out / "metrics.jsonl"))
    saved = load_file(out / "checkpoints" / "step_000002" / "model" / "adapter_model.safetensors")
    gathered = torch.load(str(tmp_path / "ranks.json") + ".adapters.pt")
    assert saved.keys() == gathered.keys()
    assert all(torch.equal(saved[k].float(), gathered[k]) for k in saved)
