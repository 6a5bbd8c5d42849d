import subprocess
import sys

import pytest
from tokenizers import Tokenizer, models
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from media import conversation
from vr1fast.model.tokenizer import (EXTRA_ADDED_TOKENS, MODEL_VOCAB_SIZE, SPECIAL_TOKENS, TEXT_VOCAB_SIZE,
                                     build_tiny_tokenizer, token_ids)

QUESTION = "What happens first?Options:\nA. red\nB. blue\n"


@pytest.fixture(scope="module")
def tok():
    return build_tiny_tokenizer()


def test_video_turn_renders_qwen_format(tok):
    messages = conversation(QUESTION, "video")
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
                    "<|im_start|>user\n<|vision_start|><|video_pad|><|vision_end|>"
                    "What happens first?Options:\nA. red\nB. blue\n<|im_end|>\n"
                    "<|im_start|>assistant\n")


def test_system_image_multiturn_and_vision_ids(tok):
    messages = [
        {"role": "system", "content": "You are a helpful assistant"},
        {"role": "user", "content": [{"type": "image", "image": "x.png"}, {"type": "text", "text": "Count."},
                                     {"video": "v.mp4"}]},
        {"role": "assistant", "content": "<think>ok</think><answer>3</answer>"},
    ]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=False, add_vision_id=True)
    assert text == ("<|im_start|>system\nYou are a helpful assistant<|im_end|>\n"
                    "<|im_start|>user\nPicture 1: <|vision_start|><|image_pad|><|vision_end|>Count."
                    "Video 1: <|vision_start|><|video_pad|><|vision_end|><|im_end|>\n"
                    "<|im_start|>assistant\n<think>ok</think><answer>3</answer><|im_end|>\n")


def test_added_tokens_follow_text_vocab_in_qwen_order(tok):
    names = SPECIAL_TOKENS + EXTRA_ADDED_TOKENS
    assert len(names) == 22
    assert tok.convert_tokens_to_ids(list(names)) == list(range(TEXT_VOCAB_SIZE, TEXT_VOCAB_SIZE + 22))
    assert len(tok) == TEXT_VOCAB_SIZE + 22 <= MODEL_VOCAB_SIZE
    ids = token_ids(tok)
    base = TEXT_VOCAB_SIZE  # Qwen2.5: <|endoftext|> 151643, <|im_start|> +1, <|im_end|> +2, vision +9..+13
    assert (ids.pad, ids.im_start, ids.eos) == (base, base + 1, base + 2)
    assert (ids.vision_start, ids.vision_end, ids.vision_pad, ids.image, ids.video) == tuple(range(base + 9, base + 14))
    assert tok.eos_token_id == ids.eos and tok.pad_token_id == ids.pad
    assert ids.config_kwargs()["video_token_id"] == ids.video
    assert ids.text_config_kwargs() == dict(bos_token_id=base, eos_token_id=base + 2, pad_token_id=base)


def test_special_tokens_are_atomic_and_digits_split(tok):
    ids = tok("<|vision_start|><|video_pad|><|video_pad|><|vision_end|>", add_special_tokens=False)["input_ids"]
    assert ids == [TEXT_VOCAB_SIZE + 9, TEXT_VOCAB_SIZE + 13, TEXT_VOCAB_SIZE + 13, TEXT_VOCAB_SIZE + 10]
    pieces = tok.convert_ids_to_tokens(tok("3.14", add_special_tokens=False)["input_ids"])
    assert pieces == ["3", ".", "1", "4"]


def test_roundtrip_and_compact_prompt_words(tok):
    text = "<think>\nHmm, let me think. The red ball moves left.\n</think>\n<answer>B</answer> 42 ünïcode ✓"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text
    # trained on the templates: common prompt words are single tokens, not bytes
    assert len(tok(" Please provide your text answer", add_special_tokens=False)["input_ids"]) <= 6


def test_deterministic_across_builds_and_processes(tok):
    sample = "What happens first? <answer>C</answer> counterclockwise 1234"
    again = build_tiny_tokenizer()
    assert again.backend_tokenizer.to_str() == tok.backend_tokenizer.to_str()
    code = ("from vr1fast.model.tokenizer import build_tiny_tokenizer as b;"
            f"print(b()({sample!r}, add_special_tokens=False)['input_ids'])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == str(tok(sample, add_special_tokens=False)["input_ids"])


def test_save_and_load_roundtrip(tok, tmp_path):
    tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    messages = conversation(QUESTION, "video")
    render = dict(tokenize=False, add_generation_prompt=True)
    assert loaded.apply_chat_template(messages, **render) == tok.apply_chat_template(messages, **render)
    text = tok.apply_chat_template(messages, **render)
    assert loaded(text, add_special_tokens=False)["input_ids"] == tok(text, add_special_tokens=False)["input_ids"]
    assert token_ids(loaded) == token_ids(tok)
    assert (loaded.eos_token, loaded.pad_token) == ("<|im_end|>", "<|endoftext|>")


def test_token_ids_names_missing_token():
    bare = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.BPE()))
    with pytest.raises(ValueError, match=r"<\|endoftext\|>"):
        token_ids(bare)
