"""The training loop end to end on CPU: the tiny model, real synthetic videos, HF rollouts, no mocks.

Runs are small (1 prompt per step, 2+2 completions of ≤ 8 tokens). Weight decay is raised so the weights drift
from the first steps on; the KL to the reference then moves every logged number, which is what makes the resume
comparison able to fail.
"""
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from runs import comparable, small
from vr1fast import ckpt
from vr1fast.cli import parse as parse_args
from vr1fast.config import OptimConfig
from vr1fast.metrics import read_jsonl
from vr1fast.optim import lr_factor
from vr1fast.errors import NonFiniteLossError
from vr1fast.train import build, close, main, train

REPO = Path(__file__).resolve().parents[1]
VIDEO_R1_NAMES = ("completion_length", "rewards/accuracy_reward", "rewards/format_reward", "reward", "reward_std",
                  "kl", "all_wrong", "all_correct", "temporal_rewards", "loss", "grad_norm", "learning_rate")
STAGES = ("data", "processor", "rollout", "reward", "ref", "policy_fwd_bwd", "optimizer")


def test_demo_writes_metrics_plot_and_checkpoint(synthetic, tmp_path):
    out = tmp_path / "run"
    main(small(synthetic, out, "--train.max_steps=3", "--optim.warmup_steps=1", "--train.save_every=2",
               "--metrics.samples_every=2"))
    rows = read_jsonl(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3]
    for name in VIDEO_R1_NAMES + tuple(f"time/{s}_s" for s in STAGES):
        assert all(name in r for r in rows), name
    for r in rows:
        assert 1 <= r["completion_length"] <= 8 and math.isfinite(r["loss"])
        assert r["time/step_s"] == pytest.approx(sum(r[f"time/{s}_s"] for s in STAGES))
    # HF schedule, warmup 1 then cosine over 3 steps: factors 0, 1, cos²(π/4) = 0.5
    assert [r["learning_rate"] for r in rows] == pytest.approx([0.0, 1e-3, 0.5e-3])
    assert (out / "metrics.png").stat().st_size > 10_000
    assert any((out / "tensorboard").iterdir())
    assert [p.name for p in sorted((out / "checkpoints").iterdir())] == ["step_000002", "step_000003"]
    final = out / "checkpoints" / "step_000003"
    assert ckpt.is_complete(final)
    assert json.loads((final / "state.json").read_text()) == {"data": {"epoch": 0, "index": 3}, "step": 3,
                                                            "world_size": 1}
    assert parse_args(["--config", str(final / "config.yaml")]).train.max_steps == 3
    _check_samples(read_jsonl(out / "samples.jsonl"), rows[1])


def _check_samples(samples: list[dict], metrics: dict) -> None:
    """Step 2's completions (samples_every=2): G ordered ones whose rewards average to the logged reward and whose
    advantages are group-normalised, and the shuffled ones of a video prompt."""
    assert {r["step"] for r in samples} == {2}
    ordered = [r for r in samples if r["branch"] == "ordered"]
    assert [r["sample"] for r in ordered] == [0, 1] and all(isinstance(r["completion"], str) for r in ordered)
    assert sum(r["reward"] for r in ordered) / 2 == pytest.approx(metrics["reward"], abs=1e-6)
    assert sum(r["length"] for r in ordered) / 2 == pytest.approx(metrics["completion_length"])
    assert sum(r["advantage"] for r in ordered) == pytest.approx(0.0, abs=1e-5)
    shuffled = [r for r in samples if r["branch"] == "shuffled"]
    assert len(shuffled) in (0, 2) and all(r["accuracy"] in (0.0, 1.0) or 0 <= r["accuracy"] <= 1 for r in shuffled)
    assert (len(shuffled) == 2) == (ordered[0]["temporal"] != 0.5)  # an image prompt has no shuffled branch


