"""vr1fast.data.video / decode: qwen-vl-utils sampling and sizing, real encoded videos, images, broken media.

Expected indices and sizes are worked out by hand from qwen-vl-utils' formulas (the arithmetic is in the
comments); decoded pixels are checked against a plain sequential PyAV decode resized with the torchvision-v1
recipe written out here, and, when decord is installed, against decord itself.
"""
from __future__ import annotations

import re
import time
from fractions import Fraction

import av
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from media import decode_all_frames, frame_index, indexed_frames, make_broken_media, make_indexed_video, \
    vfr_timestamps, write_video
from vr1fast.config import VideoConfig, eval_video
from vr1fast.data.decode import decord_available
from vr1fast.data.video import load_image, load_video, num_frames, read_video, resize_frames, \
    sample_frame_indices, smart_resize, video_pixel_bounds
from vr1fast.errors import MediaError

TRAIN_MIN, TRAIN_MAX = 128 * 28 * 28, 105369  # 100 352 and int(1.05 · 100 352)


def _noisy(n, h, w, seed=0):
    rng = np.random.default_rng(seed)
    noise = rng.integers(-40, 41, (n, h, w, 3))
    return np.clip(indexed_frames(n, h, w).astype(np.int64) + noise, 0, 255).astype(np.uint8)


def _tv_resize(frames_nhwc: np.ndarray, h: int, w: int) -> torch.Tensor:
    """torchvision v1 F.resize(uint8 TCHW, BICUBIC, antialias=True) spelled out, back to uint8 NHWC."""
    x = torch.from_numpy(frames_nhwc).permute(0, 3, 1, 2)
    if x.shape[-2:] != (h, w):
        x = F.interpolate(x.to(torch.float32), size=[h, w], mode="bicubic", align_corners=False, antialias=True)
        x = x.clamp(min=0, max=255).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1)


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    d = tmp_path_factory.mktemp("videos")
    return {
        "h264": make_indexed_video(d / "h264.mp4", 60, 30, 48, 64),
        "h264_gop": make_indexed_video(d / "gop.mp4", 90, 25, 240, 320, gop=10),
        "vp9": make_indexed_video(d / "vp9.webm", 45, 24, 72, 96, codec="vp9"),
        "vfr": make_indexed_video(d / "vfr.mp4", 60, 30, pts=vfr_timestamps(30, 30, 30, 10)),
        "long": make_indexed_video(d / "long.mp4", 90, 10, 48, 64),
        "large": make_indexed_video(d / "large.mp4", 6, 10, 360, 480),
        "noisy_h264": write_video(d / "noisy.mp4", _noisy(48, 96, 128), 24, gop=8),
        "noisy_vp9": write_video(d / "noisy.webm", _noisy(40, 72, 96, seed=1), 20, codec="vp9"),
    }


# ------------------------------------------------------------------ frame sampling


@pytest.mark.parametrize("total, fps, expected", [
    (60, 30, [0, 20, 39, 59]),                             # 2 s → n=4; 59/3 = 19.67, 39.33
    (150, 30, [0, 17, 33, 50, 66, 83, 99, 116, 132, 149]),  # 5 s → n=10; step 149/9 = 16.56
    (237, 30, [0, 18, 36, 54, 73, 91, 109, 127, 145, 163, 182, 200, 218, 236]),  # 7.9 s → 15.8 → floored to 14
    (18000, 30, [0, 1200, 2400, 3600, 4800, 6000, 7200, 8400, 9599, 10799, 11999, 13199, 14399, 15599, 16799,
                 17999]),                                  # 600 s → capped at 16; step 1199.93
    (30, 30, [0, 10, 19, 29]),                             # 1 s → 2 → raised to min_frames 4
    (5, 30, [0, 1, 3, 4]),                                 # max_frames = floor_2(min(16, 5)) = 4
    (3, 30, [0, 2]),                                       # max_frames = floor_2(3) = 2
])
def test_sample_frame_indices_training(total, fps, expected):
    assert sample_frame_indices(total, fps) == expected


def test_sample_frame_indices_clamps_are_even():
    # max_frames 15 floors to 14; min_frames 5 ceils to 6 (linspace(0, 29, 6): step 5.8)
    assert len(sample_frame_indices(900, 30, VideoConfig(max_frames=15))) == 14
    assert sample_frame_indices(30, 30, VideoConfig(min_frames=5)) == [0, 6, 12, 17, 23, 29]
    assert len(sample_frame_indices(18000, 30, eval_video(64))) == 64


