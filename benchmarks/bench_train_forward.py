"""The training forwards side by side on the same T-GRPO batch: ``shared`` (``model.forward.completion_rows(...,
share_prompt=True)``: each prompt laid out once per group, prompt ‖ completion₁ ‖ … ‖ completion_G in one packed
row, ``model.shared``; FlexAttention with a BlockMask on CUDA, SDPA with a dense bool mask on the CPU) against
``repeated`` (``share_prompt=False``: Video-R1's layout, the prompt repeated G times, [B·G, P + L]).

Measured per implementation (``Results.add``: ms p20 / p50 / p80 over ``--reps`` calls after ``--warmup``; peak
memory of one call above what was allocated before it: CUDA ``max_memory_allocated``, CPU the process's peak
resident set as ``bench_rollout.peak_gib`` measures it; rate = decoder tokens per second at the p50):
  policy_fwd_bwd  completion_rows on the policy + ``rl.loss.policy_loss`` (β = 0.04, reference log-probs given)
                  + backward (every parameter's gradient, cleared after each call);
  ref_fwd         the frozen reference under no_grad: completion_rows + ``rl.loss.completion_logprobs``.
and counted (not timed), case ``decoder_tokens`` (unit "tokens"): the tokens the text decoder runs over, shared =
``shared_layout(...).tokens`` = Σ real prompt tokens + Σ (l − 1), repeated = B·G·(P + L) with P the left-padded
prompt width and L the completion width (the longest completion of the batch, as generate pads it).
Each case also gets a ``repeated/shared`` row (rate = the p50 or token ratio) and, where peaks were measured, a
``repeated/shared_peak`` row (rate = the peak ratio).

Inputs. ``--shape 7b`` (CUDA only): Qwen2.5-VL-7B-shaped random bf16 weights (``bench_step.models_7b``: text 3584 /
18944 / 28 and 4 heads, vocab 152064, the full 32-block vision tower; gradient checkpointing on the policy) with
``--layers`` decoder layers; ``--prompts`` videos of 16 random frames at Video-R1's 128·28·28 pixels (≈1.2k prompt
tokens); G = 8; completion lengths drawn N(390, 156²) clipped to [1, 768] (Video-R1's mean ≈ 390, cap 768), random
text tokens. With ``--base-layers`` L0 the same is timed again at L0 layers and the ``*_28L_est`` rows extrapolate
ms and peak linearly in depth to Qwen2.5-VL-7B's 28 layers: t(28) = t(L) + (28 − L)·max(0, t(L) − t(L0))/(L − L0)
(the decoder layers scale; the vision tower, embeddings, head and loss do not). ``--shape tiny``: the tiny random
Qwen2.5-VL (float32) on any device, prompts of videos (8, 4 frames) and images in turn, lengths around
``--mean-tokens`` clipped to ``--max-tokens``. ``--cpu-smoke``: tiny, 2 prompts, G = 2, ≤ 8 tokens: plumbing only.

    python benchmarks/bench_train_forward.py [--shape 7b|tiny] [--layers 4] [--base-layers 1] [--prompts 1]
                                             [--samples 8] [--reps 3] [--warmup 1] [--device cuda|cpu]
    python benchmarks/bench_train_forward.py --cpu-smoke --out /tmp/bench
"""
from __future__ import annotations

import argparse
import sys

import torch

from _harness import ROOT, Results, _sig

FULL_LAYERS = 28
CASES = ("policy_fwd_bwd", "ref_fwd")
IMPLS = {"shared": True, "repeated": False}
LENGTHS_7B = dict(mean=390, cap=768)


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", choices=("tiny", "7b"), default=None, help="default: 7b on cuda, tiny on cpu")
    p.add_argument("--prompts", type=int, default=None, help="prompts B (default: 1 for 7b, 4 for tiny)")
    p.add_argument("--samples", type=int, default=8, help="completions per prompt G")
    p.add_argument("--mean-tokens", type=int, default=None, help="mean completion length (7b: 390; tiny: 32)")
    p.add_argument("--max-tokens", type=int, default=None, help="completion length cap (7b: 768; tiny: 64)")
    p.add_argument("--layers", type=int, default=4, help="7b: text decoder layers")
    p.add_argument("--base-layers", type=int, default=1, help="7b: a second depth for the extrapolation (0: none)")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default=str(ROOT / "results"))
    p.add_argument("--cpu-smoke", action="store_true", help="tiny model, 2 prompts, G = 2, ≤ 8 tokens, on the CPU")
    args = p.parse_args()
    if args.cpu_smoke:
        args.shape, args.device, args.prompts, args.samples = "tiny", "cpu", 2, 2
        args.mean_tokens, args.max_tokens, args.reps, args.warmup = 4, 8, 1, 0
    args.device = torch.device(args.device)
    args.shape = args.shape or ("7b" if args.device.type == "cuda" else "tiny")
    if args.shape == "7b" and (args.device.type != "cuda" or not torch.cuda.is_available()):
        sys.exit("bench_train_forward.py: --shape 7b needs a CUDA GPU (run with --cpu-smoke or --shape tiny for a "
                 "CPU check)")
    if args.shape == "7b" and not 0 <= args.base_layers < args.layers:
        p.error(f"--base-layers {args.base_layers} must be in [0, --layers {args.layers})")
    big = args.shape == "7b"
    args.prompts = args.prompts or (1 if big else 4)
    args.mean_tokens = args.mean_tokens or (LENGTHS_7B["mean"] if big else 32)
    args.max_tokens = args.max_tokens or (LENGTHS_7B["cap"] if big else 64)
    return args


