"""The demo's teacher-forced warm start on real synthetic videos and images with the real tiny model."""
import json
import math
import re
import shutil
import time
from pathlib import Path

import pytest
import torch

from vr1fast.cli import parse as parse_args
from vr1fast.config import VideoConfig, demo
from vr1fast.data.dataset import load_records
from vr1fast.data.prompts import build_sft_messages, sft_target
from vr1fast.data.synthetic import generate_synthetic
from vr1fast.errors import ConfigError
from vr1fast.model.load import load_weights, tiny_model
from vr1fast.model.tokenizer import MODEL_VOCAB_SIZE
from vr1fast.warmstart import (assistant_loss, cache_key, cached_warm_start, collate_sft,
                               sft_examples, warm_start)

VIDEO = demo().video
KINDS = ("direction", "ocr", "count_image")  # two videos and an image, targets of different lengths


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synthetic")
    generate_synthetic(out, n=8, seed=0)
    return out


@pytest.fixture(scope="module")
def subset(synthetic, tmp_path_factory) -> Path:
    """sft.json with three records of ``KINDS`` and their media, in a folder of its own."""
    folder = tmp_path_factory.mktemp("subset")
    records = [r for r in json.loads((synthetic / "sft.json").read_text())
               if r["data_source"].split("/")[-1] in KINDS]
    for r in records:
        (folder / r["path"]).parent.mkdir(exist_ok=True)
        shutil.copy(synthetic / r["path"], folder / r["path"])
    (folder / "sft.json").write_text(json.dumps(records))
    return folder / "sft.json"


@pytest.fixture(scope="module")
def samples(subset):
    return list(load_records(subset, require_process=True))


def _weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_only_the_assistant_target_is_supervised(samples):
    _, tok = tiny_model(0)
    examples = sft_examples(tok, samples, VIDEO)
    inputs, labels = collate_sft(examples, tok.pad_token_id)
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    pad = re.compile(r"(<\|(?:video|image)_pad\|>)+")
    for b, sample in enumerate(samples):
        target = tok(sft_target(sample), add_special_tokens=False)["input_ids"]
        supervised = labels[b] != -100
        assert int(supervised.sum()) == len(target) + 1                       # + <|im_end|>
        assert labels[b, supervised].tolist() == target + [tok.convert_tokens_to_ids("<|im_end|>")]
        start = int(supervised.nonzero()[0])
        assert supervised[start:].all() and (labels[b, :start] == -100).all()  # prompt and padding excluded
        assert mask[b, :start].sum() > 0 and (mask[b, :ids.shape[1] - int(mask[b].sum())] == 0).all()
        # the row, media pads collapsed, is the chat template's rendering of the whole SFT conversation
        row = pad.sub(r"\1", tok.decode(ids[b, mask[b].bool()].tolist()))
        assert row + "\n" == tok.apply_chat_template(build_sft_messages(sample), tokenize=False)
    assert len(set(mask.sum(1).tolist())) == len(samples)  # rows of different lengths: left padding exercised


def test_loss_starts_near_uniform_and_falls(samples):
    model, tok = tiny_model(0)
    inputs, labels = collate_sft(sft_examples(tok, samples, VIDEO), tok.pad_token_id)
    with torch.no_grad():
        before = assistant_loss(model, inputs, labels).item()
    assert before == pytest.approx(math.log(MODEL_VOCAB_SIZE), abs=0.2)  # std-0.02 init: near-uniform logits
    stats = warm_start(model, tok, samples, VIDEO, steps=20, lr=1e-2, batch_size=3, seed=0)
    with torch.no_grad():
        after = assistant_loss(model, inputs, labels).item()
    assert after < 0.6 * before, (before, after)
    assert stats["loss_first"] > stats["loss_last"] and stats["steps"] == 20 and stats["examples"] == 3
    assert stats["supervised_tokens"] == 20 * int((labels != -100).sum())  # every step sees all three records


def test_same_seed_same_weights(samples):
    runs = []
    for seed in (0, 0, 1):
        model, tok = tiny_model(0)
        warm_start(model, tok, samples, VIDEO, steps=3, lr=3e-3, batch_size=2, seed=seed)
        runs.append(_weights(model))
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])
    assert any(not torch.equal(runs[0][k], runs[2][k]) for k in runs[0])  # another order of records


def test_cache_is_reused_and_keyed(subset):
    settings = dict(tiny_seed=0, steps=4, lr=3e-3, batch_size=2, seed=0)
    first = cached_warm_start(subset, VIDEO, **settings)
    started = time.perf_counter()
    again = cached_warm_start(subset, VIDEO, **settings)
    assert (first.reused, again.reused, again.path, again.stats) == (False, True, first.path, first.stats)
    assert time.perf_counter() - started < 1.0
    assert (first.path / "config.json").is_file() and first.path.parent == subset.parent
    model = load_weights(tiny_model(0)[0], first.path)
    initial = _weights(tiny_model(0)[0])
    assert max((v - initial[k]).abs().max().item() for k, v in _weights(model).items()) > 1e-3
    other = cached_warm_start(subset, VIDEO, **{**settings, "steps": 5})
    assert not other.reused and other.path != first.path and other.stats["steps"] == 5
    assert sorted(p.name for p in subset.parent.iterdir() if p.name.startswith((".", "warm"))) == sorted(
        [first.path.name, other.path.name])  # no temporary folders left behind
    keys = {cache_key(subset, v, **{**settings, "rope_positions": r, "lr": lr})
            for v, r, lr in ((VIDEO, "videor1", 3e-3), (VideoConfig(), "videor1", 3e-3),
                             (VIDEO, "transformers", 3e-3), (VIDEO, "videor1", 1e-3))}
    assert len(keys) == 4


def test_warm_start_needs_the_tiny_model():
    with pytest.raises(ConfigError, match="model.warmstart_steps"):
        parse_args(["--model.path=/some/checkpoint"])
    assert parse_args(["--model.path=/some/checkpoint", "--model.warmstart_steps=0"]).model.warmstart_steps == 0
    assert parse_args(["--preset=videor1", "--model.path=/some/checkpoint"]).model.warmstart_steps == 0
    with pytest.raises(ConfigError, match="model.warmstart_steps"):
        parse_args(["--model.warmstart_steps=-1"])


def test_train_starts_policy_and_reference_from_the_warm_start(synthetic, tmp_path):
    from vr1fast.train import build, close

    cfg = parse_args([f"--data.synthetic_dir={synthetic}", "--data.synthetic_size=8", "--model.warmstart_steps=2",
                      f"--train.output_dir={tmp_path / 'run'}", "--metrics.progress_bar=false"])
    run, _ = build(cfg)
    try:
        policy, ref = _weights(run.policy.model), _weights(run.ref.model)
    finally:
        close(run)
    (warm,) = synthetic.glob("warm_*")
    saved = _weights(load_weights(tiny_model(0)[0], warm))
    initial = _weights(tiny_model(0)[0])
    assert all(torch.equal(policy[k], saved[k]) and torch.equal(ref[k], saved[k]) for k in saved)
    assert any(not torch.equal(saved[k], initial[k]) for k in saved)