def test_sample_frame_indices_round_half_to_even():
    # linspace(0, 5, 3) = [0, 2.5, 5] → 2 (DALI's floor(x + .5) would give 3); linspace(0, 7, 3) → 3.5 → 4
    cfg = VideoConfig(frame_factor=1, nframes=3)
    assert sample_frame_indices(6, 30, cfg) == [0, 2, 5]
    assert sample_frame_indices(8, 30, cfg) == [0, 4, 7]
    # nframes is rounded to the frame factor with Python's round: 7/2 = 3.5 → 4 → 8; 5/2 = 2.5 → 2 → 4
    assert num_frames(40, 30, VideoConfig(nframes=7)) == 8
    assert num_frames(40, 30, VideoConfig(nframes=5)) == 4


def test_sample_frame_indices_match_exact_rational_rounding():
    for total in range(2, 3000, 37):
        for fps in (1.0, 7.5, 23.976, 30.0, 60.0):
            for cfg in (VideoConfig(), eval_video(64)):
                idx = sample_frame_indices(total, fps, cfg)
                n = len(idx)
                exact = [round(Fraction(j * (total - 1), n - 1)) for j in range(n)]
                assert idx == exact, (total, fps)
                assert n % 2 == 0 and 2 <= n <= min(total, cfg.max_frames)


@pytest.mark.parametrize("total, fps, cfg", [
    (1, 30, None), (0, 30, None), (9, 30, VideoConfig(nframes=10)), (60, 0.0, None), (60, float("nan"), None),
])
def test_sample_frame_indices_rejects(total, fps, cfg):
    with pytest.raises(ValueError):
        sample_frame_indices(total, fps, cfg)


# ------------------------------------------------------------------ sizes


@pytest.mark.parametrize("hw, bounds, expected", [
    ((720, 1280), (TRAIN_MIN, TRAIN_MAX), (224, 420)),  # β = √(921600/105369) = 2.957; 243.5 → 224, 432.8 → 420
    ((1080, 1920), (TRAIN_MIN, TRAIN_MAX), (224, 420)),
    ((1920, 1080), (TRAIN_MIN, TRAIN_MAX), (420, 224)),
    ((480, 640), (TRAIN_MIN, TRAIN_MAX), (280, 364)),   # β = 1.7075; 281.1 → 280, 374.8 → 364
    ((240, 320), (TRAIN_MIN, TRAIN_MAX), (280, 392)),   # 252·308 < min; β = 1.1431; 274.3 → 280, 365.8 → 392
    ((720, 1280), (TRAIN_MIN, 256 * 28 * 28), (336, 588)),  # eval: β = 2.1429; 336 → 336, 597.3 → 588
    ((1080, 1920), (4 * 28 * 28, 256 * 28 * 28), (336, 588)),  # image bounds
    ((700, 1000), (4 * 28 * 28, 256 * 28 * 28), (364, 532)),   # β = 1.8676; 374.8 → 364, 535.4 → 532
    ((20, 30), (4 * 28 * 28, 256 * 28 * 28), (56, 84)),        # 28·28 < 3136; β = 2.286; 45.7 → 56, 68.6 → 84
    ((42, 70), (0, 10 ** 9), (56, 56)),                 # 42/28 = 1.5 → 2, 70/28 = 2.5 → 2 (half to even)
    ((40, 7000), (TRAIN_MIN, TRAIN_MAX), (28, 4284)),   # floor gives 0; kept at 28 (Video-R1's copy: 0)
])
def test_smart_resize_hand_cases(hw, bounds, expected):
    assert smart_resize(*hw, min_pixels=bounds[0], max_pixels=bounds[1]) == expected


def test_smart_resize_rejects_extreme_ratio():
    assert smart_resize(10, 2000, min_pixels=0, max_pixels=10 ** 9) == (28, 1988)  # 200:1 is allowed; 71.4 → 71
    with pytest.raises(ValueError, match="aspect ratio"):
        smart_resize(10, 2010)


def test_smart_resize_matches_transformers():
    hf = pytest.importorskip("transformers.models.qwen2_vl.image_processing_pil_qwen2_vl")
    for lo, hi in ((TRAIN_MIN, TRAIN_MAX), (4 * 28 * 28, 256 * 28 * 28), (TRAIN_MIN, 256 * 28 * 28)):
        for h in range(15, 2200, 37):
            for w in range(15, 2200, 53):
                if max(h, w) / min(h, w) <= 200:
                    assert smart_resize(h, w, min_pixels=lo, max_pixels=hi) == \
                        hf.smart_resize(h, w, factor=28, min_pixels=lo, max_pixels=hi), (h, w, lo, hi)


