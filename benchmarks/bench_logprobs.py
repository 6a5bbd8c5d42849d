"""Log-prob benchmarks: the LM head (policy fwd+bwd, with entropy, no-grad old/ref pass) and the logits-level gather.

bf16, Qwen2.5-7B head (H=3584, V=152064), N tokens as B=8 sequences of N/8 (``--n``, default 2k, 8k, 16k).
Cases, each with its roofline measured in the same run:
  head_nograd    log-probs from hidden states, no grad (reference/old policy): 2NHV FLOPs vs the cuBLAS rate of
                 [N, H] @ [H, V].
  head_fwd_bwd   log-probs plus backward to hidden and weight: 6NHV useful FLOPs vs that cuBLAS rate (the fused
                 head does 8NHV, it recomputes the logits); ideal extra memory = dW (see ``dw_ideal``).
  head_entropy   the same with ``return_entropy=True`` and a gradient through the entropy too.
  logits_nograd  selective log-softmax of given bf16 logits [N, V]: N·V·2 bytes read vs the d2d copy rate
                 (SPEC: vr1fast ≥ 85% of it).
Implementations: vr1fast's two Triton heads (``vr1fast_chunked``: cuBLAS logits per chunk + Triton log-prob kernels;
``vr1fast_fused``: the recompute design), torch eager as TRL/Video-R1 compute it (bf16 logits, per-sequence
log_softmax in bf16, gather; entropy as TRL's ``entropy_from_logits``), vr1fast's chunked torch reference (the CPU
path), and liger's Triton ``fused_selective_log_softmax`` (on cuBLAS logits for the head case) when importable.

    python benchmarks/bench_logprobs.py [--n 8192,2048,16384] [--max-seconds S] [--out benchmarks/results]
"""
from __future__ import annotations

import importlib
from typing import Callable, Optional

import torch

from _harness import Results, copy_gbps, matmul_tflops, parse_args, sizes

H, V, SEQS = 3584, 152064, 8
SMOKE_H, SMOKE_V = 32, 300  # --cpu-smoke shapes
HEADS = ("chunked", "fused")


def vr1fast_heads(name: str) -> dict[str, Callable]:
    """vr1fast's Triton LM heads for ``name`` (linear_logprobs / linear_grpo_loss): impl name → function."""
    from vr1fast import kernels

    return {f"vr1fast_{head}": kernels.implementation(name, "triton", head=head) for head in HEADS}


def dw_ideal(impl: str, weight: torch.Tensor) -> tuple[float, str]:
    """The memory any implementation must add for dW (GiB) and what it is: dW in the weight's dtype, or in fp32 for
    vr1fast's chunked head, which accumulates dW in fp32 across chunks (SPEC's bar then is inputs + fp32 dW)."""
    if impl.startswith("vr1fast_chunked") and weight.dtype != torch.float32:
        return weight.numel() * 4 / 2**30, "dW fp32 (chunked head's accumulator)"
    return weight.numel() * weight.element_size() / 2**30, f"dW {str(weight.dtype).removeprefix('torch.')}"


def torch_eager_gather(logits: torch.Tensor, index: torch.Tensor, return_entropy: bool = False):
    """TRL's ``selective_log_softmax`` as Video-R1 runs it: log_softmax per sequence in the logits' dtype, gather;
    with ``return_entropy`` also TRL's entropy −Σ p·log p from the same log_softmax. logits [B, T, V], index [B, T]."""
    logps, entropies = [], []
    for row, ids in zip(logits, index):
        lsm = torch.log_softmax(row, dim=-1)
        logps.append(lsm.gather(-1, ids.unsqueeze(-1)).squeeze(-1))
        if return_entropy:
            entropies.append(-(lsm.exp() * lsm).sum(-1))
    return (torch.stack(logps), torch.stack(entropies)) if return_entropy else torch.stack(logps)


def torch_eager_logprobs(hidden: torch.Tensor, weight: torch.Tensor, index: torch.Tensor,
                         return_entropy: bool = False):
    """``torch_eager_gather`` on the head's logits in the model dtype (T = 1). hidden [B, T, H], weight [V, H]."""
    return torch_eager_gather(hidden @ weight.T, index, return_entropy)


def liger(module: str, name: str) -> tuple[Optional[Callable], str]:
    """(``liger_kernel.<module>.<name>``, "") or (None, why not): a missing liger, or one whose imports fail against
    this transformers, costs its rows a note, not the run."""
    try:
        return getattr(importlib.import_module(f"liger_kernel.{module}"), name), ""
    except Exception as e:  # noqa: BLE001 — ImportError, or an AttributeError inside liger's own imports
        return None, f"liger not importable: {type(e).__name__}: {str(e).splitlines()[0][:100] if str(e) else ''}"


def liger_selective_log_softmax() -> tuple[Optional[Callable], str]:
    """liger's Triton logits-level log-prob (takes [B, L+1, V] logits, as a causal LM returns them), or None + why."""
    return liger("ops.grpo_loss", "fused_selective_log_softmax")