def test_paged_engine_trains_and_its_log_probs_match_the_policy(synthetic, tmp_path):
    """The demo's loop with ``--rollout.engine=paged`` on CPU: in float32 the engine's sampling log-probs equal
    the policy's own on every completion token (the logged mismatch is ~0)."""
    out = tmp_path / "run"
    main(small(synthetic, out, "--train.max_steps=2", "--rollout.engine=paged", "--rollout.max_new_tokens=12"))
    rows = read_jsonl(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2] and all(math.isfinite(r["loss"]) for r in rows)
    for r in rows:
        assert 0 <= r["rollout/logprob_diff_mean"] <= r["rollout/logprob_diff_max"] < 1e-4, r


def test_lr_schedules():
    cfg = OptimConfig(warmup_steps=2, scheduler="cosine")
    assert [lr_factor(s, cfg, 6) for s in range(7)] == pytest.approx(
        [0.0, 0.5, 1.0, 0.5 + 0.5 * math.cos(math.pi / 4), 0.5, 0.5 - 0.5 * math.cos(math.pi / 4), 0.0])
    assert [lr_factor(s, OptimConfig(scheduler="linear"), 4) for s in range(5)] == [1.0, 0.75, 0.5, 0.25, 0.0]
    assert lr_factor(3, OptimConfig(scheduler="constant", warmup_steps=0), 4) == 1.0


def test_checkpoint_reloads_with_from_pretrained(synthetic, tmp_path):
    from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration
    cfg = parse_args(small(synthetic, tmp_path / "run", "--train.max_steps=2", "--train.save_every=2"))
    run, state = build(cfg)
    try:
        train(run, state)
        live = {k: v.detach().clone() for k, v in run.policy.model.state_dict().items()}
    finally:
        close(run)
    path = tmp_path / "run" / "checkpoints" / "step_000002" / "model"
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(path)
    loaded = model.state_dict()
    assert loaded.keys() == live.keys()
    assert all(torch.equal(loaded[k], live[k]) for k in live)
    from vr1fast.model.load import tiny_model
    initial = tiny_model(0)[0].state_dict()
    assert max((live[k] - initial[k]).abs().max().item() for k in live) > 1e-4  # it trained
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert tokenizer.convert_tokens_to_ids("<|video_pad|>") == model.config.video_token_id
    trainer = torch.load(path.parent / "trainer.pt", weights_only=False)
    assert len(trainer["optimizer"]["state"]) == len(live) and trainer["scheduler"]["last_epoch"] == 2


ENV = dict(os.environ, OMP_NUM_THREADS="1")  # both arms alike: thread count changes float summation order


def _train_process(argv: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vr1fast.train", *argv], cwd=REPO, env=ENV, capture_output=True,
                          text=True, timeout=300)


def _run_until_killed(argv: list[str], jsonl: Path, lines: int) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "vr1fast.train", *argv], cwd=REPO, env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if jsonl.is_file() and len(jsonl.read_text().splitlines()) >= lines:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.02)
    proc.wait(timeout=60)
    return proc


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_metrics(synthetic, tmp_path):
    """8 steps straight vs. 8 steps killed (SIGKILL) after step 4 and resumed with --train.resume=auto."""
    steps = ["--train.max_steps=8", "--train.save_every=3", "--train.prompts_per_rank=2"]
    result = _train_process(small(synthetic, tmp_path / "straight", *steps))
    assert result.returncode == 0, result.stderr[-2000:]
    straight = read_jsonl(tmp_path / "straight" / "metrics.jsonl")

    argv = small(synthetic, tmp_path / "killed", *steps)
    proc = _run_until_killed(argv, tmp_path / "killed" / "metrics.jsonl", lines=4)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read()
    resumed_from = ckpt.latest(tmp_path / "killed" / "checkpoints")
    assert resumed_from is not None and ckpt.read_state(resumed_from)["step"] < 8
    result = _train_process([*argv, "--train.resume=auto"])
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"steps {ckpt.read_state(resumed_from)['step'] + 1}..8" in result.stdout
    resumed = read_jsonl(tmp_path / "killed" / "metrics.jsonl")
    assert comparable(resumed) == comparable(straight)
    assert any(r["kl"] > 0 for r in straight[ckpt.read_state(resumed_from)["step"]:])  # weights really moved


