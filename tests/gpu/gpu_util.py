"""Helpers of the GPU tests (tests/gpu): seeded CUDA inputs and house rule 3's comparison against float64.

House rule 3: a kernel's error against the float64 reference (``reference.py`` on upcast inputs) is at most twice
the error torch gets in the same dtype (the reference run on the same 16-bit inputs), plus ``floor`` where both
are fp32-level (then docs/kernels.md §7.5's absolute bars apply).
"""
from __future__ import annotations

import torch

HEADS = ("chunked", "fused")  # vr1fast.kernels.implementation(..., head=...)
QWEN_H, QWEN_V = 3584, 152064


def gen(seed: int) -> torch.Generator:
    return torch.Generator(device="cuda").manual_seed(seed)


def randn(*shape, seed: int, scale: float = 1.0, dtype=torch.float32) -> torch.Tensor:
    """N(0, scale²) drawn in ``dtype`` itself (no fp32 temporary: some inputs are 4 GB of bf16)."""
    return torch.randn(*shape, generator=gen(seed), device="cuda", dtype=dtype).mul_(scale)


def max_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return (got.double() - want.double()).abs().max().item()


def within_torch(ours, exact, torch_same_dtype, names, floor: float = 0.0) -> None:
    """Each of ``ours`` finite and within 2× torch's error (+ ``floor``) of the float64 ``exact``."""
    for name, got, want, base in zip(names, ours, exact, torch_same_dtype):
        assert torch.isfinite(got).all(), f"{name}: not finite"
        err, torch_err = max_err(got, want), max_err(base, want)
        assert err <= 2 * torch_err + floor, f"{name}: error {err:.3g} > 2 x torch's {torch_err:.3g} + {floor:g}"


def leaves(dtype, *tensors):
    """Fresh leaves requiring grad, cast to ``dtype``."""
    return [t.detach().to(dtype).requires_grad_() for t in tensors]


def head_run(fn, x, w, idx, dtype, upstream, temperature: float = 1.0, **kw):
    """logp, entropy, dX, dW (float64) of a linear_logprobs ``fn`` on (x, w) cast to ``dtype``, with upstream
    gradients (g_logp, g_entropy) applied to both outputs."""
    x, w = leaves(dtype, x, w)
    logp, ent = fn(x, w, idx, temperature, True, **kw)
    (logp.double() * upstream[0] + ent.double() * upstream[1]).sum().backward()
    return [t.detach().double() for t in (logp, ent, x.grad, w.grad)]


def loss_run(fn, batch, dtype, **cfg):
    """loss, dX, dW (float64) of a linear_grpo_loss ``fn`` on batch = (hidden, weight, index, mask, adv, ref, old)
    with hidden and weight cast to ``dtype``."""
    hidden, weight, index, mask, adv, ref, old = batch
    h, w = leaves(dtype, hidden, weight)
    loss, _ = fn(h, w, index, mask, adv, ref, old, **cfg)
    loss.backward()
    return [loss.detach().double(), h.grad.double(), w.grad.double()]


def mixed_prompts(tok, shapes) -> dict[str, torch.Tensor]:
    """CUDA model inputs of three prompts of seeded random frames (the GPU image has no PyAV): a video, an image,
    a video, of the frame ``shapes`` given ([T, H, W, 3], [H, W, 3], [T, H, W, 3])."""
    from vr1fast.data.processor import build_prompt_batch

    g = torch.Generator().manual_seed(0)
    frames = [torch.randint(0, 256, shape, dtype=torch.uint8, generator=g) for shape in shapes]
    questions = (("Which way does the square move?", "video"), ("What colour is it?", "image"),
                 ("Count the flashes.", "video"))
    messages = [[{"role": "user", "content": [{"type": kind}, {"type": "text", "text": q}]}] for q, kind in questions]
    inputs = build_prompt_batch(tok, messages, frames).model_inputs()
    return {k: v.cuda() for k, v in inputs.items()}
