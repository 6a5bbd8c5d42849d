"""Triton patchify (interpreter) against ``reference.patchify_frames``; the reference against today's processor and
the HF image processor on real decoded frames; the sm_90 AOT compile of every variant (registers, no spills)."""
import PIL.Image
import pytest
import torch
from transformers import Qwen2VLImageProcessorPil

from media import make_indexed_video
from poison import poisoned
from vr1fast import kernels
from vr1fast.config import VideoConfig
from vr1fast.data.processor import image_to_patches, video_to_patches
from vr1fast.data.video import load_video
from vr1fast.kernels import patchify
from vr1fast.kernels import reference as ref
from vr1fast.kernels._triton import aot_check

# (T, H, W): odd T (padded by repeating the last frame), odd merge-window counts gh/2, gw/2 and odd gt, one frame.
SHAPES = [(5, 84, 28), (6, 28, 140), (1, 28, 28), (3, 56, 84)]


def random_frames(seed, t, h, w):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (t, h, w, 3), dtype=torch.uint8, generator=g), torch.randperm(t, generator=g)


@pytest.fixture(scope="module")
def real_frames(tmp_path_factory):
    """5 decoded frames of a real H.264 file, resized to 84×84 (gt = 3, gh = gw = 6)."""
    path = make_indexed_video(tmp_path_factory.mktemp("patchify") / "v.mp4", 20, 10, 48, 64)
    frames = load_video(path, VideoConfig(frame_factor=1, nframes=5, min_pixels=28 * 28 * 6, max_pixels=28 * 28 * 6))
    assert frames.shape == (5, 84, 84, 3)
    return frames


def test_reference_is_todays_processor_on_real_frames(real_frames):
    perm = torch.tensor([3, 0, 4, 2, 1])
    even = real_frames[:4]
    assert torch.equal(ref.patchify_frames(even), video_to_patches(even)[0])
    assert torch.equal(ref.patchify_frames(even, perm[perm < 4]), video_to_patches(even[perm[perm < 4]])[0])
    # odd T: HF's processor repeats the last frame (docs: video-decoding.md §2); vr1fast's processor refuses odd T
    shuffled = real_frames[perm]
    padded = torch.cat([shuffled, shuffled[-1:]])
    assert torch.equal(ref.patchify_frames(real_frames, perm), video_to_patches(padded)[0])
    assert torch.equal(ref.patchify_frames(real_frames, perm, torch.bfloat16),
                       video_to_patches(padded)[0].to(torch.bfloat16))


def test_reference_one_frame_is_the_hf_image_processor(real_frames):
    frame = real_frames[2]
    hf = Qwen2VLImageProcessorPil()(images=[PIL.Image.fromarray(frame.numpy())], do_resize=False,
                                     return_tensors="pt")
    assert torch.equal(ref.patchify_frames(frame[None]), hf["pixel_values"])
    assert torch.equal(ref.patchify_frames(frame[None]), image_to_patches(frame)[0])


def truncated_bf16(x):
    """What the interpreter's fp32 → bf16 store gives: the low 16 bits dropped."""
    return (x.view(torch.int32) & -65536).view(torch.float32)


@pytest.mark.parametrize("with_perm", [False, True])
@pytest.mark.parametrize("seed,shape", list(enumerate(SHAPES)))
def test_kernel_equals_reference(seed, shape, with_perm):
    frames, perm = random_frames(seed, *shape)
    perm = perm if with_perm else None
    want = ref.patchify_frames(frames, perm)
    with poisoned():  # outputs start as NaN: an unwritten element fails
        got = patchify.patchify_frames(frames, perm)
        got_bf16 = patchify.patchify_frames(frames, perm, torch.bfloat16)
    assert got.shape == (-(-shape[0] // 2) * shape[1] // 14 * shape[2] // 14, 1176) and got.dtype == torch.float32
    assert torch.equal(got, want)  # exact in fp32
    b = got_bf16.float()
    assert got_bf16.dtype == torch.bfloat16 and torch.isfinite(b).all()
    assert ((b == want.to(torch.bfloat16).float()) | (b == truncated_bf16(want))).all()  # within 1 bf16 ulp


@pytest.mark.parametrize("with_perm", [False, True])
def test_kernel_on_real_frames(real_frames, with_perm):
    perm = torch.tensor([4, 1, 0, 3, 2]) if with_perm else None
    with poisoned():
        got = kernels.implementation("patchify_frames", "triton")(real_frames, perm)
    assert torch.equal(got, ref.patchify_frames(real_frames, perm))


def test_public_function_dispatch(real_frames):
    assert kernels.TRITON["patchify_frames"] == "vr1fast.kernels.patchify"
    assert torch.equal(kernels.patchify_frames(real_frames[:2]), video_to_patches(real_frames[:2])[0])  # CPU: reference


@pytest.mark.parametrize("fn", [ref.patchify_frames, patchify.patchify_frames])
def test_bad_inputs_name_the_argument(fn):
    frames, perm = random_frames(9, 3, 28, 56)
    bad = [((frames.float(),), "uint8"), ((frames[:0],), "uint8"), ((frames[:, :14],), "multiples of 28"),
           ((frames, perm[:2]), r"perm must be an integer \[3\]"), ((frames, perm.float()), "perm must be"),
           ((frames, torch.tensor([0, 0, 2])), "not a permutation"), ((frames, None, torch.float16), "dtype")]
    for args, match in bad:
        with pytest.raises(ValueError, match=match):
            fn(*args)


def test_offsets_over_int32_are_refused():
    frames = torch.empty(2**31 // (224 * 420 * 3) + 1, 224, 420, 3, device="meta", dtype=torch.uint8)
    with pytest.raises(ValueError, match="need 64-bit offsets"):
        patchify.patchify_launch(frames)


def test_aot_compile_sm90():
    results = aot_check("vr1fast.kernels.patchify")
    assert len(results) == len(patchify.aot_variants()) == 4
    for r in results:  # measured: 62 (fp32) and 64 (bf16) registers per thread, no local memory
        assert r["cubin"] > 0 and r["local"] == 0 and r["stack"] == 0 and r["registers"] <= 80, r