def test_video_pixel_bounds():
    assert video_pixel_bounds(16) == (TRAIN_MIN, TRAIN_MAX)
    assert video_pixel_bounds(32, eval_video(32)) == (TRAIN_MIN, 256 * 28 * 28)
    # total_pixels / n · 2 = 3e6 / 32 · 2 = 187 500 lies between int(1.05·min) and max_pixels
    assert video_pixel_bounds(32, VideoConfig(total_pixels=3_000_000, max_pixels=256 * 28 * 28)) == \
        (TRAIN_MIN, 187500.0)
    # a tiny total budget never pushes the cap below int(1.05 · min_pixels)
    assert video_pixel_bounds(64, VideoConfig(total_pixels=1_000_000)) == (TRAIN_MIN, TRAIN_MAX)


# ------------------------------------------------------------------ resize


@pytest.mark.parametrize("shape, size, chunk", [((3, 97, 131), (56, 84), None), ((2, 30, 40), (280, 392), None),
                                                ((5, 24, 32), (280, 392), 2)])
def test_resize_frames_is_torchvision_v1_bicubic_antialias(shape, size, chunk):
    g = torch.Generator().manual_seed(sum(shape))
    frames = torch.randint(0, 256, (*shape, 3), dtype=torch.uint8, generator=g)
    out = resize_frames(frames, *size, chunk=chunk)
    assert out.dtype == torch.uint8 and tuple(out.shape) == (shape[0], *size, 3)
    assert torch.equal(out, _tv_resize(frames.numpy(), *size))
    plain = F.interpolate(frames.permute(0, 3, 1, 2).float(), size=size, mode="bicubic", align_corners=False)
    assert not torch.equal(out, plain.clamp(0, 255).round().to(torch.uint8).permute(0, 2, 3, 1))


def test_resize_frames_same_size_is_identity():
    frames = torch.randint(0, 256, (2, 56, 84, 3), dtype=torch.uint8)
    assert resize_frames(frames, 56, 84) is frames


# ------------------------------------------------------------------ real videos


@pytest.mark.parametrize("name, indices, total, fps, size", [
    ("h264", [0, 20, 39, 59], 60, 30.0, (280, 392)),             # 48×64 upscaled to the 100 352 floor
    ("h264_gop", [0, 18, 36, 53, 71, 89], 90, 25.0, (280, 392)),  # 3.6 s → 7.2 → 6; step 17.8
    ("vp9", [0, 15, 29, 44], 45, 24.0, (280, 392)),              # 1.875 s → 3.75 → 4; step 14.67
    ("long", [0, 6, 12, 18, 24, 30, 36, 42, 47, 53, 59, 65, 71, 77, 83, 89], 90, 10.0, (280, 392)),
    ("large", [0, 2, 3, 5], 6, 10.0, (280, 364)),                # 360×480: β = 1.2806 → 280×364
])
def test_read_video_training_settings(videos, name, indices, total, fps, size):
    start = time.perf_counter()
    out = read_video(videos[name])
    assert time.perf_counter() - start < 10
    assert out.indices == tuple(indices) and out.total_frames == total and out.video_fps == pytest.approx(fps)
    assert out.sample_fps == pytest.approx(len(indices) / total * fps)
    assert out.frames.dtype == torch.uint8 and tuple(out.frames.shape) == (len(indices), *size, 3)
    assert [frame_index(f.numpy()) for f in out.frames] == indices
    assert torch.equal(load_video(videos[name]), out.frames)


def test_read_video_eval_settings(videos):
    # 9 s at 2 fps = 18 frames ≤ 32: linspace(0, 89, 18), step 5.235
    out = read_video(videos["long"], eval_video(32))
    assert list(out.indices) == [0, 5, 10, 16, 21, 26, 31, 37, 42, 47, 52, 58, 63, 68, 73, 79, 84, 89]
    assert [frame_index(f.numpy()) for f in out.frames] == list(out.indices)
    # 360×480 fits under 256·28·28 after rounding to 364×476; training shrinks it to 280×364
    assert tuple(read_video(videos["large"], eval_video(32)).frames.shape[1:3]) == (364, 476)


