"""The frame-order task family: the order signal is in the decoded frames, the cue agrees with the answer as often as
asked (train) or exactly half the time (test), the files follow Video-R1's schemas, and a set is reused."""
import json

import numpy as np
import pytest
import torch

from vr1fast.config import VideoConfig
from vr1fast.data.dataset import load_records
from vr1fast.data.temporal_task import CUES, generate_temporal_task
from vr1fast.data.video import load_media

VIDEO = VideoConfig(max_frames=8, min_pixels=3136, max_pixels=3136)


def frames_of(root, record) -> torch.Tensor:
    return load_media(str(root / record["path"]), "video", VIDEO).float()


@pytest.fixture(scope="module")
def fade(tmp_path_factory):
    return generate_temporal_task(tmp_path_factory.mktemp("fade"), n_train=40, n_test=8, cue_rate=0.75,
                                  signal=0.4, noise=0.05, seed=3)


def test_cue_rates_and_schema(fade):
    train = json.loads(fade.train.read_text())
    assert len(train) == 40 and fade.cue_agreement == sum(r["cue_agrees"] for r in train) / 40
    assert 0.5 < fade.cue_agreement < 0.95                       # drawn per item at 0.75
    for name, agree in (("cue_agree", True), ("cue_conflict", False)):
        rows = json.loads(fade.tests[name].read_text())
        assert len(rows) == 4 and all(r["cue_agrees"] is agree for r in rows)
        for r in rows:                                  # the decoded tint is the answer's (agree) or the other one's
            frames = frames_of(fade.root, r)
            tint = "red" if frames[..., 0].mean() > frames[..., 2].mean() else "blue"
            assert (tint == CUES["AB".index(r["solution"][8])]) is agree, r
    sft = json.loads(fade.train_sft.read_text())
    assert [{k: v for k, v in r.items() if k != "process"} for r in sft] == train
    assert all(r["process"].startswith("<think>") and r["process"].endswith("</think>") for r in sft)
    records = load_records(fade.train)            # loads as Video-R1 RL records, media present
    assert len(records) == 40


def test_fade_frames_carry_order_and_tint(fade):
    """Decoded: the grey level rises for A (brighter) and falls for B; the tint is red or blue as the record says."""
    train = json.loads(fade.train.read_text())
    for r in train[:12]:
        frames = frames_of(fade.root, r)
        assert frames.shape == (8, 56, 56, 3)
        level = frames.mean(dim=(1, 2, 3)).numpy()
        slope = np.polyfit(np.arange(8), level, 1)[0]
        assert (slope > 0) == (r["solution"] == "<answer>A</answer>"), (r, level)
        red, blue = frames[..., 0].mean().item(), frames[..., 2].mean().item()
        assert (red > blue) == (r["cue"] == "red"), r


def test_direction_bar_moves_as_answered(tmp_path):
    task = generate_temporal_task(tmp_path, kind="direction", n_train=6, n_test=2, cue_rate=1.0, seed=1)
    for r in json.loads(task.train.read_text()):
        frames = frames_of(task.root, r)
        bright = frames.mean(dim=3).amax(dim=1) > 200            # [T, W]: columns the white bar covers
        centre = [np.flatnonzero(b.numpy()).mean() for b in bright]
        assert (centre[-1] < centre[0]) == (r["solution"] == "<answer>A</answer>"), (r, centre)   # A = left
        corner = frames[:, :4, :4].mean(dim=(0, 1, 2))           # the background: the cue, here the answer's
        assert ("red" if corner[0] > corner[2] else "blue") == CUES["AB".index(r["solution"][8])], (r, corner)


def test_same_parameters_same_task(tmp_path):
    """Two fresh folders with the same parameters hold the same records and decoded frames; another seed differs."""
    a, b = (generate_temporal_task(tmp_path / n, n_train=3, n_test=2, seed=7) for n in ("a", "b"))
    other = generate_temporal_task(tmp_path / "c", n_train=3, n_test=2, seed=8)
    assert a.train.read_text() == b.train.read_text() and a.train_sft.read_text() == b.train_sft.read_text()
    for ra, rb in zip(json.loads(a.train.read_text()), json.loads(b.train.read_text())):
        assert torch.equal(frames_of(a.root, ra), frames_of(b.root, rb))
    first = json.loads(a.train.read_text())[0]
    assert not torch.equal(frames_of(a.root, first), frames_of(other.root, json.loads(other.train.read_text())[0]))


def test_reused_and_regenerated(tmp_path):
    first = generate_temporal_task(tmp_path, n_train=4, n_test=2, seed=5)
    text = first.train.read_text()
    again = generate_temporal_task(tmp_path, n_train=4, n_test=2, seed=5)
    assert again.reused and not first.reused and again.train.read_text() == text
    other = generate_temporal_task(tmp_path, n_train=4, n_test=2, seed=6)     # other parameters: written anew
    assert not other.reused


@pytest.mark.parametrize("kwargs", [dict(kind="spin"), dict(n_test=3), dict(cue_rate=1.5), dict(signal=0.0),
                                    dict(size=(57, 56))])
def test_bad_arguments_are_named(tmp_path, kwargs):
    with pytest.raises(ValueError, match="generate_temporal_task"):
        generate_temporal_task(tmp_path, **{"n_train": 2, "n_test": 2, **kwargs})