def draw_completions(num: int, mean: int, cap: int, seed: int = 0) -> tuple[torch.Tensor, list[int]]:
    """``num`` completions: lengths N(mean, (0.4·mean)²) rounded and clipped to [1, cap], random text token ids
    [num, L] with L = the longest length (the width generate pads a batch to)."""
    from vr1fast.model.tokenizer import TEXT_VOCAB_SIZE

    g = torch.Generator().manual_seed(seed)
    lengths = (torch.randn(num, generator=g) * 0.4 * mean + mean).round().clamp(1, cap).long().tolist()
    ids = torch.randint(0, TEXT_VOCAB_SIZE, (num, max(lengths)), generator=g)
    return ids, lengths


def build_inputs(shape: str, prompts: int, samples: int, mean: int, cap: int, tokenizer):
    """(prompt model inputs on the CPU, completion ids [B·G, L], lengths [B·G]) for ``shape``, deterministic."""
    from bench_rollout import media_and_messages
    from vr1fast.data.processor import build_prompt_batch

    if shape == "7b":
        from bench_step import random_frames
        from vr1fast.config import videor1

        messages, media = media_and_messages(prompts, random_frames(videor1().video))
    else:
        messages, media = media_and_messages(prompts)
    inputs = build_prompt_batch(tokenizer, messages, media).model_inputs()
    ids, lengths = draw_completions(prompts * samples, mean, cap)
    return inputs, ids, lengths


def decoder_tokens(inputs, ids: torch.Tensor, lengths: list[int], samples: int) -> dict[str, int]:
    """Tokens the text decoder runs over, per layout (module docstring)."""
    from vr1fast.model.shared import shared_layout

    B, P = inputs["input_ids"].shape
    shared = shared_layout(inputs["attention_mask"], ids, lengths, samples, torch.device("cpu")).tokens
    return dict(shared=shared, repeated=B * samples * (P + ids.shape[1]))


def calls(policy, ref, inputs, ids, lengths, samples: int, share: bool, ref_logprobs, advantages, max_len: int):
    """{case: fn} of one implementation (module docstring)."""
    from vr1fast.config import LossConfig
    from vr1fast.model.forward import completion_rows
    from vr1fast.rl.loss import completion_logprobs, policy_loss

    cfg = LossConfig()

    def policy_fwd_bwd():
        rows = completion_rows(policy, inputs, ids, lengths, num_samples=samples, share_prompt=share)
        loss, _ = policy_loss(rows, advantages, ref_logprobs, cfg, max_completion_length=max_len)
        loss.backward()

    def ref_fwd():
        with torch.no_grad():
            rows = completion_rows(ref, inputs, ids, lengths, num_samples=samples, share_prompt=share)
            return completion_logprobs(rows, cfg)

    return dict(policy_fwd_bwd=policy_fwd_bwd, ref_fwd=ref_fwd)


def _cpu_peak(fn, leaves) -> float:
    from bench_rollout import peak_gib

    def call():
        fn()
        for t in leaves:
            t.grad = None
    return peak_gib(call, torch.device("cpu"))


def measure(res: Results, models, batch, args, suffix: str, shape: dict, tokens: dict, note: str) -> dict:
    """Rows of every (case, impl) and their ratios at the models' current depth: {case: {impl: (p50, peak)}};
    rate = decoder tokens per second at the p50."""
    policy, ref = models
    inputs, ids, lengths, ref_logprobs, advantages = batch
    leaves = tuple(p for p in policy.parameters() if p.requires_grad)
    out = {case: {} for case in CASES}
    for impl, share in IMPLS.items():
        fns = calls(policy, ref, inputs, ids, lengths, args.samples, share, ref_logprobs, advantages, ids.shape[1])
        for case, fn in fns.items():
            row = res.add(case + suffix, impl, shape, fn, leaves=leaves if case == "policy_fwd_bwd" else (),
                          unit="decoder tok/s", note=note)
            if row.get("ms_p50", "") != "":
                row["rate"] = _sig(tokens[impl] / (row["ms_p50"] * 1e-3))
                if args.device.type == "cpu":
                    row["peak_gib"] = _sig(_cpu_peak(fn, leaves))
                res.flush()
            out[case][impl] = (row.get("ms_p50") or None, row.get("peak_gib") or None)
    for case in CASES:
        ratio_rows(res, case + suffix, shape, out[case], note)
    return out


def ratio_rows(res: Results, case: str, shape: dict, got: dict, note: str) -> None:
    """``repeated/shared`` (p50) and ``repeated/shared_peak`` rows of one case, where both sides have a value."""
    for k, (impl, unit) in enumerate((("repeated/shared", "x (p50)"), ("repeated/shared_peak", "x (peak)"))):
        a, b = got["repeated"][k], got["shared"][k]
        if a is not None and b:
            _row(res, case, impl, shape, rate=_sig(a / b), unit=unit, note=note)


