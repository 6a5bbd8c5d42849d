"""Public kernel API: log-probs, the GRPO loss and video patchify, dispatched to Triton or to the pure-torch reference;
the paged attention of the rollout engine through ``implementation(name, device=...)`` (Triton ``attention.py`` on
CUDA, ``reference_paged.py`` elsewhere).

Which implementation runs (per call, from the first tensor argument and ``VR1FAST_IMPL``):
  * ``VR1FAST_IMPL=reference`` → ``kernels/reference.py`` everywhere;
  * ``VR1FAST_IMPL=triton``    → the Triton kernel everywhere (on CPU tensors only under ``TRITON_INTERPRET=1``,
    as the tests run it); a function with no Triton kernel raises;
  * unset / ``auto``           → Triton for CUDA tensors when a kernel is registered, else the reference.
The LM-head functions (``linear_logprobs``, ``linear_grpo_loss``) have two Triton designs (``head``, default
``$VR1FAST_HEAD`` or ``"chunked"``): ``chunked.py`` (cuBLAS logits per chunk of rows, the Triton loss kernels,
cuBLAS dX/dW: 6NHV) and ``fused`` = ``linear_logprob.py`` (split-vocab Triton GEMMs that never hold a logits
chunk, recompute in the backward: 8NHV). The maths, shapes and cfg keys of every function are in
``reference.py``'s docstring.
"""
from __future__ import annotations

import importlib
import os
from typing import Callable, Optional

import torch
from torch import Tensor

from vr1fast.kernels import reference
from vr1fast.kernels.reference import grpo_loss_from_logprobs

IMPLS = ("auto", "reference", "triton")
HEADS = {"chunked": "vr1fast.kernels.chunked", "fused": "vr1fast.kernels.linear_logprob"}

# public name -> module holding its Triton implementation under the same name (imported on first use).
TRITON: dict[str, str] = {
    "selective_log_softmax": "vr1fast.kernels.logprob",
    "grpo_loss": "vr1fast.kernels.grpo",  # not grpo_loss.py: importing it would shadow the function here
    "linear_logprobs": HEADS["chunked"],
    "linear_grpo_loss": HEADS["chunked"],
    "paged_append": "vr1fast.kernels.attention",
    "paged_attention_state": "vr1fast.kernels.attention",
    "cascade_decode_attention": "vr1fast.kernels.attention",
    "prefill_attention": "vr1fast.kernels.prefill",
    "patchify_frames": "vr1fast.kernels.patchify",  # not patchify(): importing patchify.py would shadow it here
}
# public name -> module holding its pure-torch reference when that is not ``reference.py``.
REFERENCE: dict[str, str] = {name: "vr1fast.kernels.reference_paged" for name in (
    "paged_append", "paged_attention_state", "merge_attention_states", "cascade_decode_attention",
    "prefill_attention")}


def implementation(name: str, impl: Optional[str] = None, device: Optional[str] = None,
                   head: Optional[str] = None) -> Callable:
    """The function that implements ``name`` for ``impl`` (default: ``$VR1FAST_IMPL`` or auto) on ``device``;
    ``head`` picks the Triton LM-head design (default ``$VR1FAST_HEAD`` or chunked)."""
    impl = impl or os.environ.get("VR1FAST_IMPL") or "auto"
    if impl not in IMPLS:
        raise ValueError(f"VR1FAST_IMPL / impl {impl!r} is not one of {IMPLS}")
    if impl == "auto":
        impl = "triton" if device == "cuda" and name in TRITON else "reference"
    if impl == "reference":
        return getattr(importlib.import_module(REFERENCE[name]) if name in REFERENCE else reference, name)
    if name not in TRITON:
        raise NotImplementedError(f"vr1fast.kernels.{name} has no Triton implementation")
    module = TRITON[name]
    if name in ("linear_logprobs", "linear_grpo_loss"):
        head = head or os.environ.get("VR1FAST_HEAD") or "chunked"
        if head not in HEADS:
            raise ValueError(f"VR1FAST_HEAD / head {head!r} is not one of {tuple(HEADS)}")
        module = HEADS[head]
    return getattr(importlib.import_module(module), name)


def selective_log_softmax(logits: Tensor, index: Tensor, temperature: float = 1.0, return_entropy: bool = False):
    """fp32 log softmax(logits / T) at ``index`` (and entropy): logits [..., V], index [...]."""
    fn = implementation("selective_log_softmax", device=logits.device.type)
    return fn(logits, index, temperature, return_entropy)


def linear_logprobs(hidden: Tensor, weight: Tensor, index: Tensor, temperature: float = 1.0,
                    return_entropy: bool = False):
    """Log-probs (and entropy) of ``index`` under softmax(hidden @ weight.T / T) without N×V logits."""
    fn = implementation("linear_logprobs", device=hidden.device.type)
    return fn(hidden, weight, index, temperature, return_entropy)


def grpo_loss(logits: Tensor, index: Tensor, mask: Tensor, advantages: Tensor,
              ref_logprobs: Optional[Tensor] = None, old_logprobs: Optional[Tensor] = None, **cfg):
    """GRPO loss on logits [B, T, V] → (loss, metrics)."""
    fn = implementation("grpo_loss", device=logits.device.type)
    return fn(logits, index, mask, advantages, ref_logprobs, old_logprobs, **cfg)


def linear_grpo_loss(hidden: Tensor, weight: Tensor, index: Tensor, mask: Optional[Tensor], advantages: Tensor,
                     ref_logprobs: Optional[Tensor] = None, old_logprobs: Optional[Tensor] = None, **cfg):
    """GRPO loss on hidden [B, T, H] (or packed [N, H] with ``offsets=`` [B+1]) through the LM head weight [V, H]
    → (loss, metrics)."""
    fn = implementation("linear_grpo_loss", device=hidden.device.type)
    return fn(hidden, weight, index, mask, advantages, ref_logprobs, old_logprobs, **cfg)


def patchify_frames(frames: Tensor, perm: Optional[Tensor] = None, dtype: torch.dtype = torch.float32) -> Tensor:
    """uint8 frames [T, H, W, 3] (output frame i = frames[perm[i]]) → Qwen2.5-VL pixel_values [N, 1176] in
    ``dtype``, N = ⌈T/2⌉·H/14·W/14 (an odd T repeats its last frame)."""
    fn = implementation("patchify_frames", device=frames.device.type)
    return fn(frames, perm, dtype)


__all__ = ["selective_log_softmax", "linear_logprobs", "grpo_loss", "linear_grpo_loss", "grpo_loss_from_logprobs",
           "patchify_frames", "implementation", "TRITON"]
