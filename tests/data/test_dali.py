"""vr1fast.data.dali on real encoded files: DALI's CPU backend (VP9) against the CPU path, PyAV for what DALI's CPU
decoder lacks, the frame cache, the error without DALI, and (GPU machines) NVDEC on H.264 and HEVC.

Frames carry their own index (tests/media.py), so "the indices equal sample_frame_indices" is read off the pixels.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import subprocess
import sys
import threading

import numpy as np
import pytest
import torch
from media import frame_index, make_indexed_video, vfr_timestamps

from vr1fast.config import VideoConfig
from vr1fast.data import dali
from vr1fast.data.frame_cache import FrameCache
from vr1fast.data.video import read_video, sample_frame_indices
from vr1fast.errors import MediaError

needs_dali = pytest.mark.skipif(not dali.available(), reason="NVIDIA DALI is not installed (pip install "
                                 "'vr1fast[dali]')")
DALI = VideoConfig(backend="dali")
CPU = VideoConfig(backend="pyav")
UNTURN = {"rot90": 3}  # counter-clockwise quarter turns that bring an output frame back to the painted layout


@pytest.fixture(scope="module")
def vp9(tmp_path_factory):
    """VP9 files DALI's CPU decoder reads: 640×360 (downscaled to 420×224), 480×360 at a variable frame rate,
    the same rotated 90° (display matrix)."""
    d = tmp_path_factory.mktemp("dali_vp9")
    return {"big": make_indexed_video(d / "big.webm", 60, 30, 360, 640, codec="vp9"),
            "vfr": make_indexed_video(d / "vfr.webm", 90, 30, 360, 480, codec="vp9",
                                      pts=vfr_timestamps(60, 30, 30, 5)),
            "rot90": make_indexed_video(d / "rot90.mp4", 37, 10, 360, 480, codec="vp9", rotate=90)}


def painted(frames: torch.Tensor, name: str) -> list[int]:
    return [frame_index(np.rot90(f, UNTURN.get(name, 0))) for f in frames.cpu().numpy()]


def abs_diff(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a.cpu().int() - b.cpu().int()).abs().float()


@needs_dali
@pytest.mark.parametrize("name", ["big", "vfr", "rot90"])
def test_vp9_on_dali_cpu_matches_the_cpu_path(vp9, name):
    got, ref = read_video(vp9[name], DALI), read_video(vp9[name], CPU)
    assert got.frames.dtype == torch.uint8 and got.frames.shape == ref.frames.shape
    assert (got.total_frames, got.video_fps, got.sample_fps) == (ref.total_frames, ref.video_fps, ref.sample_fps)
    assert list(got.indices) == sample_frame_indices(got.total_frames, got.video_fps, DALI) == list(ref.indices)
    assert painted(got.frames, name) == list(got.indices)
    diff = abs_diff(got.frames, ref.frames)
    per_channel = diff.reshape(-1, 3).mean(0)
    p999 = float(np.percentile(diff.numpy(), 99.9))
    print(f"{name}: mean |d| per channel {per_channel.tolist()}, p99.9 {p999}, max {diff.max().item()}")
    assert per_channel.max() <= 2.0
    assert p999 <= 40  # measured 27 on 'big' (sharp chroma edges between the painted cells)


@needs_dali
def test_several_videos_in_flight_equal_one_at_a_time(vp9):
    paths = [vp9["big"], vp9["vfr"], vp9["rot90"], vp9["vfr"]]
    batched = dali.read_videos(paths, DALI, device="cpu", max_batch=3)
    for path, got in zip(paths, batched):
        alone = dali.read_videos([path], DALI, device="cpu")[0]
        assert got.indices == alone.indices and torch.equal(got.frames, alone.frames)


@needs_dali
def test_metadata_is_probed_once_per_file_version(vp9):
    first = dali.probe(vp9["vfr"])
    misses = dali._probe_cached.cache_info().misses
    assert dali.probe(vp9["vfr"]) == first and dali._probe_cached.cache_info().misses == misses
    st = os.stat(vp9["vfr"])
    os.utime(vp9["vfr"], ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # a touched file is probed again
    assert dali.probe(vp9["vfr"]) == first and dali._probe_cached.cache_info().misses == misses + 1


@needs_dali
def test_dali_resize_against_the_torch_resize(vp9):
    in_dali = dali.read_videos([vp9["big"], vp9["rot90"]], DALI, device="cpu", resize="dali")
    in_torch = dali.read_videos([vp9["big"], vp9["rot90"]], DALI, device="cpu", resize="torch")
    for a, b in zip(in_dali, in_torch):
        diff = abs_diff(a.frames, b.frames)
        assert a.frames.shape == b.frames.shape and diff.max() <= 2 and diff.mean() < 0.05


@needs_dali
def test_h264_and_hevc_on_cpu_go_through_pyav_logged_once(tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(dali, "_cpu_fallback_logged", threading.Event())
    files = [make_indexed_video(tmp_path / f"{codec}.mp4", 30, 30, codec=codec) for codec in ("h264", "hevc")]
    with caplog.at_level(logging.WARNING, logger="vr1fast.data.dali"):
        for path in files + files:
            got, ref = read_video(path, DALI), read_video(path, CPU)
            assert got.indices == ref.indices and torch.equal(got.frames, ref.frames)
    said = [r.getMessage() for r in caplog.records if "PyAV" in r.getMessage()]
    assert len(said) == 1 and "h264" in said[0]


@needs_dali
def test_unreadable_files_name_themselves(vp9, tmp_path):
    garbage = tmp_path / "garbage.webm"
    garbage.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    for bad in (garbage, tmp_path / "missing.webm"):
        with pytest.raises(MediaError, match=str(bad.name)):
            dali.read_videos([vp9["vfr"], bad], DALI, device="cpu")


@needs_dali
def test_a_file_dali_fails_on_goes_to_pyav_naming_it(vp9, caplog):
    """A batch with one job DALI cannot decode (an index past the end, pad_mode none): the pipeline is rebuilt, the
    good job decoded by DALI alone, the bad one by PyAV (with the indices of its config) and a warning names it."""
    good, bad = (dali._plan(vp9[name], DALI) for name in ("big", "vfr"))
    bad = dataclasses.replace(bad, indices=(0, bad.info.total_frames + 5))
    key = ("cpu", False, dali.MAX_BATCH, dali.NUM_THREADS)
    with caplog.at_level(logging.WARNING, logger="vr1fast.data.dali"):
        got_good, got_bad = dali._decode_batch([good, bad], key, DALI)
    assert torch.equal(got_good.frames, dali.read_videos([vp9["big"]], DALI, device="cpu")[0].frames)
    assert torch.equal(got_bad.frames, read_video(vp9["vfr"], CPU).frames)
    assert [r.getMessage() for r in caplog.records if str(vp9["vfr"]) in r.getMessage()]


@needs_dali
def test_frame_cache_holds_dali_decodes(vp9, tmp_path):
    cache = FrameCache(tmp_path / "cache", 10**9)
    first = read_video(vp9["rot90"], DALI, cache)
    again = read_video(vp9["rot90"], DALI, cache)
    assert len(list((tmp_path / "cache").rglob("*.frames"))) == 1
    assert again.indices == first.indices and torch.equal(again.frames, first.frames)
    assert torch.equal(first.frames, read_video(vp9["rot90"], DALI).frames)
    read_video(vp9["rot90"], CPU, cache)  # another decoder, another key
    assert len(list((tmp_path / "cache").rglob("*.frames"))) == 2


def test_backend_dali_without_dali_is_one_line(tmp_path):
    path = make_indexed_video(tmp_path / "a.webm", 8, 30, codec="vp9")
    code = ("import sys; sys.modules['nvidia.dali'] = None\n"
            "from vr1fast.config import VideoConfig\nfrom vr1fast.data.video import read_video\n"
            f"try:\n    read_video({str(path)!r}, VideoConfig(backend='dali'))\n"
            "except Exception as e:\n    print(type(e).__name__); print(str(e))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    lines = out.stdout.splitlines()
    assert out.returncode == 0 and len(lines) == 2, out.stdout + out.stderr
    assert lines[0] == "DaliNotInstalled" and "video.backend='dali'" in lines[1] and "pip install" in lines[1]


@needs_dali
@pytest.mark.gpu
@pytest.mark.parametrize("codec", ["h264", "hevc"])
def test_nvdec_matches_the_cpu_frames(tmp_path, codec):
    path = make_indexed_video(tmp_path / f"{codec}.mp4", 60, 30, 360, 640, codec=codec)
    got, ref = read_video(path, DALI), read_video(path, CPU)
    assert got.frames.is_cuda and got.frames.dtype == torch.uint8 and got.frames.shape == ref.frames.shape
    assert list(got.indices) == list(ref.indices) == painted(got.frames, codec)
    diff = abs_diff(got.frames, ref.frames)
    print(f"{codec} NVDEC: mean |d| per channel {diff.reshape(-1, 3).mean(0).tolist()}, "
          f"p99.9 {float(np.percentile(diff.numpy(), 99.9))}, max {diff.max().item()}")
    assert diff.reshape(-1, 3).mean(0).max() <= 2.0