def _row(res: Results, case: str, impl: str, shape: dict, q=("", "", ""), **extra) -> None:
    row = dict(bench="train_forward", case=case, impl=impl, **shape, ms_p20=q[0] and _sig(q[0]),
               ms_p50=q[1] and _sig(q[1]), ms_p80=q[2] and _sig(q[2]),
               fp32_matmul=torch.get_float32_matmul_precision(), **res.env)
    row.update(extra)
    res.rows.append(row)
    print(" ".join(f"{k}={row[k]}" for k in ("case", "impl", "N", "ms_p50", "peak_gib", "rate", "unit")
                   if row.get(k, "") != ""), flush=True)
    res.flush()


def estimate_rows(res: Results, args, shape: dict, top: dict, base: dict, note: str) -> None:
    """Each case at 28 layers, linear in depth from ``--layers`` and ``--base-layers`` (module docstring)."""
    def at28(t, t0):
        if t is None or t0 is None:
            return None
        return t + (FULL_LAYERS - args.layers) * max(0.0, t - t0) / (args.layers - args.base_layers)

    note = (f"{note}; extrapolated from p50 and peak at {args.layers} and {args.base_layers} layers: x(28) = x(L) "
            f"+ (28-L) x per-layer slope (decoder layers scale; vision tower, embeddings, head, loss fixed)")
    for case in CASES:
        est = {}
        for impl in IMPLS:
            (t, m), (t0, m0) = top[case][impl], base[case][impl]
            est[impl] = (at28(t, t0), at28(m, m0))
            ms, peak = est[impl]
            _row(res, f"{case}_28L_est", impl, shape, ("", ms, ""), peak_gib="" if peak is None else _sig(peak),
                 note=note)
        ratio_rows(res, f"{case}_28L_est", shape, est, note)


def main() -> None:
    args = parse()
    from bench_step import models_7b, models_tiny, set_depth
    from vr1fast.config import LossConfig
    from vr1fast.model.forward import completion_rows
    from vr1fast.rl.loss import completion_logprobs

    if args.shape == "7b":
        policy, ref, tokenizer = models_7b(args.layers, str(args.device))
    else:
        policy, ref, tokenizer = models_tiny()
        policy, ref = policy.to(args.device), ref.to(args.device)
    policy.train()
    inputs, ids, lengths = build_inputs(args.shape, args.prompts, args.samples, args.mean_tokens, args.max_tokens,
                                        tokenizer)
    tokens = decoder_tokens(inputs, ids, lengths, args.samples)
    inputs, ids = {k: v.to(args.device) for k, v in inputs.items()}, ids.to(args.device)
    with torch.no_grad():
        ref_logprobs = completion_logprobs(completion_rows(ref, inputs, ids, lengths, num_samples=args.samples),
                                           LossConfig())
    advantages = torch.randn(len(lengths), generator=torch.Generator().manual_seed(1)).to(args.device)
    batch = (inputs, ids, lengths, ref_logprobs, advantages)

    res = Results("train_forward", args)
    if args.device.type == "cpu" and not args.cpu_smoke:
        res.env["gpu"] = "cpu (tiny model)"
    text = policy.config.get_text_config()
    B, P = inputs["input_ids"].shape
    real = inputs["attention_mask"].sum(1).tolist()
    shape = dict(N=sum(lengths), H=text.hidden_size, V=text.vocab_size, dtype="bf16" if args.shape == "7b" else "fp32")
    note = (f"{args.shape} model ({text.num_hidden_layers} layers); B={B} prompts of {real} real tokens (padded to "
            f"P={P}), G={args.samples}, completion lengths mean {sum(lengths) / len(lengths):.0f} (drawn around "
            f"{args.mean_tokens}, cap {args.max_tokens}), width L={ids.shape[1]}; attention "
            f"{'flex' if args.device.type == 'cuda' else 'dense'} (shared) / {text._attn_implementation} (repeated); "
            f"device {args.device}")
    for impl, n in tokens.items():
        _row(res, "decoder_tokens", impl, shape, rate=n, unit="tokens", note=note + "; counted, not timed")
    _row(res, "decoder_tokens", "repeated/shared", shape, rate=_sig(tokens["repeated"] / tokens["shared"]),
         unit="x", note=note + "; counted, not timed")
    suffix = "" if args.shape == "tiny" else f"_7b_{args.layers}L"
    top = measure(res, (policy, ref), batch, args, suffix, shape, tokens, note)
    if args.shape == "7b" and args.base_layers:
        set_depth((policy, ref), args.base_layers)
        base = measure(res, (policy, ref), batch, args, f"_7b_{args.base_layers}L", shape, tokens,
                       note.replace(f"({args.layers} layers)", f"({args.base_layers} layers)"))
        estimate_rows(res, args, shape, top, base, note)
    print(f"saved {res.save()}")


if __name__ == "__main__":
    main()
