"""LoRA through peft (``model.lora``, ``vr1fast.model.lora``) on the tiny model in one process, through the real loop.

A 2-step run (lr 1e-2, weight decay 0.5, β 0.04) trains adapters of rank 4 (lora_B drawn at random first): only
adapter weights move, the LM head gets no gradient, the reference (the policy with adapters disabled, no second
model) gives a fresh base model's logits bit for bit while the adapted policy's differ. The checkpoint holds adapters only and ``PeftModel.from_pretrained`` loads them; a resumed run ends with the
same adapters and metrics as an uninterrupted one; the merged export loads with transformers and gives the adapted
model's logits; the paged engine samples from the adapted model (its log-probs equal the policy's).
"""
import pytest
import torch

from _lora_worker import IDS, perturbed_models
from runs import comparable, small
from vr1fast.cli import parse as parse_args
from vr1fast.config import LoraConfig
from vr1fast.errors import ConfigError
from vr1fast.metrics import read_jsonl
from vr1fast.model.load import save_tiny, tiny_model
from vr1fast.train import build, close, train

peft = pytest.importorskip("peft")
from vr1fast.model import lora  # noqa: E402  (needs peft)

LORA = ("--model.lora.enabled=true", "--model.lora.rank=4", "--loss.beta=0.04", "--optim.lr=1e-2",
        "--metrics.tensorboard=false", "--metrics.plot=false", "--optim.warmup_steps=0")


def _logits(model, ids):
    return model(input_ids=ids).logits


def _run(synthetic, out, *extra, resume=False):
    """Train (adapters from ``perturbed_models`` unless resuming); returns (the policy model after close, the
    reference's and the policy's eval logits on IDS)."""
    cfg = parse_args(small(synthetic, out, *LORA, *extra))
    run, state = build(cfg, None if resume else perturbed_models(cfg))
    try:
        train(run, state)
        run.policy.model.eval()
        with torch.no_grad():
            ref, policy = run.ref.runner(_logits, IDS), run.policy.runner(_logits, IDS)
            again = run.policy.runner(_logits, IDS)
        assert torch.equal(policy, again)  # adapters enabled again after the reference's forward
        assert run.policy.model.lm_head.weight.grad is None  # frozen head: no dW
        assert run.ref.model is run.policy.model  # no second copy of the weights
    finally:
        close(run)
    return run.policy.model, ref, policy


@pytest.fixture(scope="module")
def trained(synthetic, tmp_path_factory):
    out = tmp_path_factory.mktemp("lora") / "run"
    model, ref, policy = _run(synthetic, out, "--train.max_steps=2", "--train.save_every=1")
    return out, model, ref, policy


def test_only_adapters_train_and_the_reference_is_the_base(trained):
    out, model, ref, policy = trained
    base = tiny_model(0)[0].eval()
    final, initial = model.state_dict(), base.state_dict()
    moved = {k for k, v in final.items() if "lora_" not in k and not torch.equal(v, initial[k.replace(
        ".base_layer", "")])}
    assert moved == set()
    start = perturbed_models(parse_args(["--model.lora.enabled=true", "--model.lora.rank=4"]))[0].state_dict()
    assert min((final[k] - start[k]).abs().max().item() for k in final if "lora_" in k) > 1e-4  # all trained
    with torch.no_grad():
        assert torch.equal(ref, base(input_ids=IDS).logits)
    assert (policy - ref).abs().max().item() > 1e-4
    assert all(r["kl"] > 0 for r in read_jsonl(out / "metrics.jsonl"))


def test_checkpoint_holds_adapters_that_peft_loads(trained):
    out, _, _, policy = trained
    folder = out / "checkpoints" / "step_000002" / "model"
    assert {p.name for p in folder.iterdir()} >= {"adapter_config.json", "adapter_model.safetensors",
                                                 "tokenizer.json"}
    assert not (folder / "model.safetensors").exists()
    loaded = peft.PeftModel.from_pretrained(tiny_model(0)[0], folder).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=IDS).logits, policy, rtol=0, atol=1e-6)


def test_resume_is_exact(trained, synthetic, tmp_path):
    out, model, _, _ = trained
    resumed_out = tmp_path / "resumed"
    resumed, _, _ = _run(synthetic, resumed_out, "--train.max_steps=2", "--train.save_every=1",
                         f"--train.resume={out / 'checkpoints' / 'step_000001'}", resume=True)
    assert comparable(read_jsonl(resumed_out / "metrics.jsonl")) == comparable(read_jsonl(out / "metrics.jsonl"))[1:]
    a, b = model.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_merged_export_loads_with_transformers(trained, tmp_path, capsys):
    from transformers import Qwen2_5_VLForConditionalGeneration
    out, _, _, policy = trained
    folder = out / "checkpoints" / "step_000002" / "model"
    base = save_tiny(tmp_path / "base", seed=0)
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:  # the tiny run has no base folder to name
        lora.main(["--export", str(folder), "--out", str(tmp_path / "merged")])
    err = capsys.readouterr().err
    assert e.value.code == 1 and err.count("\n") == 1 and "--base" in err, err
    lora.main(["--export", str(folder), "--out", str(tmp_path / "merged"), "--base", str(base)])
    merged = Qwen2_5_VLForConditionalGeneration.from_pretrained(tmp_path / "merged").eval()
    assert not any("lora" in k for k in merged.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=IDS).logits, policy, rtol=0, atol=1e-5)
    assert (tmp_path / "merged" / "tokenizer.json").is_file()


def test_paged_engine_samples_from_the_adapted_model(synthetic, tmp_path):
    """Dropout 0: the training forward then computes as the engine (which samples in eval mode) does."""
    _run(synthetic, tmp_path / "run", "--train.max_steps=2", "--train.save_every=2", "--rollout.engine=paged",
         "--model.lora.dropout=0")
    rows = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert all(r["kl"] > 0 and r["rollout/logprob_diff_max"] < 1e-4 for r in rows)


def test_adapters_go_to_decoder_targets_only():
    model = lora.apply_lora(tiny_model(0)[0], LoraConfig(enabled=True, rank=4))
    adapted = {n.removesuffix(".lora_A") for n, _ in model.named_modules() if n.endswith(".lora_A")}
    assert len(adapted) == 2 * 7 and all(n.startswith("model.language_model.layers.") for n in adapted)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == \
        {n for n, _ in model.named_parameters() if ".lora_" in n}
    vision = lora.apply_lora(tiny_model(0)[0], LoraConfig(enabled=True, rank=4, vision="lora",
                                                          target_modules=("q_proj", "v_proj")))
    adapted = {n.removesuffix(".lora_A") for n, _ in vision.named_modules() if n.endswith(".lora_A")}
    assert {n.rpartition(".")[2] for n in adapted if n.startswith("model.visual.blocks.")} == \
        {"qkv", "proj", "gate_proj", "up_proj", "down_proj"}
    assert {n.rpartition(".")[2] for n in adapted if n.startswith("model.language_model.")} == {"q_proj", "v_proj"}
    assert not any("merger" in n for n in adapted)


def test_a_target_that_matches_nothing_is_one_line_naming_it():
    with pytest.raises(ConfigError, match="'qkv'") as e:
        lora.apply_lora(tiny_model(0)[0], LoraConfig(enabled=True, target_modules=("q_proj", "qkv")))
    assert "\n" not in str(e.value)


def test_vision_lora_with_a_frozen_vision_tower_is_a_config_error():
    with pytest.raises(ConfigError, match="model.lora.vision=lora"):
        parse_args(["--model.lora.enabled=true", "--model.lora.vision=lora", "--model.freeze_vision=true"])
