"""Metrics sinks: JSONL rows, TensorBoard scalars, resume truncation, the end-of-run plot, rank-0 only; the step
timer syncs only on logged steps (house rule 6)."""
import importlib.util
import json

import pytest
import torch

from vr1fast.config import MetricsConfig
from vr1fast.errors import ConfigError
from vr1fast.metrics import Metrics, StageTimer, read_jsonl

STAGES = ("data", "processor", "rollout", "reward", "ref", "policy_fwd_bwd", "optimizer")


def _row(step: int) -> dict:
    return {"reward": 0.25 * step, "rewards/accuracy_reward": 0.1 * step, "rewards/format_reward": 1.0,
            "temporal_rewards": step % 2, "completion_length": 10.0 + step, "loss": float("nan") if step == 3 else -0.5}


def test_jsonl_tensorboard_and_plot(tmp_path):
    m = Metrics(MetricsConfig(progress_bar=False), tmp_path, total_steps=4)
    for step in range(1, 5):
        m.log(step, _row(step))
    png = m.close()
    rows = read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert rows[2]["reward"] == 0.75 and rows[3]["completion_length"] == 14.0
    assert rows[2]["loss"] != rows[2]["loss"]           # NaN survives as NaN
    import matplotlib.image
    image = matplotlib.image.imread(png)
    assert image.shape[0] > 300 and image.shape[1] > 300 and image.std() > 0

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("reward")] == [(1, 0.25), (2, 0.5), (3, 0.75), (4, 1.0)]
    assert [e.step for e in acc.Scalars("loss")] == [1, 2, 4]  # the NaN is not written to TensorBoard


def test_resume_drops_rows_after_the_checkpoint(tmp_path):
    m = Metrics(MetricsConfig(progress_bar=False, tensorboard=False, plot=False), tmp_path, total_steps=6)
    for step in range(1, 6):
        m.log(step, _row(step))
    m.close()
    m = Metrics(MetricsConfig(progress_bar=False, tensorboard=False, plot=False), tmp_path, total_steps=6,
                start_step=3)
    m.log(4, {"reward": 9.0})
    m.close()
    rows = read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert rows[-1] == {"step": 4, "reward": 9.0}
    fresh = Metrics(MetricsConfig(progress_bar=False, tensorboard=False, plot=False), tmp_path, total_steps=6)
    fresh.close()
    assert (tmp_path / "metrics.jsonl").read_text() == ""  # a fresh run starts a fresh file


def test_other_ranks_write_nothing(tmp_path):
    m = Metrics(MetricsConfig(), tmp_path / "rank1", total_steps=2, enabled=False)
    m.log(1, _row(1))
    assert m.close() is None
    assert not (tmp_path / "rank1").exists()


def test_progress_bar_shows_reward(tmp_path, capsys):
    m = Metrics(MetricsConfig(tensorboard=False, plot=False), tmp_path, total_steps=2)
    m.log(1, _row(1))
    m.log(2, _row(2))
    m.close()
    err = capsys.readouterr().err
    assert "2/2" in err and "reward=0.500" in err


@pytest.mark.skipif(importlib.util.find_spec("wandb") is not None, reason="wandb is installed")
def test_wandb_without_the_package_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="metrics.wandb"):
        Metrics(MetricsConfig(wandb=True, progress_bar=False), tmp_path, total_steps=1)


def test_rows_are_json_lines(tmp_path):
    m = Metrics(MetricsConfig(progress_bar=False, tensorboard=False, plot=False), tmp_path, total_steps=1)
    m.log(1, {"time/rollout_s": 0.5})
    m.close()
    assert json.loads((tmp_path / "metrics.jsonl").read_text().strip()) == {"step": 1, "time/rollout_s": 0.5}


class _Counter:
    def __init__(self):
        self.calls = 0

    def __call__(self, *args, **kwargs):
        self.calls += 1


def test_stage_timer_syncs_only_when_timed(monkeypatch):
    """A CUDA timer (the device object alone; synchronize counted): timed = one sync before the first stage and one
    at the end of each stage; untimed = no sync and no times."""
    syncs = _Counter()
    monkeypatch.setattr(torch.cuda, "synchronize", syncs)
    cuda = torch.device("cuda")
    untimed = StageTimer(cuda, timed=False)
    for stage in ("data", "rollout", "optimizer"):
        with untimed(stage):
            pass
    assert syncs.calls == 0 and not untimed.seconds
    timed = StageTimer(cuda, timed=True)
    for stage in ("data", "rollout", "data", "optimizer"):
        with timed(stage):
            pass
    assert syncs.calls == 1 + 4 and set(timed.seconds) == {"data", "rollout", "optimizer"}
    assert all(v >= 0 for v in timed.seconds.values())


