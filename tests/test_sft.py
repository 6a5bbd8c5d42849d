"""vr1fast.sft on the tiny Qwen2.5-VL and the synthetic set's real videos and images: labels against the chat
template, the loss against HF's cross-entropy, batching = accumulation, exact resume, the CLI, two-rank runs."""
import json
import math
from pathlib import Path

import pytest
import torch
from transformers import Qwen2_5_VLForConditionalGeneration

from vr1fast import sft
from vr1fast.cli import parse as parse_args
from vr1fast.config import demo
from vr1fast.data.dataset import load_records
from vr1fast.data.processor import image_to_patches, video_to_patches
from vr1fast.data.prompts import build_sft_messages, sft_target
from vr1fast.data.video import load_media
from vr1fast.metrics import read_jsonl
from vr1fast.model.load import tiny_model
from vr1fast.model.tokenizer import MODEL_VOCAB_SIZE
from _sft_worker import digest
from runs import comparable, two_ranks

REPO = Path(__file__).resolve().parents[1]
KINDS = ("direction", "count_image", "ocr")  # a video, an image, a video: targets and prompts of different lengths


@pytest.fixture(scope="module")
def picked(synthetic):
    """(samples, media) of ``KINDS`` from the synthetic SFT file, media at the demo's frame size."""
    records = load_records(synthetic / "sft.json", require_process=True)
    samples = [next(r for r in records if r.path.split("_", 1)[1].startswith(k)) for k in KINDS]
    return samples, [load_media(s.path, s.data_type, demo().video) for s in samples]


def _args(synthetic: Path, out: Path, *extra: str) -> list[str]:
    return ["--preset=sft_demo", f"--data.synthetic_dir={synthetic}", "--data.synthetic_size=8",
            f"--train.output_dir={out}", "--metrics.progress_bar=false", "--metrics.tensorboard=false", *extra]


