"""Model loading: the tiny Qwen2.5-VL factory, save/load round trip, build_model switches, frozen reference."""
import json

import pytest
import torch

from media import conversation
from vr1fast.config import ModelConfig
from vr1fast.errors import ConfigError
from vr1fast.model.load import (build_model, checkpoint_config, is_checkpointing, load_model, reference_model,
                                resolve_attn, resolve_dtype, save_tiny, tiny_config, tiny_model)
from vr1fast.model.tokenizer import build_tiny_tokenizer


@pytest.fixture(scope="module")
def tiny():
    return tiny_model(0)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("tiny"), seed=0)


def test_tiny_architecture(tiny):
    model, tok = tiny
    cfg = model.config
    text, vision = cfg.text_config, cfg.vision_config
    n_params = sum(p.numel() for p in model.parameters())
    assert 2e5 <= n_params <= 5e6
    assert text.hidden_size == vision.out_hidden_size == 64 and text.num_hidden_layers == 2 and vision.depth == 2
    head_dim = text.hidden_size // text.num_attention_heads
    assert sum(text.rope_parameters["mrope_section"]) * 2 == head_dim
    assert model.lm_head.weight.data_ptr() != model.model.language_model.embed_tokens.weight.data_ptr()
    assert not cfg.tie_word_embeddings
    assert len(tok) <= text.vocab_size and text.vocab_size % 64 == 0
    ids = {name: tok.convert_tokens_to_ids(token) for name, token in [
        ("image", "<|image_pad|>"), ("video", "<|video_pad|>"), ("vs", "<|vision_start|>"),
        ("ve", "<|vision_end|>"), ("eos", "<|im_end|>"), ("pad", "<|endoftext|>")]}
    assert (cfg.image_token_id, cfg.video_token_id, cfg.vision_start_token_id, cfg.vision_end_token_id) == (
        ids["image"], ids["video"], ids["vs"], ids["ve"])
    assert text.eos_token_id == ids["eos"] and text.pad_token_id == ids["pad"]
    assert model.generation_config.eos_token_id == [ids["eos"], ids["pad"]]
    assert model.config._attn_implementation == "sdpa" and model.dtype == torch.float32


def test_tiny_seeded_and_leaves_global_rng(tiny):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    again, _ = tiny_model(0)
    after = torch.rand(3)
    other, _ = tiny_model(1)
    assert torch.equal(after, expected)
    a, b, c = tiny[0].state_dict(), again.state_dict(), other.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["lm_head.weight"], c["lm_head.weight"])


def test_init_std():
    model, _ = tiny_model(0, init_std=0.1)
    std = model.model.language_model.layers[0].mlp.up_proj.weight.std().item()
    assert 0.09 < std < 0.11


def test_save_and_load_round_trip(tiny, saved):
    model, tok = tiny
    loaded, loaded_tok = load_model(saved)
    a, b = model.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    text = "What colour appears first? <answer>B</answer>"
    assert loaded_tok(text)["input_ids"] == tok(text)["input_ids"]
    messages = conversation("hi", "video")
    assert loaded_tok.apply_chat_template(messages, tokenize=False) == tok.apply_chat_template(messages, tokenize=False)
    assert loaded_tok.eos_token == "<|im_end|>" and loaded_tok.pad_token == "<|endoftext|>"
    assert loaded.generation_config.eos_token_id == model.generation_config.eos_token_id
    assert sum(f.stat().st_size for f in saved.iterdir()) < 4_000_000


def test_load_model_dtype(saved):
    model, _ = load_model(saved, dtype="bfloat16", attn_implementation="eager")
    assert model.dtype == torch.bfloat16 and model.config._attn_implementation == "eager"


def test_load_model_errors(tmp_path, saved):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nothing")):
        load_model(tmp_path / "nothing")
    with pytest.raises(FileNotFoundError, match="/path/to/model: no config.json"):
        checkpoint_config("/path/to/model")  # a placeholder path is never taken for a hub id
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ConfigError, match="gpt2"):  # a config error: vr1fast.train prints it as one line
        load_model(tmp_path)
    assert checkpoint_config(saved).text_config.hidden_size == 64