def test_train_times_only_logged_steps(monkeypatch, tmp_path):
    """train() with log_every=2 over 3 steps: steps 2 and 3 are logged, timed with CUDA-style syncs (7 stages + 1
    per step) and carry time keys; step 1 makes no sync and has none, and every step's metrics log fine."""
    import vr1fast.train as train_mod

    syncs, returned = _Counter(), []
    monkeypatch.setattr(torch.cuda, "synchronize", syncs)
    monkeypatch.setattr(train_mod, "StageTimer", lambda device, timed: StageTimer(torch.device("cuda"), timed))
    step = train_mod.train_step
    monkeypatch.setattr(train_mod, "train_step", lambda *a, **kw: returned.append(step(*a, **kw)) or returned[-1])
    out = tmp_path / "run"
    train_mod.main([f"--data.synthetic_dir={tmp_path / 'data'}", "--data.synthetic_size=4",
                    f"--train.output_dir={out}", "--train.max_steps=3", "--train.log_every=2",
                    "--rollout.num_generations=2", "--rollout.num_shuffled=2", "--rollout.max_new_tokens=4",
                    "--metrics.progress_bar=false", "--model.warmstart_steps=0"])
    assert syncs.calls == 2 * (len(STAGES) + 1)
    timing = [sorted(k for k in m if k.startswith("time/") or k == "tokens_per_s") for m in returned]
    assert timing[0] == [] and timing[1] == timing[2] == sorted([*(f"time/{s}_s" for s in STAGES),
                                                                  "time/step_s", "tokens_per_s"])
    rows = read_jsonl(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == [2, 3] and all("loss" in r and "time/step_s" in r for r in rows)
    quiet = Metrics(MetricsConfig(progress_bar=False, tensorboard=False), tmp_path / "quiet", total_steps=1)
    quiet.log(1, returned[0])
    assert quiet.close().stat().st_size > 0
    row = read_jsonl(tmp_path / "quiet" / "metrics.jsonl")[0]
    assert row["step"] == 1 and "reward" in row and not any(k.startswith("time/") for k in row)


def test_samples_every_writes_its_steps_and_a_resume_keeps_the_earlier_ones(tmp_path):
    cfg = MetricsConfig(progress_bar=False, tensorboard=False, plot=False, samples_every=2)
    m = Metrics(cfg, tmp_path, total_steps=6)
    assert [s for s in range(1, 7) if m.sample_step(s)] == [2, 4, 6]
    m.log_samples(2, [{"completion": "a", "advantage": 0.5}, {"completion": "b", "advantage": -0.5}])
    m.log_samples(4, [{"completion": "c", "advantage": 0.0}])
    m.close()
    m = Metrics(cfg, tmp_path, total_steps=6, start_step=2)  # resumed from step 2: step 4 is redone
    m.log_samples(4, [{"completion": "d", "advantage": 1.0}])
    m.close()
    assert [(r["step"], r["completion"]) for r in read_jsonl(tmp_path / "samples.jsonl")] == [
        (2, "a"), (2, "b"), (4, "d")]
    off = Metrics(MetricsConfig(progress_bar=False, tensorboard=False, plot=False, samples_every=0), tmp_path / "o",
                  total_steps=6)
    assert not any(off.sample_step(s) for s in range(1, 7))
    off.log_samples(2, [{"completion": "x"}])
    off.close()
    assert not (tmp_path / "o" / "samples.jsonl").exists()


def test_step_metrics_max_keys_take_the_max_of_the_micro_batches():
    from vr1fast.metrics import step_metrics
    rows = [{"loss": 1.0, "tokens": 4, "rollout/logprob_diff_max": 0.5, "rollout/logprob_diff_mean": 0.1},
            {"loss": 3.0, "tokens": 6, "rollout/logprob_diff_max": 0.2, "rollout/logprob_diff_mean": 0.3}]
    out = step_metrics(rows, {}, None, 1e-3)
    assert out["loss"] == 2.0 and out["rollout/logprob_diff_max"] == 0.5
    assert out["rollout/logprob_diff_mean"] == pytest.approx(0.2)


def test_plot_has_one_panel_per_entry(tmp_path):
    """``panels`` picks the figure (SFT plots loss / lr / grad norm / labelled tokens, not the RL reward panels):
    the PNG is 2.6 inches × 100 dpi tall per panel (its height read from the PNG header)."""
    import struct

    from vr1fast.metrics import PLOT_PANELS, plot_metrics
    from vr1fast.sft import PLOT_PANELS as SFT_PANELS

    jsonl = tmp_path / "m.jsonl"
    jsonl.write_text("".join(json.dumps({"step": s, "loss": 1.0 / s, "learning_rate": 1e-3, "grad_norm": 2.0,
                                         "labelled_tokens": 40.0}) + "\n" for s in (1, 2, 3)))
    for panels in (PLOT_PANELS, SFT_PANELS, PLOT_PANELS[:1]):
        png = plot_metrics(jsonl, tmp_path / f"{len(panels)}.png", panels)
        height = struct.unpack(">I", png.read_bytes()[20:24])[0]
        assert height == round(2.6 * len(panels) * 100)