def test_non_finite_loss_stops_and_keeps_the_last_checkpoint(synthetic, tmp_path):
    cfg = parse_args(small(synthetic, tmp_path / "run", "--train.max_steps=2", "--train.save_every=1"))
    run, state = build(cfg)
    try:
        train(run, state)
        last = run.last_checkpoint
        weights = (last / "model" / "model.safetensors").read_bytes()
        run.total_steps = 3
        with torch.no_grad():  # a NaN reference makes the k3 KL, hence the loss, NaN
            run.ref.model.lm_head.weight.fill_(float("nan"))
        with pytest.raises(NonFiniteLossError) as e:
            train(run, state)
    finally:
        close(run)
    message = str(e.value)
    assert "\n" not in message and "step 3" in message and str(last) in message
    assert state.step == 2
    root = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["step_000001", "step_000002"]
    assert ckpt.latest(root) == last and (last / "model" / "model.safetensors").read_bytes() == weights


def test_bad_config_is_one_line_naming_the_field(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--train.max_step=3"])
    assert e.value.code == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and "train.max_step" in err[0]


def _one_line_error(capsys, argv: list[str], code: int = 1) -> str:
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == code
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1, err
    return err[0]


def test_missing_model_folder_is_one_line_naming_it(synthetic, tmp_path, capsys):
    missing = tmp_path / "no_such_checkpoint"
    line = _one_line_error(capsys, small(synthetic, tmp_path / "run", f"--model.path={missing}",
                                        "--model.warmstart_steps=0"))
    assert str(missing) in line


def test_prompt_over_max_prompt_length_names_the_record(synthetic, tmp_path, capsys):
    line = _one_line_error(capsys, small(synthetic, tmp_path / "run", "--rollout.max_prompt_length=40",
                                        "--train.max_steps=1"))
    assert "rl.json: record" in line and "rollout.max_prompt_length=40" in line


def _two_record_set(synthetic: Path, folder: Path) -> Path:
    """A copy of two synthetic video records: record 0 intact, record 1's video truncated to half its bytes."""
    records = [r for r in json.loads((synthetic / "rl.json").read_text()) if r["data_type"] == "video"][:2]
    (folder / "videos").mkdir(parents=True)
    for r in records:
        shutil.copy(synthetic / r["path"], folder / r["path"])
    broken = folder / records[1]["path"]
    broken.write_bytes(broken.read_bytes()[: broken.stat().st_size // 2])
    (folder / "rl.json").write_text(json.dumps(records))
    return broken


def test_broken_video_is_an_error_naming_the_file_or_a_counted_skip(synthetic, tmp_path, capsys):
    broken = _two_record_set(synthetic, tmp_path / "data")
    argv = small(synthetic, tmp_path / "run", "--train.max_steps=2", f"--data.path={tmp_path / 'data' / 'rl.json'}",
                 "--data.shuffle=false")
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 1
    assert str(broken) in capsys.readouterr().err
    main([*argv, "--data.skip_bad=true", f"--train.output_dir={tmp_path / 'skip'}"])
    rows = read_jsonl(tmp_path / "skip" / "metrics.jsonl")
    assert len(rows) == 2 and rows[1]["skipped_media"] >= 1 and rows[0]["skipped_media"] == 0


def test_missing_video_is_an_error_naming_the_file_or_a_counted_skip(synthetic, tmp_path, capsys):
    broken = _two_record_set(synthetic, tmp_path / "data")
    broken.unlink()
    argv = small(synthetic, tmp_path / "run", "--train.max_steps=1", f"--data.path={tmp_path / 'data' / 'rl.json'}")
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 1
    assert str(broken) in capsys.readouterr().err
    main([*argv, "--data.skip_bad=true"])
    assert len(read_jsonl(tmp_path / "run" / "metrics.jsonl")) == 1