def test_vfr_count_and_fps_come_from_the_index(videos):
    path = videos["vfr"]
    with av.open(str(path)) as c:
        stream = c.streams.video[0]
        avg, nominal = float(stream.average_rate), float(stream.base_rate)
    assert nominal == 30 and 15 < avg < 20  # truly variable: 30 frames at 30 fps, then 30 at 10 fps
    out = read_video(path)
    assert out.total_frames == 60 and out.video_fps == avg
    # 60 / avg · 2 ≈ 7.6 → 6 frames; by position, not time: linspace(0, 59, 6) with step 11.8
    assert list(out.indices) == [0, 12, 24, 35, 47, 59]
    assert [frame_index(f.numpy()) for f in out.frames] == [0, 12, 24, 35, 47, 59]


@pytest.mark.parametrize("name", ["noisy_h264", "noisy_vp9", "h264_gop", "vfr"])
def test_decoded_pixels_equal_sequential_decode_plus_torchvision_resize(videos, name):
    out = read_video(videos[name], VideoConfig(backend="pyav"))
    every = decode_all_frames(videos[name])
    assert len(every) == out.total_frames
    expected = _tv_resize(every[list(out.indices)], *out.frames.shape[1:3])
    assert torch.equal(out.frames, expected)


@pytest.mark.parametrize("suffix", [".h264", ".ts"])
def test_files_without_usable_timestamps_decode_sequentially(tmp_path, suffix):
    # a raw H.264 stream has no pts; seeking in this MPEG-TS overshoots the first frames: both fall back to
    # decoding in order and counting frames
    path = make_indexed_video(tmp_path / f"raw{suffix}", 40, 25, 48, 64)
    out = read_video(path, VideoConfig(backend="pyav"))
    assert out.total_frames == 40 and list(out.indices) == [0, 13, 26, 39]  # 3.2 → 4; linspace(0, 39, 4)
    assert [frame_index(f.numpy()) for f in out.frames] == [0, 13, 26, 39]
    every = decode_all_frames(path)
    assert torch.equal(out.frames, _tv_resize(every[[0, 13, 26, 39]], *out.frames.shape[1:3]))


@pytest.mark.parametrize("rotate, ccw_turns", [(90, 1), (180, 2), (-90, 3)])
def test_rotation_metadata_is_applied(tmp_path, rotate, ccw_turns):
    src = indexed_frames(30, 84, 112)  # multiples of 28 and inside the bounds below: no resize
    path = write_video(tmp_path / f"rot{rotate}.mp4", src, 30, rotate=rotate)
    with av.open(str(path)) as c:
        assert next(c.decode(video=0)).rotation == (rotate + 180) % 360 - 180  # the file carries the matrix
    cfg = VideoConfig(min_pixels=28 * 28, max_pixels=112 * 112, backend="pyav")
    out = read_video(path, cfg)
    assert list(out.indices) == [0, 10, 19, 29]
    upright = np.rot90(src[list(out.indices)], ccw_turns, axes=(1, 2))
    assert out.frames.shape == upright.shape  # 90° and 270° swap H and W
    err = np.abs(out.frames.numpy().astype(np.int64) - upright).mean()
    wrong = np.rot90(upright, 2, axes=(1, 2))
    assert err < 3 < np.abs(out.frames.numpy().astype(np.int64) - wrong).mean()


@pytest.mark.skipif(not decord_available(), reason="decord not installed")
@pytest.mark.parametrize("name", ["noisy_h264", "noisy_vp9", "vfr", "h264_gop"])
def test_pyav_equals_decord(videos, name):
    a = read_video(videos[name], VideoConfig(backend="pyav"))
    b = read_video(videos[name], VideoConfig(backend="decord"))
    assert a.indices == b.indices and a.total_frames == b.total_frames and a.video_fps == b.video_fps
    assert torch.equal(a.frames, b.frames)


@pytest.mark.skipif(not decord_available(), reason="decord not installed")
@pytest.mark.parametrize("rotate", [90, 180, -90])
def test_rotation_equals_decord_on_square_video(tmp_path, rotate):
    # decord 0.6.0's wheel mangles non-square 90°/270° files, so compare on a square one
    path = write_video(tmp_path / "sq.mp4", _noisy(20, 112, 112, seed=rotate % 7), 30, rotate=rotate)
    a = read_video(path, VideoConfig(backend="pyav"))
    b = read_video(path, VideoConfig(backend="decord"))
    assert torch.equal(a.frames, b.frames)


# ------------------------------------------------------------------ images


