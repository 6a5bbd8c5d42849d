"""GRPO loss benchmarks, forward + backward: through the fused LM head, and on materialised logits.

bf16, Qwen2.5-7B head (H=3584, V=152064), N tokens as B=8 completions of N/8 (``--n``, default 2k, 8k, 16k),
Video-R1's loss (grpo aggregation, β=0.04 with reference log-probs, on-policy ratio, k3 clamped at ±10).
Cases, each with its roofline measured in the same run:
  head_grpo         loss + grads for hidden and weight: 6NHV useful FLOPs (the fused path does 8NHV, it recomputes
                    the logits) vs the rate of the three cuBLAS GEMMs of an unfused head (logits, dX, dW; also a
                    row, "cublas_gemms"); ideal extra memory = dX + dW (SPEC: inputs + peak ≤ 1.2 (inputs + ideal)).
  head_grpo_frozen  the same with a frozen head (LoRA): 4NHV vs cuBLAS logits + dX.
  logits_grpo       loss + dlogits on given bf16 logits [N, V]: 3·N·V·2 bytes (read fwd, read + write bwd) vs the
                    d2d copy rate.
Implementations: vr1fast (Triton), torch eager as Video-R1/TRL compute it (bf16 logits, per-sequence bf16
log_softmax + gather, the loss in torch), vr1fast's chunked torch reference, and when liger is importable
``LigerFusedLinearGRPOLoss`` (head cases; its k3 is unclamped, equal here) and its Triton ``triton_grpo_loss``
(logits case, in place, on the [B, L+1, V] logits a causal LM returns).

    python benchmarks/bench_grpo_loss.py [--n 2048,8192,16384] [--out benchmarks/results]
"""
from __future__ import annotations

import torch

from _harness import Results, copy_gbps, parse_args
from bench_logprobs import SEQS, SMOKE_H, SMOKE_V, H, V, inputs, torch_eager_gather, torch_eager_logprobs

CFG = dict(beta=0.04, loss_type="grpo", epsilon_low=0.2, epsilon_high=0.2, kl_clamp=10.0)  # Video-R1


