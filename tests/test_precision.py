"""The precision plan (``precision.precision_plan``): its table, the DeepSpeed bf16 block it sets, and the first step's
KL exactly 0 under the bf16 plan.

Video-R1's policy and reference are both DeepSpeed bf16 modules, so at step 1 their log-probs are identical and
the k3 KL is exactly 0. The plan depends on the strategy and ``train.bf16`` only, so the GPU plan runs here under
CPU bf16 autocast (``--train.bf16=true``). This file runs the single-process strategy ``none``; the 2-rank runs of
``test_dist.py`` assert the same for DDP, FSDP2 and DeepSpeed ZeRO-2 / ZeRO-3.
"""
import pytest
import torch

from vr1fast.cli import parse as parse_args
from vr1fast.config import DistConfig
from vr1fast.data.synthetic import generate_synthetic
from vr1fast.dist.deepspeed import deepspeed_config
from vr1fast.errors import ConfigError
from vr1fast.model.load import tiny_model
from vr1fast.precision import precision_plan
from vr1fast.train import build, close, train_step

BF16, FP32 = torch.bfloat16, torch.float32
# strategy, bf16 → (master, autocast, FSDP2 param dtype, DeepSpeed bf16)
TABLE = {
    ("none", True): (FP32, BF16, None, False),
    ("ddp", True): (FP32, BF16, None, False),
    ("fsdp2", True): (FP32, None, BF16, False),
    ("deepspeed", True): (FP32, None, None, True),
    **{(s, False): (FP32, None, None, False) for s in ("none", "ddp", "fsdp2", "deepspeed")},
}


@pytest.mark.parametrize("strategy, bf16", list(TABLE))
def test_plan_table(strategy, bf16):
    plan = precision_plan(strategy, bf16)
    assert (plan.master, plan.autocast, plan.fsdp_param, plan.deepspeed_bf16) == TABLE[strategy, bf16]


def test_describe_names_what_was_built():
    assert precision_plan("ddp", True).describe() == "policy and reference built in float32, bfloat16 autocast"
    assert precision_plan("none", False).describe("model") == "model built in float32, no mixed precision"


def test_plan_names_an_unknown_strategy():
    with pytest.raises(ConfigError, match="'auto'"):
        precision_plan("auto", True)


def _ds(precision, path=None) -> dict:
    return deepspeed_config(DistConfig(strategy="deepspeed", deepspeed_config=path), hidden_size=64,
                            prompts_per_rank=1, grad_accum=1, world_size=2, max_grad_norm=5.0, precision=precision,
                            optim=dict(lr=1e-6, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01))


@pytest.mark.parametrize("bf16", [True, False])
def test_deepspeed_bf16_block_is_the_plans(bf16):
    ds = _ds(precision_plan("deepspeed", bf16))
    assert (ds["bf16"]["enabled"], ds["fp16"]["enabled"]) == (bf16, False)


def test_deepspeed_json_disagreeing_with_the_plan_is_an_error(tmp_path):
    path = tmp_path / "zero2.json"
    path.write_text('{"bf16": {"enabled": true}, "zero_optimization": {"stage": 2}}')
    assert _ds(precision_plan("deepspeed", True), str(path))["bf16"]["enabled"] is True
    with pytest.raises(ConfigError, match="bf16.enabled=True") as e:
        _ds(precision_plan("deepspeed", False), str(path))
    assert "\n" not in str(e.value)


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    out = tmp_path_factory.mktemp("synthetic")
    generate_synthetic(out, n=4, seed=0)
    return out


def _first_step_kl(synthetic, out, models=None) -> float:
    cfg = parse_args([f"--data.synthetic_dir={synthetic}", "--data.synthetic_size=4", f"--train.output_dir={out}",
                      "--train.bf16=true", "--train.prompts_per_rank=1",
                      "--rollout.num_generations=2", "--rollout.num_shuffled=2", "--rollout.max_new_tokens=6",
                      "--metrics.progress_bar=false", "--metrics.tensorboard=false", "--metrics.plot=false",
                      "--model.warmstart_steps=0"])
    run, state = build(cfg, models)
    try:
        assert run.policy.precision.autocast is BF16 and run.ref.precision is run.policy.precision
        return train_step(run, state)["kl"]
    finally:
        close(run)


def test_first_step_kl_is_exactly_zero_under_the_bf16_plan(synthetic, tmp_path):
    assert _first_step_kl(synthetic, tmp_path) == 0.0


def test_a_bf16_reference_under_the_same_autocast_is_not_zero(synthetic, tmp_path):
    """Why the plan keeps the none / DDP reference in fp32: a bf16 copy of the same weights computes otherwise
    under autocast (RMSNorm weights and the residual stream in bf16), so the check above can fail."""
    policy, tokenizer = tiny_model(0)
    reference = tiny_model(0, dtype=BF16, tokenizer=tokenizer)[0]
    assert _first_step_kl(synthetic, tmp_path, (policy, reference, tokenizer)) > 0