def test_load_image_rgb_resized_with_pillow_bicubic(tmp_path):
    rgb = _noisy(1, 700, 1000)[0]
    Image.fromarray(rgb).save(tmp_path / "big.png")
    out = load_image(tmp_path / "big.png")
    assert out.dtype == torch.uint8 and tuple(out.shape) == (364, 532, 3)  # see the smart_resize hand case
    expected = np.asarray(Image.fromarray(rgb).resize((532, 364), Image.Resampling.BICUBIC))
    assert np.array_equal(out.numpy(), expected)
    small = _noisy(1, 60, 90, seed=3)[0]  # 60×90 → 56×84
    Image.fromarray(small).save(tmp_path / "small.png")
    expected = np.asarray(Image.fromarray(small).resize((84, 56), Image.Resampling.BICUBIC))
    assert np.array_equal(load_image(tmp_path / "small.png").numpy(), expected)


def test_load_image_alpha_like_qwen_vl_utils(tmp_path):
    rgba = np.zeros((56, 84, 4), np.uint8)  # 56×84: already a valid size, no resize
    rgba[..., :3] = (200, 30, 40)
    rgba[:, :28, 3], rgba[:, 28:56, 3], rgba[:, 56:, 3] = 0, 255, 128
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    out = load_image(tmp_path / "a.png").numpy().astype(np.int64)
    assert (out[:, :28] == 255).all()                          # transparent → white background
    assert (out[:, 28:56] == (200, 30, 40)).all()              # opaque → colour
    blend = (np.array([200, 30, 40]) * 128 + 255 * 127) / 255  # half alpha → blended with white
    assert np.abs(out[:, 56:] - blend).max() <= 1
    la = np.zeros((56, 84, 2), np.uint8)
    la[..., 0], la[..., 1] = 100, 0
    Image.fromarray(la, "LA").save(tmp_path / "la.png")
    assert (load_image(tmp_path / "la.png").numpy() == 100).all()  # non-RGBA: alpha dropped, not composited


# ------------------------------------------------------------------ broken media


@pytest.fixture(scope="module")
def broken(tmp_path_factory):
    return make_broken_media(tmp_path_factory.mktemp("broken"))


@pytest.mark.parametrize("kind", ["zero_byte", "truncated", "garbage", "unknown_codec", "audio_only", "one_frame"])
@pytest.mark.parametrize("backend", ["pyav", "auto", "decord"])
def test_broken_video_raises_media_error_naming_the_file(broken, kind, backend):
    if backend == "decord" and not decord_available():
        pytest.skip("decord not installed")
    start = time.perf_counter()
    with pytest.raises(MediaError) as info:
        load_video(broken[kind], VideoConfig(backend=backend))
    assert time.perf_counter() - start < 5
    assert str(broken[kind]) in str(info.value) and "\n" not in str(info.value)
    assert info.value.path == str(broken[kind])


def test_missing_or_directory_path_raises_media_error(tmp_path):
    for path in (tmp_path / "nope.mp4", tmp_path):
        with pytest.raises(MediaError, match=re.escape(str(path))):
            load_video(path)


def test_decode_timeout_is_a_media_error(videos):
    start = time.perf_counter()
    with pytest.raises(MediaError, match="decode_timeout_s"):
        load_video(videos["h264_gop"], VideoConfig(decode_timeout_s=1e-4))
    assert time.perf_counter() - start < 2


@pytest.mark.skipif(decord_available(), reason="decord is installed")
def test_decord_backend_without_decord_says_so(videos):
    with pytest.raises(ImportError, match="decord"):
        load_video(videos["h264"], VideoConfig(backend="decord"))


@pytest.mark.parametrize("content", [b"", b"\x89PNG\r\n\x1a\n" + bytes(200), bytes(range(256)) * 8])
def test_broken_image_raises_media_error_naming_the_file(tmp_path, content):
    path = tmp_path / "bad.png"
    path.write_bytes(content)
    with pytest.raises(MediaError, match=re.escape(str(path))):
        load_image(path)


def test_truncated_jpeg_raises_media_error(tmp_path):
    Image.fromarray(_noisy(1, 64, 96)[0]).save(tmp_path / "ok.jpg", quality=95)
    data = (tmp_path / "ok.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(MediaError, match="cut.jpg"):
        load_image(tmp_path / "cut.jpg")
    with pytest.raises(MediaError, match="missing.jpg"):
        load_image(tmp_path / "missing.jpg")