def _expected_row(tok, sample, frames) -> list[int]:
    """By hand: the chat template's text of the whole conversation, tokenised, each media pad repeated
    grid_t·grid_h·grid_w / 4 times."""
    grid = (video_to_patches(frames) if frames.dim() == 4 else image_to_patches(frames))[1]
    ids = tok(tok.apply_chat_template(build_sft_messages(sample), tokenize=False), add_special_tokens=False)
    pads = {tok.convert_tokens_to_ids(p) for p in ("<|video_pad|>", "<|image_pad|>")}
    return [x for t in ids["input_ids"] for x in ([t] * (int(grid.prod()) // 4) if t in pads else [t])]


def test_labels_against_the_chat_template(picked):
    _, tok = tiny_model(0)
    samples, media = picked
    ids_of = tok.convert_tokens_to_ids
    im_start, im_end, video_pad, image_pad = (ids_of(t) for t in ("<|im_start|>", "<|im_end|>", "<|video_pad|>",
                                                                 "<|image_pad|>"))
    newline = tok("\n", add_special_tokens=False)["input_ids"]
    inputs, completion = sft.sft_batch(tok, samples, media, labels="completion")
    _, videor1 = sft.sft_batch(tok, samples, media, labels="videor1")
    ids, mask = inputs["input_ids"], inputs["attention_mask"].bool()
    assert len(set(mask.sum(1).tolist())) == 3  # three lengths: left padding exercised
    for b, (sample, frames) in enumerate(zip(samples, media)):
        row = ids[b, mask[b]].tolist()
        assert row == _expected_row(tok, sample, frames)                       # Video-R1's input ids
        assert row[-2:] == [im_end, *newline] and len(newline) == 1            # the template ends "<|im_end|>\n"
        target = tok(sft_target(sample), add_special_tokens=False)["input_ids"] + [im_end]
        lab = completion[b, mask[b]].tolist()
        n = len(row)
        assert lab == [-100] * (n - len(target) - 1) + target + [-100]        # the target and <|im_end|> only
        assert (completion[b, ~mask[b]] == -100).all() and (videor1[b, ~mask[b]] == -100).all()
        full = videor1[b, mask[b]].tolist()
        # every token but the padding, the image pads and the row's first token (nothing before it predicts it)
        assert full == [-100] + [-100 if t == image_pad else t for t in row[1:]]
        assert row[0] == im_start and full[1] == row[1]                       # the system turn is in the loss
        assert full[-1] == newline[0] and full[-2] == im_end                 # the system turn and the last "\n" kept
        kind = video_pad if sample.data_type == "video" else image_pad
        assert row.count(kind) > 0 and (full.count(video_pad) == row.count(video_pad))
        assert full.count(-100) == 1 + row.count(image_pad)


def _hf_loss(model, inputs, labels) -> torch.Tensor:
    """Cross-entropy (float64) of a plain HF forward's full logits at the shifted labels; HF's own ``.loss`` of the
    same call (it upcasts the logits to float32 only) agrees to 1e-6."""
    out = model(**inputs, labels=labels, use_cache=False)
    ce = torch.nn.functional.cross_entropy(out.logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
    assert abs(ce.item() - out.loss.item()) < 1e-6
    return ce


def test_loss_equals_hf_cross_entropy_float64(picked):
    """In float64 the fused-head loss equals HF's causal-LM cross-entropy (logits over every position) on the same
    labels to 1e-10: ``token`` norm = HF's loss of the batch, ``example`` norm = the mean of HF's loss of each
    example alone; both label modes."""
    model, tok = tiny_model(0, init_std=0.2)
    model = model.double()
    samples, media = picked
    for labels_mode in ("completion", "videor1"):
        inputs, labels = sft.sft_batch(tok, samples, media, labels=labels_mode)
        inputs = {k: v.double() if v.is_floating_point() else v for k, v in inputs.items()}
        with torch.no_grad():
            for norm in ("token", "example"):
                (w,) = sft.token_weights([labels], norm)
                ours = sft.sft_loss(model, inputs, labels, w, demo().loss)
                if norm == "token":
                    hf = _hf_loss(model, inputs, labels)
                else:
                    singles = [sft.sft_batch(tok, [s], [m], labels=labels_mode) for s, m in zip(samples, media)]
                    hf = torch.stack([_hf_loss(model, {k: v.double() if v.is_floating_point() else v
                                                       for k, v in i.items()}, lab) for i, lab in singles]).mean()
                assert ours.dtype == torch.float64 and abs(ours.item() - hf.item()) < 1e-10, (labels_mode, norm)
                assert 0.5 < ours.item() / math.log(MODEL_VOCAB_SIZE) < 2  # a real loss, not a trivial one


def _weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _steps(cfg, steps: int):
    run, state = sft.build(cfg, local=True)
    rows = [sft.sft_step(run, state, timed=False) for _ in range(steps)]
    return rows, _weights(run.policy.model), state


@pytest.mark.parametrize("norm", ["example", "token"])
def test_a_batch_of_several_equals_batch_one_accumulation(synthetic, tmp_path, norm):
    """3 examples of different lengths in one micro-batch = 3 micro-batches of one (the same stream of examples):
    the same losses and, after 2 steps, weights within 1e-6 (fp32; only the padding differs). AdamW's eps = 1 makes
    its first steps ≈ lr · g, so the weights compare the gradients (with eps 1e-8 the step g / (|g| + eps) turns
    float32 noise in near-zero gradient entries into differences of 1e-2 · lr)."""
    base = _args(synthetic, tmp_path, "--optim.lr=1.0", "--optim.eps=1.0", f"--sft.loss_norm={norm}",
                 "--data.shuffle=false")
    batched = _steps(parse_args([*base, "--train.prompts_per_rank=3", "--train.grad_accum=1"]), 2)
    single = _steps(parse_args([*base, "--train.prompts_per_rank=1", "--train.grad_accum=3"]), 2)
    assert batched[2] == single[2]  # the same data position
    for a, b in zip(batched[0], single[0]):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6) and a["labelled_tokens"] == b["labelled_tokens"]
    assert max((batched[1][k] - single[1][k]).abs().max().item() for k in batched[1]) < 1e-6
    initial = _weights(tiny_model(0)[0])
    assert max((batched[1][k] - initial[k]).abs().max().item() for k in initial) > 1e-2  # the weights moved


def test_demo_cli_loss_falls_and_writes_metrics_plot_and_checkpoints(synthetic, tmp_path, capsys):
    out = tmp_path / "run"
    sft.main(_args(synthetic, out, "--train.max_steps=20", "--train.save_every=10", "--optim.lr=1e-2",
                   "--train.prompts_per_rank=3"))
    rows = read_jsonl(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, 21))
    assert rows[0]["loss"] == pytest.approx(math.log(MODEL_VOCAB_SIZE), abs=0.2)  # near-uniform at init
    assert sum(r["loss"] for r in rows[-3:]) / 3 < 0.75 * rows[0]["loss"]
    assert rows[0]["learning_rate"] == 1e-2 and rows[-1]["learning_rate"] == pytest.approx(1e-2 / 20)  # linear
    assert all(r["labelled_tokens"] > 0 and r["grad_norm"] > 0 for r in rows)
    for step in (10, 20):
        assert (out / "checkpoints" / f"step_{step:06d}" / "COMPLETE").is_file()
    assert (out / "metrics.png").is_file() and "done: 20 SFT steps" in capsys.readouterr().out


def test_resume_is_exact(synthetic, tmp_path):
    """4 steps straight = 2 steps, a checkpoint, a new build resumed from it, 2 more: the same losses
    and data positions at every step and bitwise the same weights (1 example × 2 accumulation steps a step)."""
    extra = ("--train.max_steps=4", "--train.save_every=2", "--train.prompts_per_rank=1", "--train.grad_accum=2")
    straight = parse_args(_args(synthetic, tmp_path / "straight", *extra))
    run, state = sft.build(straight)
    sft.train(run, state)
    sft.close(run)
    cut = parse_args(_args(synthetic, tmp_path / "cut", *extra))
    run, state = sft.build(cut)
    run.total_steps = 2  # stop after step 2 (its checkpoint is written), as a killed run would have
    sft.train(run, state)
    sft.close(run)
    run, state = sft.build(parse_args(_args(synthetic, tmp_path / "cut", *extra, "--train.resume=auto")))
    assert state.step == 2 and run.resumed_from.name == "step_000002"
    sft.train(run, state)
    sft.close(run)
    a, b = (read_jsonl(tmp_path / d / "metrics.jsonl") for d in ("straight", "cut"))
    assert comparable(a) == comparable(b) and [r["step"] for r in b] == [1, 2, 3, 4]
    ends = [json.loads((tmp_path / d / "checkpoints" / "step_000004" / "state.json").read_text())
            for d in ("straight", "cut")]
    assert ends[0]["data"] == ends[1]["data"] == {"epoch": 1, "index": 0}  # 8 examples of 8 records
    from vr1fast.model.load import load_weights
    wa, wb = (_weights(load_weights(tiny_model(0)[0], tmp_path / d / "checkpoints" / "step_000004" / "model"))
              for d in ("straight", "cut"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.parametrize("argv, message", [
    (["--sft.labels=all"], "sft.labels"),
    (["--sft.loss_norm=batch"], "sft.loss_norm"),
    (["--model.warmstart_steps=5"], "model.warmstart_steps=5"),
    (["--train.grad_accum=0"], "train.grad_accum"),
])
def test_bad_config_is_one_line_naming_the_field(synthetic, tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        sft.main(_args(synthetic, tmp_path, *argv))
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1 and message in err, err


def test_rl_records_without_process_name_the_field(synthetic, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        sft.main(_args(synthetic, tmp_path, f"--data.path={synthetic / 'rl.json'}"))
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 1 and len(err.splitlines()) == 1 and "'process'" in err, err


def test_help_lists_the_sft_keys(capsys):
    with pytest.raises(SystemExit) as exit_info:
        sft.main(["--help"])
    text = capsys.readouterr().out
    assert exit_info.value.code == 0 and "--sft.labels" in text and "--sft.loss_norm" in text


def test_videor1_sft_preset_has_video_r1_constants():
    cfg = parse_args(["--preset=videor1_sft"])
    o, t = cfg.optim, cfg.train
    assert (o.lr, o.scheduler, o.warmup_steps, o.weight_decay, o.max_grad_norm) == (1e-6, "linear", 0, 0.0, 5.0)
    assert (t.max_steps, t.prompts_per_rank, t.grad_accum, t.save_every) == (0, 1, 2, 1000)
    assert cfg.model.gradient_checkpointing and cfg.sft.labels == "completion" and cfg.dist.zero_stage == 2
    assert cfg.model.warmstart_steps == 0 and cfg.model.path is None and t.bf16 is None
    assert cfg.metrics.samples_every == 0  # no completions to log


STRATEGIES = {
    "ddp": ["--dist.strategy=ddp"],
    "fsdp2": ["--dist.strategy=fsdp2"],
    "zero2": ["--dist.strategy=deepspeed", f"--dist.deepspeed_config={REPO / 'configs' / 'zero2.json'}"],
}


@pytest.mark.slow
@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_two_ranks(strategy, synthetic, tmp_path):
    """Two processes (gloo, fp32), 1 example per rank × 2 accumulation steps, 2 steps: the ranks hold the same
    weights, rank 0's checkpoint holds them, and each step's loss (the mean of the ranks') equals one process
    running the same 4 examples a step as 2 × 2."""
    extra = ["--train.max_steps=2", "--train.save_every=2", "--train.bf16=false", "--optim.lr=1e-2",
             "--train.grad_accum=2"]
    argv = _args(synthetic, tmp_path / "run", *extra, "--train.prompts_per_rank=1", *STRATEGIES[strategy])
    two_ranks(str(REPO / "tests" / "_sft_worker.py"), str(tmp_path / "ranks.json"), *argv)
    report = json.loads((tmp_path / "ranks.json").read_text())
    assert report["strategy"] == ("deepspeed" if strategy == "zero2" else strategy)
    a, b = report["ranks"]
    saved = Qwen2_5_VLForConditionalGeneration.from_pretrained(Path(report["checkpoint"]) / "model").state_dict()
    assert a["digest"] == b["digest"] == digest(saved)
    rows = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    # one process: the same stream (rank r takes item r of each pair), 2 examples per micro-batch
    alone, _, _ = _steps(parse_args(_args(synthetic, tmp_path / "alone", *extra, "--train.prompts_per_rank=2")), 2)
    assert [r["loss"] for r in rows] == pytest.approx([r["loss"] for r in alone], rel=1e-5)
    assert [r["labelled_tokens"] for r in rows] == [r["labelled_tokens"] for r in alone]
