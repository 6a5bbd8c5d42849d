"""The compiled patchify kernel on a CUDA GPU (``kernels.patchify_frames``) against its CPU reference at Video-R1's
training frame size (224×420, 16 and 15 frames), random frames (the GPU image has no PyAV). Run by
scripts/gpu_validate.sh (``--only video``); skipped elsewhere."""
import pytest
import torch

from vr1fast.kernels import patchify
from vr1fast.kernels import reference as ref


def random_frames(seed, t, h, w):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (t, h, w, 3), dtype=torch.uint8, generator=g), torch.randperm(t, generator=g)


@pytest.mark.gpu
@pytest.mark.parametrize("t", [16, 15])
def test_compiled_kernel_at_videor1_shape(t):
    """The compiled kernel at the training frame size equals the CPU reference exactly, in fp32 and in bf16
    (compiled casts round to nearest even, as torch's)."""
    frames, perm = random_frames(t, t, 224, 420)
    for p in (None, perm):
        want = ref.patchify_frames(frames, p)
        cuda_perm = None if p is None else p.cuda()
        assert torch.equal(patchify.patchify_frames(frames.cuda(), cuda_perm).cpu(), want)
        got = patchify.patchify_frames(frames.cuda(), cuda_perm, torch.bfloat16).cpu()
        assert torch.equal(got, want.to(torch.bfloat16))
