"""Triton patchify: uint8 frames [T, H, W, 3] → Qwen2.5-VL ``pixel_values`` [gt·gh·gw, 1176] in fp32 or bf16, with
an optional frame permutation read on the fly (the shuffled video needs no second copy of its frames); matches
``reference.patchify_frames`` bit for bit in fp32.

Output row r and column k (the layout of ``vr1fast.data.processor``; gt = ⌈T/2⌉, gh = H/14, gw = W/14):
    t = r / (gh·gw)    bh = (r / (2·gw)) % (gh/2)    bw = (r / 4) % (gw/2)    mh = (r / 2) % 2    mw = r % 2
    k = ((c·2 + dt)·14 + py)·14 + px
    out[r, k] = (F[src(2t + dt), (2bh + mh)·14 + py, (2bw + mw)·14 + px, c] / 255 − mean[c]) / std[c]
    src(i) = perm[min(i, T − 1)]   (identity without perm; an odd T repeats the last frame, as the HF processor pads)
mean/std: OpenAI CLIP's, in fp32. Both divisions round to nearest (``div_rn``), as torch's CPU division does, so fp32
output equals the reference exactly; bf16 output is that fp32 value rounded to nearest even (the interpreter
truncates instead: within 1 bf16 ulp there).

Grid: 1-D, BLOCK_R output rows per program; a program writes, for each of the 6 (c, dt) slices, a [BLOCK_R, 256]
tile of which 196 columns are live (one 14×14 patch per row, contiguous in the output). Reads are byte gathers at
the channel stride 3; 1 byte comes in per 4 (fp32) or 2 (bf16) bytes written, so the kernel is bound by its writes.
uint8 input has no gradient: no ``autograd.Function``. perm is any integer [T] tensor on the frames' device (read as
int32), checked to be a permutation on the CPU only (a GPU check would sync; a bad perm on the GPU reads out of
bounds). Offsets are 32-bit: frames and pixel_values must each hold fewer than 2^31 elements (a 64-frame 720p video
holds 177M).
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from vr1fast.kernels._triton import Launch, check_device
from vr1fast.kernels.reference import check_patchify
from vr1fast.model.qwen import CLIP_MEAN, CLIP_STD, PATCH_DIM, PATCH_SIZE, TEMPORAL_PATCH_SIZE

BLOCK_R = 8     # output rows per program: a [8, 256] tile per (channel, time) slice; 8 warps: 62-64 registers
PATCH_PAD = 256  # 14 × 14 = 196 pixels of one patch, padded to a power of two


@triton.jit
def _patchify_kernel(frames, perm, mean, std, out, N, T, H, W, GH, GW,
                     BLOCK_R: tl.constexpr, HAS_PERM: tl.constexpr, PATCH: tl.constexpr, PAD: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    live = rows < N
    t = rows // (GH * GW)
    y0 = (2 * ((rows // (2 * GW)) % (GH // 2)) + (rows // 2) % 2) * PATCH
    x0 = (2 * ((rows // 4) % (GW // 2)) + rows % 2) * PATCH
    p = tl.arange(0, PAD)
    ok = live[:, None] & (p < PATCH * PATCH)[None, :]
    pixel = (y0[:, None] + p[None, :] // PATCH) * W + x0[:, None] + p[None, :] % PATCH
    dst = out + rows[:, None] * (6 * PATCH * PATCH) + p[None, :]
    for dt in tl.static_range(2):
        f = tl.minimum(2 * t + dt, T - 1)
        if HAS_PERM:
            f = tl.load(perm + f, mask=live, other=0)
        src = frames + (f[:, None] * H * W + pixel) * 3
        for c in tl.static_range(3):
            u = tl.load(src + c, mask=ok, other=0).to(tl.float32)
            v = tl.math.div_rn(tl.math.div_rn(u, 255.0) - tl.load(mean + c), tl.load(std + c))
            tl.store(dst + (c * 2 + dt) * PATCH * PATCH, v.to(out.dtype.element_ty), mask=ok)


@functools.lru_cache(maxsize=None)
def _clip_constants(device: torch.device) -> tuple[Tensor, Tensor]:
    """fp32 CLIP mean and std [3] on ``device``, made once per device (no host copy per call)."""
    return (torch.tensor(CLIP_MEAN, dtype=torch.float32, device=device),
            torch.tensor(CLIP_STD, dtype=torch.float32, device=device))


def patchify_launch(frames: Tensor, perm: Optional[Tensor] = None, dtype: torch.dtype = torch.float32) -> Launch:
    """Launch record writing ``args['out']`` [gt·gh·gw, 1176] ``dtype`` from frames [T, H, W, 3] (checked)."""
    check_patchify(frames, perm, dtype)
    t, h, w, _ = frames.shape
    gt, gh, gw = -(-t // TEMPORAL_PATCH_SIZE), h // PATCH_SIZE, w // PATCH_SIZE
    n = gt * gh * gw
    if frames.numel() >= 2**31 or n * PATCH_DIM >= 2**31:
        raise ValueError(f"patchify: frames {tuple(frames.shape)} need 64-bit offsets (the kernel's are 32-bit): "
                         f"patchify fewer frames at a time")
    mean, std = _clip_constants(frames.device)
    out = torch.empty(n, PATCH_DIM, device=frames.device, dtype=dtype)
    args = dict(frames=frames.contiguous(), perm=mean if perm is None else perm.int().contiguous(), mean=mean,
                std=std, out=out, N=n, T=t, H=h, W=w, GH=gh, GW=gw)
    constexprs = dict(BLOCK_R=BLOCK_R, HAS_PERM=perm is not None, PATCH=PATCH_SIZE, PAD=PATCH_PAD)
    return Launch(_patchify_kernel, (triton.cdiv(n, BLOCK_R),), args, constexprs, num_warps=8, num_stages=1)


def patchify_frames(frames: Tensor, perm: Optional[Tensor] = None, dtype: torch.dtype = torch.float32) -> Tensor:
    """uint8 frames [T, H, W, 3] (CUDA, or CPU under the interpreter) → pixel_values [⌈T/2⌉·H/14·W/14, 1176]."""
    check_device("patchify_frames", frames, *(() if perm is None else (perm,)))
    launch = patchify_launch(frames, perm, dtype)
    launch()
    return launch.args["out"]


def aot_variants() -> list[Launch]:
    """Every constexpr variant (perm or not) in both output dtypes at Video-R1's training frame size."""
    frames = torch.empty(16, 224, 420, 3, device="meta", dtype=torch.uint8)
    perm = torch.empty(16, device="meta", dtype=torch.int32)
    return [patchify_launch(frames, p, dtype) for dtype in (torch.float32, torch.bfloat16) for p in (None, perm)]
