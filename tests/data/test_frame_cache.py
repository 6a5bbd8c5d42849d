"""The on-disk frame cache on real encoded videos: a second run decodes nothing and gets the same frames bit for bit,
corrupt entries are rebuilt (never used), the cap holds with least-recently-used eviction, a changed setting or a
touched file misses, and concurrent writers leave one whole entry. Decoder calls are counted by wrapping
``vr1fast.data.video.decode_frames``."""
import logging
import os
import shutil
import threading
import time
from dataclasses import replace

import pytest
import torch

from media import make_indexed_video
from vr1fast.config import Config, ConfigError, DataConfig, VideoConfig, validate
from vr1fast.data import video
from vr1fast.data.frame_cache import MAGIC, SUFFIX, FrameCache, frame_cache

CFG = VideoConfig(min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 4, backend="pyav")


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    d = tmp_path_factory.mktemp("videos")
    return [make_indexed_video(d / f"v{i}.mp4", 24 + 2 * i, 10, 48, 64) for i in range(3)]


@pytest.fixture
def decodes(monkeypatch):
    """The number of decoder calls so far (a list of paths)."""
    calls, real = [], video.decode_frames

    def counting(path, *args, **kwargs):
        calls.append(str(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(video, "decode_frames", counting)
    return calls


def entries(root):
    return sorted(root.rglob(f"*{SUFFIX}"))


def same_frames(a, b):
    return (torch.equal(a.frames, b.frames) and a.indices == b.indices and a.total_frames == b.total_frames
            and a.video_fps == b.video_fps and a.sample_fps == b.sample_fps)


def test_second_run_reads_the_cache(videos, decodes, tmp_path):
    uncached = video.read_video(videos[0], CFG)
    first = video.read_video(videos[0], CFG, FrameCache(tmp_path, 10**9))
    assert len(decodes) == 2 and len(entries(tmp_path)) == 1
    second = video.read_video(videos[0], CFG, FrameCache(tmp_path, 10**9))  # a new run: a new cache object
    again = video.load_media(videos[0], "video", replace(CFG, decode_timeout_s=5.0), FrameCache(tmp_path, 10**9))
    assert len(decodes) == 2  # the timeout changes no frame: still a hit
    assert same_frames(first, uncached) and same_frames(second, uncached) and torch.equal(again, uncached.frames)
    assert second.frames.dtype == torch.uint8 and second.frames.is_contiguous()


def corrupt(path, how):
    data = bytearray(path.read_bytes())
    if how == "truncated":
        data = data[:-100]
    elif how == "payload_byte":
        data[-7] ^= 0x10
    elif how == "header_byte":
        data[len(MAGIC) + 4 + 30] ^= 0x01  # inside the header JSON
    elif how == "empty":
        data = bytearray()
    else:
        data = bytearray(b"not an entry" * 10)
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("how", ["truncated", "payload_byte", "header_byte", "empty", "garbage"])
def test_corrupt_entry_is_rebuilt(videos, decodes, tmp_path, caplog, how):
    cache = FrameCache(tmp_path, 10**9)
    want = video.read_video(videos[1], CFG, cache)
    (entry,) = entries(tmp_path)
    corrupt(entry, how)
    with caplog.at_level(logging.WARNING, logger="vr1fast.data.frame_cache"):
        got = video.read_video(videos[1], CFG, cache)
    assert len(decodes) == 2 and same_frames(got, want)
    (line,) = [r.getMessage() for r in caplog.records]
    assert f"{entry} is corrupt (" in line and "\n" not in line
    assert same_frames(video.read_video(videos[1], CFG, cache), want) and len(decodes) == 2  # rebuilt whole


def test_lru_eviction_keeps_the_cap(videos, decodes, tmp_path):
    video.read_video(videos[0], CFG, FrameCache(tmp_path, 10**9))
    (first,) = entries(tmp_path)
    video.read_video(videos[1], CFG, FrameCache(tmp_path, 10**9))
    (second,) = set(entries(tmp_path)) - {first}
    now = time.time()
    os.utime(first, (now - 100, now - 100))
    os.utime(second, (now - 50, now - 50))
    size = max(first.stat().st_size, second.stat().st_size)  # each video here samples 4 frames of one size
    cache = FrameCache(tmp_path, int(2.5 * size))
    video.read_video(videos[0], CFG, cache)  # a hit: `first` becomes the most recently used
    assert len(decodes) == 2
    video.read_video(videos[2], CFG, cache)  # 3 entries > 2.5: the least recently used one goes
    assert len(decodes) == 3 and not second.exists() and first.exists() and len(entries(tmp_path)) == 2
    assert sum(e.stat().st_size for e in entries(tmp_path)) <= 2.5 * size


def test_entry_over_the_cap_is_not_written(videos, decodes, tmp_path):
    cache = FrameCache(tmp_path, 1000)
    for _ in range(2):
        video.read_video(videos[0], CFG, cache)
    assert len(decodes) == 2 and not entries(tmp_path)


def test_stale_temp_files_are_swept(tmp_path):
    (tmp_path / "ab").mkdir()
    old, fresh = tmp_path / "ab" / "x.frames.1.aa.tmp", tmp_path / "ab" / "y.frames.2.bb.tmp"
    old.write_bytes(b"x")
    fresh.write_bytes(b"y")
    os.utime(old, (time.time() - 7200, time.time() - 7200))
    assert FrameCache(tmp_path, 10).evict() == 0
    assert not old.exists() and fresh.exists()


def test_changed_setting_touched_or_moved_file_misses(videos, decodes, tmp_path):
    cache = FrameCache(tmp_path, 10**9)
    base = video.read_video(videos[0], CFG, cache)
    other = video.read_video(videos[0], replace(CFG, max_pixels=28 * 28 * 6, min_pixels=28 * 28 * 6), cache)
    assert len(decodes) == 2 and other.frames.shape != base.frames.shape
    video.read_video(videos[0], replace(CFG, fps=1.0), cache)
    assert len(decodes) == 3
    copy = shutil.copy(videos[0], tmp_path / "copy.mp4")
    video.read_video(copy, CFG, cache)
    assert len(decodes) == 4
    st = os.stat(copy)
    os.utime(copy, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # touched: same bytes, new mtime
    assert same_frames(video.read_video(copy, CFG, cache), base) and len(decodes) == 5
    video.read_video(videos[0], CFG, cache)
    assert len(decodes) == 5 and len(entries(tmp_path)) == 5


def test_concurrent_writers_leave_one_whole_entry(videos, decodes, tmp_path, monkeypatch):
    """Two workers miss the same video at once, both decode and publish; readers then get whole frames."""
    barrier = threading.Barrier(2)
    real = video.decode_frames

    def slow(*args, **kwargs):
        out = real(*args, **kwargs)
        barrier.wait(timeout=30)  # both decoded before either writes
        return out

    monkeypatch.setattr(video, "decode_frames", slow)
    results = []
    threads = [threading.Thread(target=lambda: results.append(video.read_video(videos[2], CFG, FrameCache(
        tmp_path, 10**9)))) for _ in range(2)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert len(results) == 2 and len(decodes) == 2 and len(entries(tmp_path)) == 1
    assert not list(tmp_path.rglob("*.tmp")) and same_frames(results[0], results[1])
    assert same_frames(video.read_video(videos[2], CFG, FrameCache(tmp_path, 10**9)), results[0])
    assert len(decodes) == 2


def test_config_fields(tmp_path):
    assert frame_cache(DataConfig()) is None
    cfg = DataConfig(frame_cache=str(tmp_path / "fc"), frame_cache_gb=0.5)
    assert frame_cache(cfg) is frame_cache(cfg) and frame_cache(cfg).cap_bytes == 500_000_000
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        c = Config()
        c.data.frame_cache_gb = bad
        with pytest.raises(ConfigError, match="data.frame_cache_gb must be a positive, finite size in GB"):
            validate(c)


def test_training_prompt_stream_fills_then_reads_the_cache(decodes, tmp_path):
    """``data.frame_cache`` reaches the loader: the first pass over the synthetic set's videos decodes each once and
    writes an entry, a second pass decodes nothing and yields the same frames."""
    from vr1fast.config import demo
    from vr1fast.data.dataset import Position, Sampler
    from vr1fast.data.loader import next_prompts, run_records

    cfg = demo()
    cfg.data = replace(cfg.data, synthetic_dir=str(tmp_path / "set"), synthetic_size=4, shuffle=False,
                       frame_cache=str(tmp_path / "cache"))
    cfg.train = replace(cfg.train, prompts_per_rank=4)
    records = run_records(cfg.data, once=lambda make: make())
    sampler = Sampler(len(records), 0, False)

    def frames():
        return next_prompts(records, sampler, Position(), cfg, rank=0, world_size=1, seed=0)[1]

    first = frames()
    videos = sum(records[i].data_type == "video" for i in range(len(records)))
    assert videos >= 1 and len(decodes) == videos and len(list((tmp_path / "cache").rglob(f"*{SUFFIX}"))) == videos
    second = frames()
    assert len(decodes) == videos and all(torch.equal(a, b) for a, b in zip(first, second))
