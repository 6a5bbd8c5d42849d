"""GRPO loss benchmarks, forward + backward: through the LM head, and on materialised logits.

bf16, Qwen2.5-7B head (H=3584, V=152064), N tokens as B=8 completions of N/8 (``--n``, default 2k, 8k, 16k),
Video-R1's loss (grpo aggregation, β=0.04 with reference log-probs, on-policy ratio, k3 clamped at ±10).
Cases, each with its roofline measured in the same run:
  head_grpo           loss + grads for hidden and weight: 6NHV useful FLOPs vs the rate of the three cuBLAS GEMMs
                      of an unfused head (logits, dX, dW; also a row, "cublas_gemms"). SPEC at N=8192: vr1fast ≥ 80%
                      of that rate, ≥ 1.5× liger, ≥ 1.2× torch eager, inputs + peak ≤ 1.2× (inputs + dW).
  head_grpo_frozen    the same with a frozen head (LoRA): 4NHV vs cuBLAS logits + dX.
  head_grpo_autocast  hidden and weight in fp32 (master weights), the loss under bf16 autocast, as DDP and one GPU
                      train: SPEC: within 10% of vr1fast's head_grpo time (vs_bf16 ≤ 1.1).
  head_grpo_padded    completions padded to the longest, Video-R1's fill (mean ≈ 390 of 768 real tokens): vr1fast
                      packed (``offsets``, real rows only) vs padded vs torch eager (padded, as Video-R1); N = the
                      padded B·T, the rate counts real tokens only (6·n_real·HV).
  logits_grpo         loss + dlogits on given bf16 logits [N, V]: 3·N·V·2 bytes (read fwd, read + write bwd) vs the
                      d2d copy rate.
Implementations: vr1fast's two Triton heads (``vr1fast_chunked``, ``vr1fast_fused``; see bench_logprobs), torch
eager as Video-R1/TRL compute it (bf16 logits, per-sequence bf16 log_softmax + gather, the loss in torch), vr1fast's
chunked torch reference, and when liger is importable ``LigerFusedLinearGRPOLoss`` (head cases; its k3 is unclamped,
equal here) at the float32 matmul precision as set ("liger") and at "high" (TF32, "liger_tf32": liger ≥ 0.8 runs
fp32 matmuls inside, so the setting moves it several-fold; x_liger is against the faster), and its Triton
``triton_grpo_loss`` (logits case, in place, on the [B, L+1, V] logits a causal LM returns).

    python benchmarks/bench_grpo_loss.py [--n 8192,2048,16384] [--max-seconds S] [--out benchmarks/results]
"""
from __future__ import annotations

import torch

from _harness import Results, copy_gbps, parse_args, sizes
from bench_logprobs import SEQS, SMOKE_H, SMOKE_V, H, V, dw_ideal, inputs, liger, torch_eager_gather, \
    torch_eager_logprobs, vr1fast_heads

CFG = dict(beta=0.04, loss_type="grpo", epsilon_low=0.2, epsilon_high=0.2, kl_clamp=10.0)  # Video-R1
# Completion lengths as fractions of the longest (padded) one: mean 0.5075 ≈ 390 / 768, Video-R1's measured fill.
FILL = (1.0, 0.62, 0.55, 0.48, 0.42, 0.37, 0.33, 0.29)