def inputs(n: int, h: int, v: int, device: torch.device, grad: bool):
    g = torch.Generator(device=device).manual_seed(0)
    hidden = torch.randn(SEQS, n // SEQS, h, device=device, generator=g, dtype=torch.bfloat16).requires_grad_(grad)
    weight = (torch.randn(v, h, device=device, generator=g, dtype=torch.bfloat16) * h ** -0.5).requires_grad_(grad)
    index = torch.randint(0, v, (SEQS, n // SEQS), device=device, generator=g)
    return hidden, weight, index


def head_nograd(res: Results, n: int, h: int, v: int, tflops: float) -> None:
    from vr1fast import kernels

    shape = dict(N=n, H=h, V=v, dtype="bf16")
    hidden, weight, index = inputs(n, h, v, res.args.device, grad=False)
    impls = {**vr1fast_heads("linear_logprobs"), "torch_eager": torch_eager_logprobs,
             "vr1fast_reference": kernels.implementation("linear_logprobs", "reference")}
    gather, why = liger_selective_log_softmax()
    with torch.no_grad():
        for impl, fn in impls.items():
            res.add("head_nograd", impl, shape, lambda fn=fn: fn(hidden, weight, index), work=2 * n * h * v,
                    roofline=tflops)
        res.add("head_nograd", "liger", shape,
                gather and (lambda: gather(torch.cat([hidden, hidden[:, -1:]], 1) @ weight.T, index, 1.0)),
                work=2 * n * h * v, roofline=tflops, note=why)


def head_fwd_bwd(res: Results, n: int, h: int, v: int, tflops: float) -> None:
    """head_fwd_bwd (log-probs only) and head_entropy (log-probs and entropy, both with upstream gradients)."""
    from vr1fast import kernels

    dev = res.args.device
    shape = dict(N=n, H=h, V=v, dtype="bf16")
    hidden, weight, index = inputs(n, h, v, dev, grad=True)
    g = torch.Generator(device=dev).manual_seed(4)
    up_logp, up_ent = (torch.randn(SEQS, n // SEQS, device=dev, generator=g) for _ in range(2))
    inputs_gib = (hidden.numel() + weight.numel()) * 2 / 2**30
    impls = {**vr1fast_heads("linear_logprobs"), "torch_eager": torch_eager_logprobs,
             "vr1fast_reference": kernels.implementation("linear_logprobs", "reference")}

    def logp_only(fn):
        return lambda: (fn(hidden, weight, index) * up_logp).sum().backward()

    def with_entropy(fn):
        def run():
            logp, ent = fn(hidden, weight, index, return_entropy=True)
            (logp * up_logp + ent * up_ent).sum().backward()
        return run

    for case, wrap in (("head_fwd_bwd", logp_only), ("head_entropy", with_entropy)):
        for impl, fn in impls.items():
            ideal, ideal_is = dw_ideal(impl, weight)
            res.add(case, impl, shape, wrap(fn), leaves=(hidden, weight), work=6 * n * h * v, roofline=tflops,
                    inputs_gib=inputs_gib, ideal_gib=ideal, ideal_is=ideal_is)


def logits_case(res: Results, n: int, v: int, gbps: float) -> None:
    from vr1fast import kernels

    shape = dict(N=n, H="", V=v, dtype="bf16")
    g = torch.Generator(device=res.args.device).manual_seed(1)
    logits = torch.randn(SEQS, n // SEQS + 1, v, device=res.args.device, generator=g, dtype=torch.bfloat16)
    index = torch.randint(0, v, (SEQS, n // SEQS), device=res.args.device, generator=g)
    body = logits[:, :-1].contiguous()  # [B, L, V]: what vr1fast and torch get (liger reads [B, L+1, V])
    impls = dict(vr1fast=kernels.implementation("selective_log_softmax", "triton"),
                 torch_eager=torch_eager_gather,
                 vr1fast_reference=kernels.implementation("selective_log_softmax", "reference"))
    with torch.no_grad():
        for impl, fn in impls.items():
            res.add("logits_nograd", impl, shape, lambda fn=fn: fn(body, index), work=n * v * 2, unit="GB/s",
                    roofline=gbps)
        gather, why = liger_selective_log_softmax()
        res.add("logits_nograd", "liger", shape, gather and (lambda: gather(logits, index, 1.0)), work=n * v * 2,
                unit="GB/s", roofline=gbps, note=why)


def main() -> None:
    args = parse_args(__doc__.splitlines()[0], "2048,8192,16384", "32,64")
    h, v = (SMOKE_H, SMOKE_V) if args.cpu_smoke else (H, V)
    res = Results("logprobs", args)
    gbps = copy_gbps(max(v * max(args.sizes) * 2, 1 << 20), args.device)
    for n in sizes(args):
        tflops = matmul_tflops(n, v, h, torch.bfloat16, args.device)
        head_nograd(res, n, h, v, tflops)
        head_fwd_bwd(res, n, h, v, tflops)
        logits_case(res, n, v, gbps)
    print(f"wrote {res.save()}")


if __name__ == "__main__":
    main()
