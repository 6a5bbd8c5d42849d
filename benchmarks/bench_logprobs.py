"""Log-prob benchmarks: the fused LM head (policy fwd+bwd, no-grad old/ref pass) and the logits-level gather.

bf16, Qwen2.5-7B head (H=3584, V=152064), N tokens as B=8 sequences of N/8 (``--n``, default 2k, 8k, 16k).
Cases, each with its roofline measured in the same run:
  head_nograd    log-probs from hidden states, no grad (reference/old policy): 2NHV FLOPs vs the cuBLAS rate of
                 [N, H] @ [H, V].
  head_fwd_bwd   log-probs plus backward to hidden and weight: 6NHV useful FLOPs (the fused kernel does 8NHV, it
                 recomputes the logits) vs that cuBLAS rate; ideal extra memory = dX + dW.
  logits_nograd  selective log-softmax of given bf16 logits [N, V]: N·V·2 bytes read vs the d2d copy rate.
Implementations: vr1fast (Triton kernels), torch eager as TRL/Video-R1 compute it (bf16 logits, per-sequence
log_softmax in bf16, gather), vr1fast's chunked torch reference (the CPU path), and liger's Triton
``fused_selective_log_softmax`` (on cuBLAS logits for the head cases) when liger is importable.

    python benchmarks/bench_logprobs.py [--n 2048,8192,16384] [--out benchmarks/results]
"""
from __future__ import annotations

import torch

from _harness import Results, copy_gbps, matmul_tflops, parse_args

H, V, SEQS = 3584, 152064, 8
SMOKE_H, SMOKE_V = 32, 300  # --cpu-smoke shapes


def torch_eager_gather(logits: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """TRL's ``selective_log_softmax`` as Video-R1 runs it: log_softmax per sequence in the logits' dtype, gather.
    logits [B, T, V], index [B, T] → [B, T]."""
    return torch.stack([torch.log_softmax(row, dim=-1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)
                        for row, ids in zip(logits, index)])


def torch_eager_logprobs(hidden: torch.Tensor, weight: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``torch_eager_gather`` on the head's logits in the model dtype (T = 1). hidden [B, T, H], weight [V, H]."""
    return torch_eager_gather(hidden @ weight.T, index)


def liger_selective_log_softmax():
    """liger's Triton logits-level log-prob (takes [B, L+1, V] logits, as a causal LM returns them), or None."""
    try:
        from liger_kernel.ops.grpo_loss import fused_selective_log_softmax
    except ImportError:
        return None
    return fused_selective_log_softmax


def inputs(n: int, h: int, v: int, device: torch.device, grad: bool):
    g = torch.Generator(device=device).manual_seed(0)
    hidden = torch.randn(SEQS, n // SEQS, h, device=device, generator=g, dtype=torch.bfloat16).requires_grad_(grad)
    weight = (torch.randn(v, h, device=device, generator=g, dtype=torch.bfloat16) * h ** -0.5).requires_grad_(grad)
    index = torch.randint(0, v, (SEQS, n // SEQS), device=device, generator=g)
    return hidden, weight, index


def head_cases(res: Results, n: int, h: int, v: int, tflops: float) -> None:
    from vr1fast import kernels

    fused, ref = kernels.implementation("linear_logprobs", "triton"), kernels.implementation("linear_logprobs",
                                                                                              "reference")
    liger = liger_selective_log_softmax()
    shape = dict(N=n, H=h, V=v, dtype="bf16")
    hidden, weight, index = inputs(n, h, v, res.args.device, grad=False)
    eager = dict(vr1fast=lambda: fused(hidden, weight, index), torch_eager=lambda: torch_eager_logprobs(
        hidden, weight, index), vr1fast_reference=lambda: ref(hidden, weight, index))
    if liger is not None:
        eager["liger"] = lambda: liger(torch.cat([hidden, hidden[:, -1:]], 1) @ weight.T, index, 1.0)
    with torch.no_grad():
        for impl, fn in eager.items():
            res.add("head_nograd", impl, shape, fn, work=2 * n * h * v, roofline=tflops)
    hidden.requires_grad_(True)
    weight.requires_grad_(True)
    upstream = torch.randn(SEQS, n // SEQS, device=res.args.device)
    inputs_gib = (hidden.numel() + weight.numel()) * 2 / 2**30

    def fwd_bwd(fn):
        def run():
            hidden.grad = weight.grad = None
            (fn(hidden, weight, index) * upstream).sum().backward()
        return run

    for impl, fn in dict(vr1fast=fused, torch_eager=torch_eager_logprobs, vr1fast_reference=ref).items():
        res.add("head_fwd_bwd", impl, shape, fwd_bwd(fn), work=6 * n * h * v, roofline=tflops,
                inputs_gib=inputs_gib, ideal_gib=inputs_gib)  # the ideal extra memory: dX and dW, inputs' size


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
        liger = liger_selective_log_softmax()
        res.add("logits_nograd", "liger", shape, liger and (lambda: liger(logits, index, 1.0)), work=n * v * 2,
                unit="GB/s", roofline=gbps, note="" if liger else "liger not importable")


def main() -> None:
    args = parse_args(__doc__.splitlines()[0], "2048,8192,16384", "32,64")
    h, v = (SMOKE_H, SMOKE_V) if args.cpu_smoke else (H, V)
    res = Results("logprobs", args)
    gbps = copy_gbps(max(v * max(args.sizes) * 2, 1 << 20), args.device)
    for n in args.sizes:
        tflops = matmul_tflops(n, v, h, torch.bfloat16, args.device)
        head_cases(res, n, h, v, tflops)
        logits_case(res, n, v, gbps)
    print(f"wrote {res.save()}")


if __name__ == "__main__":
    main()