def rollout(n: int, v: int, device: torch.device, lengths=None):
    """mask, advantages, reference log-probs for B=8 completions of n/8 tokens: ragged lengths in [n/16, n/8], or
    the given ``lengths``."""
    g = torch.Generator(device=device).manual_seed(2)
    t = n // SEQS
    if lengths is None:
        lengths = torch.randint(t // 2, t + 1, (SEQS,), device=device, generator=g)
    mask = (torch.arange(t, device=device)[None, :] < lengths[:, None]).float()
    adv = torch.randn(SEQS, device=device, generator=g)
    ref = -torch.rand(SEQS, t, device=device, generator=g) * 5 - 6  # ≈ log(1/V)-scale log-probs
    return mask, adv, ref


def torch_eager_loss(hidden, weight, index, mask, adv, ref):
    from vr1fast.kernels.reference import grpo_loss_from_logprobs

    return grpo_loss_from_logprobs(torch_eager_logprobs(hidden, weight, index), mask, adv, ref, **CFG)[0]


def liger_head_loss(compiled: bool):
    """liger's ``LigerFusedLinearGRPOLoss`` as fn(hidden, weight, index, mask, adv, ref) → loss, or None + why."""
    cls, why = liger("chunked_loss", "LigerFusedLinearGRPOLoss")
    if cls is None:
        return None, why
    module = cls(beta=CFG["beta"], loss_type="grpo", compiled=compiled, use_ref_model=True)
    return (lambda hidden, weight, index, mask, adv, ref: module(hidden, weight, index, mask, adv,
                                                                ref_per_token_logps=ref)[0]), ""


def head_impls() -> dict:
    """impl name → fn(hidden, weight, index, mask, adv, ref) → loss, for the head cases."""
    from vr1fast import kernels

    reference = kernels.implementation("linear_grpo_loss", "reference")
    impls = {name: (lambda *a, fn=fn: fn(*a, **CFG)[0]) for name, fn in vr1fast_heads("linear_grpo_loss").items()}
    return {**impls, "torch_eager": torch_eager_loss, "vr1fast_reference": lambda *a: reference(*a, **CFG)[0]}


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


def backward_of(fn, tensors: tuple, autocast: bool = False):
    """A call: loss = fn(*tensors) (under bf16 autocast of their device if asked), then loss.backward()."""
    def run():
        with torch.autocast(tensors[0].device.type, dtype=torch.bfloat16, enabled=autocast):
            loss = fn(*tensors)
        loss.backward()
    return run


def head_case(res: Results, n: int, h: int, v: int, frozen: bool, runs: dict, roofline: float, why: str = "") -> None:
    """head_grpo (or head_grpo_frozen: LoRA's frozen head) for ``runs`` = impl → (loss fn or None, fp32 matmul
    precision or None); ``why`` is the note of a missing fn."""
    dev = res.args.device
    hidden, weight, index = inputs(n, h, v, dev, grad=True)
    weight.requires_grad_(not frozen)
    tensors = (hidden, weight, index, *rollout(n, v, dev))
    inputs_gib = sum(t.numel() * t.element_size() for t in tensors) / 2**30
    for impl, (fn, precision) in runs.items():
        ideal, ideal_is = (0.0, "nothing (frozen head)") if frozen else dw_ideal(impl, weight)
        res.add("head_grpo_frozen" if frozen else "head_grpo", impl, dict(N=n, H=h, V=v, dtype="bf16"),
                fn and backward_of(fn, tensors), leaves=(hidden, weight), precision=precision,
                work=2 * n * h * v * (2 if frozen else 3), roofline=roofline, inputs_gib=inputs_gib, ideal_gib=ideal,
                ideal_is=ideal_is, note="" if fn else why)


def autocast_case(res: Results, n: int, h: int, v: int, roofline: float) -> None:
    """head_grpo with fp32 hidden and weight (masters) under bf16 autocast."""
    dev = res.args.device
    impls = head_impls()
    hidden, weight, index = inputs(n, h, v, dev, grad=False)
    hidden, weight = (t.float().requires_grad_() for t in (hidden, weight))
    tensors = (hidden, weight, index, *rollout(n, v, dev))
    inputs_gib = sum(t.numel() * t.element_size() for t in tensors) / 2**30
    for impl in (*vr1fast_heads("linear_grpo_loss"), "torch_eager"):
        ideal, ideal_is = dw_ideal(impl, weight)
        res.add("head_grpo_autocast", impl, dict(N=n, H=h, V=v, dtype="fp32+autocast bf16"),
                backward_of(impls[impl], tensors, autocast=True), leaves=(hidden, weight), work=6 * n * h * v,
                roofline=roofline, inputs_gib=inputs_gib, ideal_gib=ideal, ideal_is=ideal_is)


def packed(hidden, index, mask, ref):
    """The padded batch's real rows, packed: hidden [n_real, H], index/mask/ref [n_real], offsets (CPU int64 [B+1])."""
    keep = mask.bool()
    lengths = keep.sum(-1).cpu()
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
    return hidden.detach()[keep].requires_grad_(), index[keep], mask[keep], ref[keep], offsets


def padded_case(res: Results, n: int, h: int, v: int) -> None:
    """head_grpo_padded: Video-R1's fill; vr1fast packed and padded, torch eager padded."""
    dev = res.args.device
    t = n // SEQS
    lengths = torch.tensor([max(1, round(f * t)) for f in FILL], device=dev)
    hidden, weight, index = inputs(n, h, v, dev, grad=True)
    mask, adv, ref = rollout(n, v, dev, lengths)
    p_hidden, p_index, p_mask, p_ref, offsets = packed(hidden, index, mask, ref)
    real = p_index.numel()
    shape = dict(N=n, H=h, V=v, dtype="bf16")
    inputs_gib = sum(x.numel() * x.element_size() for x in (hidden, weight, index, mask, adv, ref)) / 2**30
    impls = head_impls()
    runs = {f"{name}_packed": backward_of(lambda *a, fn=fn: fn(*a, offsets=offsets, **CFG)[0],
                                          (p_hidden, weight, p_index, p_mask, adv, p_ref))
            for name, fn in vr1fast_heads("linear_grpo_loss").items()}
    runs.update({impl: backward_of(impls[impl], (hidden, weight, index, mask, adv, ref))
                 for impl in (*vr1fast_heads("linear_grpo_loss"), "torch_eager")})
    for impl, run in runs.items():
        ideal, ideal_is = dw_ideal(impl, weight)
        res.add("head_grpo_padded", impl, shape, run, leaves=(hidden, p_hidden, weight), work=6 * real * h * v,
                inputs_gib=inputs_gib, ideal_gib=ideal, ideal_is=ideal_is,
                note=f"{real} real of {n} rows ({100 * real / n:.1f}%)")


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
        res.add("logits_grpo", impl, shape, lambda fn=fn: fn().backward(), leaves=(logits,), work=work,
                unit="GB/s", roofline=gbps)
    triton_grpo_loss, why = liger("transformers.grpo_loss", "triton_grpo_loss")
    leaf = full.requires_grad_()

    def liger_loss():
        triton_grpo_loss(leaf, None, ref, index, adv, mask, temperature=1.0, beta=CFG["beta"], eps_low=0.2,
                         eps_high=0.2, inplace=True, loss_type="grpo", reduce=True)[0].backward()

    res.add("logits_grpo", "liger", shape, liger_loss if triton_grpo_loss else None, leaves=(leaf,), work=work,
            unit="GB/s", roofline=gbps, note=why)


def main() -> None:
    args = parse_args(__doc__.splitlines()[0], "2048,8192,16384", "32,64")
    h, v = (SMOKE_H, SMOKE_V) if args.cpu_smoke else (H, V)
    res = Results("grpo_loss", args)
    gbps = copy_gbps(max(v * max(args.sizes) * 2, 1 << 20), args.device)
    ours = {impl: (fn, None) for impl, fn in head_impls().items()}
    liger_loss, why = liger_head_loss(args.device.type == "cuda")
    for n in sizes(args):  # the SPEC's rows first; liger (a first torch.compile per precision) last
        shape = dict(N=n, H=h, V=v, dtype="bf16")
        rate = cublas_row(res, "head_grpo", shape, frozen=False)
        head_case(res, n, h, v, False, ours, rate)
        autocast_case(res, n, h, v, rate)
        padded_case(res, n, h, v)
        logits_case(res, n, v, gbps)
        frozen_rate = cublas_row(res, "head_grpo_frozen", shape, frozen=True)
        head_case(res, n, h, v, True, ours, frozen_rate)
        head_case(res, n, h, v, False, {"liger": (liger_loss, None), "liger_tf32": (liger_loss, "high")}, rate, why)
        head_case(res, n, h, v, True, {"liger": (liger_loss, None)}, frozen_rate, why)
    print(f"wrote {res.save()}")


if __name__ == "__main__":
    main()
