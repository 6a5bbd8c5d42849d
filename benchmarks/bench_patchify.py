"""Patchify: uint8 video frames on the GPU → Qwen2.5-VL pixel_values, the Triton kernel vs today's torch processor.

N = frames per video (``--n``, default 16, 32, 64: Video-R1's training and eval counts) at the training frame size
224×420 (a 1280×720 source through ``smart_resize`` at 128·28·28 pixels), so pixel_values is [N/2·16·30, 1176].
Cases: ``patchify_fp32`` / ``patchify_bf16`` (the ordered video; bf16 is what the vision tower consumes) and
``shuffled_fp32`` (T-GRPO's shuffled copy: today ``frames[perm]`` then the processor, here the permutation read
inside the kernel). Implementations:
  vr1fast            ``kernels.patchify.patchify_frames`` (Triton)
  torch_eager        ``data.processor.video_to_patches`` on the same device (+ ``.to(bf16)`` / ``frames[perm]``;
                     an odd T padded with its last frame first, as HF's processor does)
  vr1fast_reference  ``kernels.reference.patchify_frames`` (pure torch)
Rate: bytes moved (uint8 frames read + pixel_values written) / time vs the d2d copy rate. Before timing, the
kernel's output is compared with the reference computed on the CPU (exact in fp32; the note says so or gives the
largest difference).

    python benchmarks/bench_patchify.py [--n 16,32,64] [--max-seconds S] [--out benchmarks/results]
"""
from __future__ import annotations

import torch

from _harness import Results, copy_gbps, parse_args, sizes

HEIGHT, WIDTH = 224, 420
SMOKE_HEIGHT, SMOKE_WIDTH = 28, 56


def frames_and_perm(t: int, h: int, w: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(t)
    frames = torch.randint(0, 256, (t, h, w, 3), dtype=torch.uint8, generator=g)
    return frames.to(device), torch.randperm(t, generator=g).to(device)


def agreement(got: torch.Tensor, frames: torch.Tensor, perm, dtype: torch.dtype) -> str:
    """How the kernel's output compares with the reference run on the CPU."""
    from vr1fast.kernels import reference

    want = reference.patchify_frames(frames.cpu(), None if perm is None else perm.cpu(), torch.float32)
    diff = (got.cpu().float() - want).abs().max().item()
    if dtype == torch.float32:
        return "equal to the CPU reference" if diff == 0 else f"max |diff| vs CPU reference {diff:.3g}"
    return f"max |diff| vs CPU fp32 reference {diff:.3g}"


def case(res: Results, name: str, t: int, h: int, w: int, dtype: torch.dtype, shuffled: bool, gbps: float) -> None:
    from vr1fast.data.processor import video_to_patches
    from vr1fast.kernels import patchify, reference

    frames, perm = frames_and_perm(t, h, w, res.args.device)
    perm = perm if shuffled else None
    rows = -(-t // 2) * (h // 14) * (w // 14)
    moved = frames.numel() + rows * 1176 * torch.empty((), dtype=dtype).element_size()
    note = agreement(patchify.patchify_frames(frames, perm, dtype), frames, perm, dtype)

    def eager() -> torch.Tensor:
        x = frames if perm is None else frames[perm]
        x = torch.cat([x, x[-1:]]) if t % 2 else x  # HF's processor repeats the last frame of an odd T
        out = video_to_patches(x)[0]
        return out if dtype == torch.float32 else out.to(dtype)

    impls = {"vr1fast": lambda: patchify.patchify_frames(frames, perm, dtype), "torch_eager": eager,
             "vr1fast_reference": lambda: reference.patchify_frames(frames, perm, dtype)}
    shape = dict(N=t, H=h, V=w, dtype="fp32" if dtype == torch.float32 else "bf16")
    for impl, fn in impls.items():
        res.add(name, impl, shape, fn, work=moved, unit="GB/s", roofline=gbps,
                note=f"{t}x{h}x{w} frames -> [{rows}, 1176]" + (f"; {note}" if impl == "vr1fast" else ""))


def main() -> None:
    args = parse_args(__doc__.splitlines()[0], "16,32,64", "4,3")
    h, w = (SMOKE_HEIGHT, SMOKE_WIDTH) if args.cpu_smoke else (HEIGHT, WIDTH)
    res = Results("patchify", args)
    gbps = copy_gbps(1 << 26 if args.device.type == "cuda" else 1 << 20, args.device)
    with torch.no_grad():
        for t in sizes(args):
            case(res, "patchify_fp32", t, h, w, torch.float32, False, gbps)
            case(res, "patchify_bf16", t, h, w, torch.bfloat16, False, gbps)
            case(res, "shuffled_fp32", t, h, w, torch.float32, True, gbps)
    print(f"wrote {res.save()}")


if __name__ == "__main__":
    main()
