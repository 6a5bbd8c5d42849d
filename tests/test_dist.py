"""Two-process torchrun (gloo, CPU) runs of the real loop under DDP, FSDP2 and DeepSpeed ZeRO-2 / ZeRO-3.

Each run trains the tiny model for 2 steps (gradient accumulation where the strategy has its own path for it),
then every rank gathers the full weights and hashes them: the ranks must hold the same weights, those weights
must have moved from the initial model (lr·weight decay = 0.5 % a step, over half a bf16 ulp), and the HF
checkpoint rank 0 wrote must hash to the same value. Under DDP and FSDP2 rank 1 builds its models on the meta device
(rank-0 loading, ``dist.rank0``) and every rank starts from exactly the weights it would have built itself.
The runs use the bf16 precision plan (``--train.bf16=true``: the GPU plan, under CPU autocast for DDP), where the
reference computes exactly as the policy at step 1: the first step's KL is exactly 0, the second's (moved
weights) is not (``precision.precision_plan``).
Under FSDP2 and ZeRO-3 a rollout gathers the weights once per generate: the all-gathers a rank issues for a
4-token generate equal those for a 1-token one (per-layer gathering would add some for every decode step).
DeepSpeed JIT-builds its shm op once per machine (about 65 s, cached in the torch_extensions dir).
"""
import hashlib
import json
import math
from pathlib import Path

import pytest

from runs import two_ranks
from vr1fast.metrics import read_jsonl
from vr1fast.model.load import load_model, save_tiny

REPO = Path(__file__).resolve().parents[1]
STRATEGIES = {
    "ddp": ["--dist.strategy=ddp", "--train.prompts_per_rank=2", "--train.grad_accum=2"],
    "fsdp2": ["--dist.strategy=fsdp2", "--train.prompts_per_rank=2", "--train.grad_accum=2"],
    "zero2": ["--dist.strategy=deepspeed", f"--dist.deepspeed_config={REPO / 'configs' / 'zero2.json'}",
              "--train.prompts_per_rank=1", "--train.grad_accum=2"],
    "zero3": ["--dist.strategy=deepspeed", f"--dist.deepspeed_config={REPO / 'configs' / 'zero3.json'}",
              "--train.prompts_per_rank=1"],
}
# A real user's path: the policy and the reference loaded from a checkpoint folder, partitioned at load (zero.Init).
STRATEGIES["zero3_folder"] = STRATEGIES["zero3"]
# The paged rollout engine inside the one gather per rollout of the sharded strategies.
STRATEGIES["fsdp2_paged"] = [*STRATEGIES["fsdp2"], "--rollout.engine=paged"]
STRATEGIES["zero3_paged"] = [*STRATEGIES["zero3"], "--rollout.engine=paged"]


def _hf_digest(model_dir: Path) -> str:
    from transformers import Qwen2_5_VLForConditionalGeneration
    state = Qwen2_5_VLForConditionalGeneration.from_pretrained(model_dir).state_dict()
    digest = hashlib.sha256()
    for name in sorted(state):
        digest.update(name.encode() + state[name].float().numpy().tobytes())
    return digest.hexdigest()


@pytest.mark.slow
@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_two_ranks_agree(strategy, synthetic, tmp_path):
    out = tmp_path / "run"
    argv = [f"--data.synthetic_dir={synthetic}", "--data.synthetic_size=8", f"--train.output_dir={out}",
            "--train.max_steps=2", "--train.save_every=2", "--rollout.num_generations=2",
            "--rollout.num_shuffled=2", "--rollout.max_new_tokens=6", "--metrics.progress_bar=false",
            "--optim.lr=1e-2", "--optim.weight_decay=0.5", "--optim.warmup_steps=0", "--model.warmstart_steps=0",
            "--train.bf16=true", "--metrics.samples_every=2", *STRATEGIES[strategy]]
    if strategy == "zero3_folder":
        argv.append(f"--model.path={save_tiny(tmp_path / 'tiny_checkpoint')}")  # the worker's initial weights
    two_ranks(str(REPO / "tests" / "_dist_worker.py"), str(tmp_path / "ranks.json"), *argv)
    report = json.loads((tmp_path / "ranks.json").read_text())
    assert report["world_size"] == 2
    assert report["strategy"] == ("deepspeed" if strategy.startswith("zero") else strategy.removesuffix("_paged"))
    (a, b) = report["ranks"]
    assert (a["rank"], b["rank"]) == (0, 1)
    assert a["digest"] == b["digest"]
    rank0_loading = strategy.removesuffix("_paged") in ("ddp", "fsdp2")  # ranks > 0 build on meta, rank 0 loads
    assert (a["meta"], b["meta"]) == ((False, True) if rank0_loading else (None, None))
    assert a["starts_from_initial"] and b["starts_from_initial"]
    assert 1e-5 < a["moved"] < 1.0
    rows = read_jsonl(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2]
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["kl"]) for r in rows)
    assert rows[0]["kl"] == 0.0 < rows[1]["kl"]
    paged = strategy.endswith("_paged")  # the engine's sampling log-probs are checked against the policy's
    assert all(("rollout/logprob_diff_mean" in r) == paged for r in rows)
    assert all(0 <= r["rollout/logprob_diff_mean"] <= r["rollout/logprob_diff_max"] < 1.0 for r in rows if paged)
    assert {r["rank"] for r in read_jsonl(out / "samples.jsonl")} == {0, 1}  # every rank's completions, on rank 0
    for rank in (a, b):
        gathers = {int(k): v for k, v in rank["gathers"].items()}
        assert gathers[4] == gathers[1], gathers
        assert (gathers[1] > 0) == (strategy.removesuffix("_paged") in ("fsdp2", "zero3", "zero3_folder")), gathers
    assert _hf_digest(out / "checkpoints" / "step_000002" / "model") == a["digest"]


def test_meta_build_from_a_folder_reads_no_weights(tmp_path):
    """Rank-0 loading's other ranks: ``load_model(path, device="meta")`` gives the folder's architecture, dtype and
    generation config with every tensor on the meta device (the weights file is never opened: it is gone here)."""
    folder = save_tiny(tmp_path / "tiny")
    full = load_model(folder, dtype="float32", attn_implementation="sdpa")[0]
    (folder / "model.safetensors").unlink()
    meta = load_model(folder, dtype="float32", attn_implementation="sdpa", device="meta")[0]
    assert all(t.is_meta for t in (*meta.parameters(), *meta.buffers()))
    assert {k: (v.shape, v.dtype) for k, v in meta.state_dict().items()} == \
        {k: (v.shape, v.dtype) for k, v in full.state_dict().items()}
    assert meta.generation_config.to_dict() == full.generation_config.to_dict()