def rollout(n: int, v: int, device: torch.device):
    """mask (ragged completion lengths), advantages, reference log-probs for B=8 completions of n/8 tokens."""
    g = torch.Generator(device=device).manual_seed(2)
    t = n // SEQS
    lengths = torch.randint(t // 2, t + 1, (SEQS,), device=device, generator=g)
    mask = (torch.arange(t, device=device)[None, :] < lengths[:, None]).float()
    adv = torch.randn(SEQS, device=device, generator=g)
    ref = -torch.rand(SEQS, t, device=device, generator=g) * 5 - 6  # ≈ log(1/V)-scale log-probs
    return mask, adv, ref


def torch_eager_loss(hidden, weight, index, mask, adv, ref):
    from vr1fast.kernels.reference import grpo_loss_from_logprobs

    return grpo_loss_from_logprobs(torch_eager_logprobs(hidden, weight, index), mask, adv, ref, **CFG)[0]


def liger_head_loss(compiled: bool):
    try:
        from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss
    except ImportError:
        return None
    module = LigerFusedLinearGRPOLoss(beta=CFG["beta"], loss_type="grpo", compiled=compiled, use_ref_model=True)
    return lambda hidden, weight, index, mask, adv, ref: module(hidden, weight, index, mask, adv,
                                                               ref_per_token_logps=ref)[0]


def cublas_row(res: Results, case: str, shape: dict, frozen: bool) -> float:
    """Time the unfused head's GEMMs (logits, dX and, unless frozen, dW) as a row; returns their TFLOP/s."""
    n, h, v, dev = shape["N"], shape["H"], shape["V"], res.args.device
    x = torch.randn(n, h, device=dev, dtype=torch.bfloat16)
    w = torch.randn(v, h, device=dev, dtype=torch.bfloat16)
    dz = torch.randn(n, v, device=dev, dtype=torch.bfloat16)
    gemms = [lambda: x @ w.T, lambda: dz @ w] + ([] if frozen else [lambda: dz.T @ x])
    flops = 2 * n * h * v * len(gemms)
    row = res.add(case, "cublas_gemms", shape, lambda: [g() for g in gemms], work=flops)
    return row.get("rate") or 0.0


def head_cases(res: Results, n: int, h: int, v: int) -> None:
    from vr1fast import kernels

    dev = res.args.device
    shape = dict(N=n, H=h, V=v, dtype="bf16")
    fused, reference = (kernels.implementation("linear_grpo_loss", impl) for impl in ("triton", "reference"))
    impls = dict(vr1fast=lambda *a: fused(*a, **CFG)[0], torch_eager=torch_eager_loss,
                 vr1fast_reference=lambda *a: reference(*a, **CFG)[0], liger=liger_head_loss(dev.type == "cuda"))
    for case, frozen in (("head_grpo", False), ("head_grpo_frozen", True)):
        roofline = cublas_row(res, case, shape, frozen)
        hidden, weight, index = inputs(n, h, v, dev, grad=True)
        weight.requires_grad_(not frozen)
        mask, adv, ref = rollout(n, v, dev)
        inputs_gib = sum(t.numel() * t.element_size() for t in (hidden, weight, index, mask, adv, ref)) / 2**30
        ideal = (hidden.numel() + (0 if frozen else weight.numel())) * 2 / 2**30  # dX (+ dW) in bf16

        def fwd_bwd(fn):
            def run():
                hidden.grad = weight.grad = None
                fn(hidden, weight, index, mask, adv, ref).backward()
            return run

        for impl, fn in impls.items():
            res.add(case, impl, shape, fn and fwd_bwd(fn), work=2 * n * h * v * (2 if frozen else 3),
                    roofline=roofline, inputs_gib=inputs_gib, ideal_gib=ideal,
                    note="" if fn else "liger not importable")


def torch_eager_logits_loss(logits, index, mask, adv, ref):
    from vr1fast.kernels.reference import grpo_loss_from_logprobs

    return grpo_loss_from_logprobs(torch_eager_gather(logits, index), mask, adv, ref, **CFG)[0]


def logits_case(res: Results, n: int, v: int, gbps: float) -> None:
    from vr1fast import kernels

    dev = res.args.device
    g = torch.Generator(device=dev).manual_seed(3)
    full = torch.randn(SEQS, n // SEQS + 1, v, device=dev, generator=g, dtype=torch.bfloat16)
    index = torch.randint(0, v, (SEQS, n // SEQS), device=dev, generator=g)
    mask, adv, ref = rollout(n, v, dev)
    logits = full[:, :-1].contiguous().requires_grad_()
    shape, work = dict(N=n, H="", V=v, dtype="bf16"), 3 * n * v * 2
    fused = kernels.implementation("grpo_loss", "triton")
    reference = kernels.implementation("grpo_loss", "reference")
    impls = dict(vr1fast=lambda: fused(logits, index, mask, adv, ref, **CFG)[0],
                 torch_eager=lambda: torch_eager_logits_loss(logits, index, mask, adv, ref),
                 vr1fast_reference=lambda: reference(logits, index, mask, adv, ref, **CFG)[0])
    for impl, fn in impls.items():
        res.add("logits_grpo", impl, shape, lambda fn=fn: (setattr(logits, "grad", None), fn().backward()),
                work=work, unit="GB/s", roofline=gbps)
    try:
        from liger_kernel.transformers.grpo_loss import triton_grpo_loss
    except ImportError:
        triton_grpo_loss = None
    leaf = full.requires_grad_()

    def liger():
        leaf.grad = None
        triton_grpo_loss(leaf, None, ref, index, adv, mask, temperature=1.0, beta=CFG["beta"], eps_low=0.2,
                         eps_high=0.2, inplace=True, loss_type="grpo", reduce=True)[0].backward()

    res.add("logits_grpo", "liger", shape, liger if triton_grpo_loss else None, work=work, unit="GB/s",
            roofline=gbps, note="" if triton_grpo_loss else "liger not importable")


def main() -> None:
    args = parse_args(__doc__.splitlines()[0], "2048,8192,16384", "32,64")
    h, v = (SMOKE_H, SMOKE_V) if args.cpu_smoke else (H, V)
    res = Results("grpo_loss", args)
    gbps = copy_gbps(max(v * max(args.sizes) * 2, 1 << 20), args.device)
    for n in args.sizes:
        head_cases(res, n, h, v)
        logits_case(res, n, v, gbps)
    print(f"wrote {res.save()}")


if __name__ == "__main__":
    main()