def test_resolve():
    assert resolve_dtype("auto", "cpu") == torch.float32 and resolve_dtype("auto", "cuda") == torch.bfloat16
    assert resolve_dtype("float16") == torch.float16 and resolve_dtype(torch.bfloat16) == torch.bfloat16
    assert resolve_attn("auto", "cpu") == "sdpa" and resolve_attn("eager", "cuda") == "eager"
    with pytest.raises(ValueError, match="floaty"):
        resolve_dtype("floaty")


def test_tiny_config_checks_vocab():
    tok = build_tiny_tokenizer()
    with pytest.raises(ValueError, match="vocab_size"):
        tiny_config(tok, vocab_size=len(tok) - 1)


def test_build_model_switches(saved):
    model, _ = build_model(ModelConfig(gradient_checkpointing=True, freeze_vision=True))
    assert is_checkpointing(model)
    assert not any(p.requires_grad for p in model.model.visual.parameters())
    assert all(p.requires_grad for p in model.model.language_model.parameters())
    plain, _ = build_model(ModelConfig(path=str(saved), gradient_checkpointing=False))
    assert not is_checkpointing(plain) and all(p.requires_grad for p in plain.parameters())


def test_reference_model(saved):
    policy, _ = build_model(ModelConfig(gradient_checkpointing=True))
    assert reference_model(policy, beta=0.0) is None
    ref = reference_model(policy, beta=0.04)
    assert not ref.training and not is_checkpointing(ref) and is_checkpointing(policy)
    assert not any(p.requires_grad for p in ref.parameters())
    before = ref.lm_head.weight.clone()
    with torch.no_grad():
        policy.lm_head.weight.add_(1.0)
    assert torch.equal(ref.lm_head.weight, before)  # an independent copy
    from_path = reference_model(saved, beta=0.04)
    assert not any(p.requires_grad for p in from_path.parameters()) and not from_path.training


def test_build_model_checkpoints_a_loaded_checkpoint(saved):
    """from_pretrained returns eval mode, where HF skips activation checkpointing: the policy built from a checkpoint
    folder must recompute each decoder layer in backward (its MLP runs twice per forward + backward)."""
    model, _ = build_model(ModelConfig(path=str(saved), gradient_checkpointing=True))
    calls, mlp = [], model.model.language_model.layers[0].mlp
    forward = mlp.forward
    mlp.forward = lambda *args, **kwargs: calls.append(1) or forward(*args, **kwargs)  # hooks skip the replay
    ids = torch.tensor([[5, 6, 7, 8]])
    model(input_ids=ids, attention_mask=torch.ones_like(ids), mm_token_type_ids=torch.zeros_like(ids),
          use_cache=False).logits.float().sum().backward()
    assert model.training and len(calls) == 2


def test_chat_template_from_processor_file(tmp_path):
    """A folder whose tokenizer files carry no template but whose processor file does (chat_template.json) loads,
    and the processor's template wins over the tokenizer's (Video-R1 renders with the processor)."""
    folder = save_tiny(tmp_path / "m")
    template = (folder / "chat_template.jinja").read_text()
    messages = conversation("hi", "video")
    expected = build_tiny_tokenizer().apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert expected.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n")
    (folder / "chat_template.jinja").unlink()
    (folder / "chat_template.json").write_text(json.dumps({"chat_template": template}))
    _, tok = load_model(folder)
    assert tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == expected
    (folder / "chat_template.jinja").write_text("WRONG")
    (folder / "chat_template.json").write_text(json.dumps({"chat_template": "P{{ messages[0]['role'] }}"}))
    assert load_model(folder)[1].apply_chat_template(messages, tokenize=False) == "Puser"
    (folder / "chat_template.jinja").unlink()
    (folder / "chat_template.json").unlink()
    with pytest.raises(ValueError, match=f"{folder}.*no chat template"):
        load_model(folder)
