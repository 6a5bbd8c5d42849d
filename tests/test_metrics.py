"""Metrics sinks: JSONL rows, TensorBoard scalars, resume truncation, the end-of-run plot, rank-0 only."""
import importlib.util
import json

import pytest

from vr1fast.config import ConfigError, MetricsConfig
from vr1fast.metrics import Metrics, read_jsonl


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
