"""The rollout engines side by side on the same T-GRPO prompts: ``paged`` (``vr1fast.rollout.engine``: each prompt
prefilled once, its KV pages shared by its samples, cascade decode, CUDA graphs on a GPU) against ``hf`` (HF
``generate`` as Video-R1 calls it: one call on the ordered prompts, one on the shuffled).

Inputs. ``--shape tiny`` (CPU default): the tiny random Qwen2.5-VL (float32) and ``--prompts`` RL prompts on random
frames (videos of 8 and 4 frames and images in turn). ``--shape 7b`` (GPU default): Qwen2.5-VL-7B-shaped random bf16
weights (``bench_step.models_7b``: text 3584 / 18944 / 28 and 4 heads, vocab 152064, the full 32-block vision tower)
with ``--layers`` decoder layers, and ``--prompts`` videos of 16 random frames at Video-R1's 128·28·28 pixels.
Every video prompt gets a pair-shuffled copy (``data.shuffle``, as training): ``--samples`` G completions per
ordered prompt and G/2 per shuffled one (Video-R1's 8 + 4), forced to ``--tokens`` new tokens (the stop id is the
last vocabulary row, a padded row), Video-R1's sampling (T = 1, top-p 0.95, top-k 50), the same seed throughout.

Implementations (one ``rollout`` call each):
  hf                 ``rollout(engine="hf")``: Video-R1's two HF generate calls;
  paged              the paged engine as training runs it (cascade on, CUDA graphs on a GPU);
  paged_cascade_off  the same with ``cascade=False``: prefix pages shared but read once per sample, what vLLM's
                     prefix cache does (the measurable stand-in for vLLM; a vLLM row only where vLLM is installed);
  paged_eager        the same with ``cuda_graphs=False`` (GPU only): graphs captured per rollout vs eager decoding,
                     the capture cost included: the measurement behind ``rollout.cuda_graphs``'s default.

Rows (``<out>/rollout.csv``, the columns of ``_harness``):
- ``rollout`` (tiny) / ``rollout_7b_<L>L`` (7b): ms p20/p50/p80 over ``--reps`` calls after ``--warmup``; N = the
  completion tokens of a call; rate = completion tokens/s at the p50; peak_gib = the growth of the peak during one
  call (CUDA: ``max_memory_allocated``; CPU: the process's peak resident set, VmHWM, reset through
  ``/proc/self/clear_refs`` after ``malloc_trim``); ``<impl>/paged`` rows = the p50 ratio;
- 7b with ``--base-layers`` L0: the same at L0 layers, and ``rollout_28L_768tok_est``: each implementation's call
  at 28 layers and 768 tokens, t(28) = t(L) + (28 − L)·(t(L) − t(L0))/(L − L0), × 768 / tokens (a fixed cost per
  decode step, the prefill scaled with it; the growth of attention with the context ignored, which favours hf:
  its per-sample prompt copies grow the same way), with tok/s and the ratios (SPEC: paged ≥ 10× hf, > cascade-off);
- ``prompt_kv_read_per_step``: prompt-KV bytes one decode step reads with every sample running, counted (not
  timed) from the page tables of a block manager holding these prompts: ``paged_cascade`` reads each prompt's pages
  once per step for its whole group, ``paged_per_sample`` once per sample (vLLM's and SGLang's paged kernels),
  ``hf`` one copy of the left-padded prompt per sample (DynamicCache); rate in MB per step;
- ``prompt_kv_read_per_step_7b``: the same count at Video-R1's shape (Qwen2.5-VL-7B's KV: 28 layers, 4 KV heads
  of 128, bf16; 4 videos × {ordered, shuffled} prompts of 1229 tokens, G = 8 + 4, 16-token pages).
On the CPU the attention of the paged engine is the pure-torch reference (``kernels.reference_paged``): the CPU
timings say how the engine's structure costs, not what the Triton kernels do on a GPU.

    python benchmarks/bench_rollout.py [--shape tiny|7b] [--prompts 4] [--samples 8] [--tokens 64] [--layers 4]
                                       [--base-layers 1] [--reps 3] [--warmup 1] [--device cpu|cuda]
    python benchmarks/bench_rollout.py --cpu-smoke --out /tmp/bench
"""
from __future__ import annotations

import argparse
import ctypes
import re
from pathlib import Path

import torch

from _harness import ROOT, Results, _sig, sync, timed

KV_7B = dict(layers=28, kv_heads=4, head_dim=128, dtype=torch.bfloat16)
SHAPE_7B = dict(prompts=8, length=1229, samples=(8, 4), page_size=16)
FRAMES = (8, 0, 4, 0)  # video frames per prompt in turn; 0 = an image
FULL_LAYERS, FULL_TOKENS = 28, 768


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", choices=("tiny", "7b"), default=None, help="default: 7b on cuda, tiny on cpu")
    p.add_argument("--prompts", type=int, default=None, help="ordered prompts (default: 4 tiny, 2 7b)")
    p.add_argument("--samples", type=int, default=8, help="completions per ordered prompt (G); G/2 per shuffled")
    p.add_argument("--tokens", type=int, default=64, help="forced new tokens per completion")
    p.add_argument("--layers", type=int, default=4, help="7b: text decoder layers")
    p.add_argument("--base-layers", type=int, default=1, help="7b: a second depth for the extrapolation (0: none)")
    p.add_argument("--page-size", type=int, default=16)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default=str(ROOT / "results"))
    p.add_argument("--cpu-smoke", action="store_true", help="tiny model, two prompts, two samples, 8 tokens")
    args = p.parse_args()
    if args.cpu_smoke:
        args.prompts, args.samples, args.tokens, args.reps, args.warmup, args.device = 2, 2, 8, 1, 0, "cpu"
        args.shape = "tiny"
    args.device = torch.device(args.device)
    args.shape = args.shape or ("7b" if args.device.type == "cuda" else "tiny")
    args.prompts = args.prompts or (2 if args.shape == "7b" else 4)
    if args.shape == "7b" and not 0 <= args.base_layers < args.layers:
        p.error(f"--base-layers {args.base_layers} must be in [0, --layers {args.layers})")
    return args


def media_and_messages(n: int, video_frames: torch.Tensor = None):
    """``n`` RL prompts: videos of 8 and 4 random frames and images in turn (tiny), or ``video_frames`` (7b)."""
    from vr1fast.data.dataset import Sample
    from vr1fast.data.prompts import build_messages

    g = torch.Generator().manual_seed(0)
    messages, media = [], []
    for i in range(n):
        frames = 1 if video_frames is not None else FRAMES[i % len(FRAMES)]
        kind = "video" if frames else "image"
        sample = Sample(i, f"What happens in this {kind}?", ("A. left", "B. right"), "<answer>A</answer>", "A",
                        kind, "multiple choice", f"/in-memory/{i}", None, i, "bench")
        messages.append(build_messages(sample))
        shape = (frames, 224, 224, 3) if frames else (224, 280, 3)
        media.append(video_frames if video_frames is not None else
                     torch.randint(0, 256, shape, dtype=torch.uint8, generator=g))
    return messages, media


def build(args):
    """(model in eval mode on the device, ShufflePair) for ``args.shape``."""
    from vr1fast.data.shuffle import build_shuffle_pair

    if args.shape == "7b":
        from bench_step import models_7b, random_frames
        from vr1fast.config import videor1

        model, _, tokenizer = models_7b(args.layers, str(args.device))
        messages, media = media_and_messages(args.prompts, random_frames(videor1().video))
    else:
        from vr1fast.model.load import tiny_model

        model, tokenizer = tiny_model(0)
        messages, media = media_and_messages(args.prompts)
    pair = build_shuffle_pair(tokenizer, messages, media, torch.Generator().manual_seed(1), mode="pair")
    return model.to(args.device).eval(), pair


def _status(key: str) -> int:
    return int(re.search(key + r":\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1)) * 1024


def peak_gib(fn, device: torch.device) -> float:
    """GiB by which one ``fn()`` raises the peak above what was in use just before it."""
    if device.type == "cuda":
        sync(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        sync(device)
        return (torch.cuda.max_memory_allocated(device) - before) / 2**30
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # freed heap back to the OS, so the call's allocations show
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    before = _status("VmRSS")
    fn()
    return (_status("VmHWM") - before) / 2**30


def kv_read_per_step(lengths, samples, padded: int, page_size: int, token_bytes: int) -> dict[str, float]:
    """Prompt-KV bytes one decode step reads, counted from a block manager's page tables (module docstring)."""
    from vr1fast.rollout.kv_pool import BlockManager, pages_needed

    bm = BlockManager(pages_needed(lengths, samples, 1, page_size), page_size)
    seqs = [bm.allocate(n) for n in lengths]
    forks = [f for s, g in zip(seqs, samples) for f in bm.fork(s, g)]
    page = page_size * token_bytes
    cascade = int((bm.page_table(seqs) >= 0).sum()) * page
    per_sample = sum(len(bm.prefix(f)) for f in forks) * page
    return dict(paged_cascade=cascade, paged_per_sample=per_sample, hf=len(forks) * padded * token_bytes)


def _kv_rows(res: Results, case: str, shape: dict, counts: dict[str, float], note: str) -> None:
    for impl, nbytes in counts.items():
        _row(res, case, impl, shape, rate=_sig(nbytes / 1e6), unit="MB/step", note=note)
    _row(res, case, "hf/paged_cascade", shape, rate=_sig(counts["hf"] / counts["paged_cascade"]), unit="x",
         note=note)


def _row(res: Results, case: str, impl: str, shape: dict, q=("", "", ""), **extra) -> None:
    row = dict(bench="rollout", case=case, impl=impl, **shape, ms_p20=q[0] and _sig(q[0]),
               ms_p50=q[1] and _sig(q[1]), ms_p80=q[2] and _sig(q[2]), fp32_matmul=torch.get_float32_matmul_precision(),
               **res.env)
    row.update(extra)
    res.rows.append(row)
    print(" ".join(f"{k}={row[k]}" for k in ("case", "impl", "N", "ms_p50", "rate", "unit", "peak_gib")
                   if row.get(k, "") != ""), flush=True)


def impls(device: torch.device) -> dict[str, dict]:
    """Implementation name → how ``rollout_call`` runs it (module docstring)."""
    out = {"hf": dict(engine="hf"), "paged": dict(engine="paged"),
           "paged_cascade_off": dict(engine="paged", cascade=False)}
    if device.type == "cuda":
        out["paged_eager"] = dict(engine="paged", cuda_graphs=False)
    return out


def rollout_call(model, pair, args, eos: int, engine: str, **flags):
    """One T-GRPO rollout of the pair: (ordered, shuffled) completions."""
    from vr1fast.config import RolloutConfig
    from vr1fast.rollout import rollout
    from vr1fast.rollout.engine import Sampling, paged_rollout

    ordered, shuffled = pair.ordered.model_inputs(), pair.shuffled.model_inputs()
    ordered, shuffled = ({k: v.to(args.device) for k, v in x.items()} for x in (ordered, shuffled))
    cfg = RolloutConfig(engine=engine, num_generations=args.samples, max_new_tokens=args.tokens, top_k=50,
                        top_p=0.95, temperature=1.0, kv_page_size=args.page_size)
    if engine == "hf":
        out = rollout(model, ordered, shuffled, cfg, eos_token_id=eos, seed=0)
        return out.ordered, out.shuffled
    return paged_rollout(model, ordered, shuffled, num_samples=cfg.num_generations,
                         num_shuffled=cfg.shuffled_samples(), max_new_tokens=cfg.max_new_tokens,
                         sampling=Sampling(cfg.temperature, cfg.top_k, cfg.top_p), eos_token_id=eos, seed=0,
                         page_size=cfg.kv_page_size, video_rows=pair.video_rows, permutations=pair.permutations,
                         **flags)


def time_impls(res: Results, model, pair, args, case: str, shape: dict, note: str) -> dict[str, float]:
    """One row per implementation (and its p50 ratio to paged): the p50 ms of each."""
    eos = model.config.get_text_config().vocab_size - 1
    rows = len(pair.ordered.input_ids) * args.samples + len(pair.video_rows) * (args.samples // 2)
    p50 = {}
    for impl, flags in impls(args.device).items():
        call = lambda flags=flags: rollout_call(model, pair, args, eos, **flags)
        first, second = call()
        assert first.ids.shape[0] + second.ids.shape[0] == rows, (first.ids.shape, second.ids.shape)
        q = timed(call, args.device, args.reps, args.warmup)
        p50[impl] = q[1]
        _row(res, case, impl, shape, q, rate=_sig(shape["N"] / (q[1] * 1e-3)), unit="tok/s",
             peak_gib=_sig(peak_gib(call, args.device)), note=note)
    for impl in p50:
        if impl != "paged":
            _row(res, case, f"{impl}/paged", shape, rate=_sig(p50[impl] / p50["paged"]), unit="x (p50)", note=note)
    return p50


def estimate_rows(res: Results, args, shape: dict, p50: dict, base: dict, note: str) -> None:
    """Each implementation at 28 layers and 768 tokens (module docstring) and its ratio to paged."""
    est = {impl: (t + (FULL_LAYERS - args.layers) * max(0.0, t - base[impl]) / (args.layers - args.base_layers))
           * FULL_TOKENS / args.tokens for impl, t in p50.items()}
    n = shape["N"] * FULL_TOKENS // args.tokens
    note = (f"{note}; extrapolated from p50s at {args.layers} and {args.base_layers} layers, {args.tokens} tokens: "
            f"t(28) = t(L) + (28-L) x per-layer slope, x {FULL_TOKENS}/{args.tokens}")
    for impl, t in est.items():
        _row(res, "rollout_28L_768tok_est", impl, dict(shape, N=n), ("", t, ""), rate=_sig(n / (t * 1e-3)),
             unit="tok/s", note=note)
    for impl, t in est.items():
        if impl != "paged":
            _row(res, "rollout_28L_768tok_est", f"{impl}/paged", dict(shape, N=n), rate=_sig(t / est["paged"]),
                 unit="x (p50)", note=note)


def main() -> None:
    args = parse()
    from bench_step import set_depth

    model, pair = build(args)
    text = model.config.get_text_config()
    lengths = pair.ordered.attention_mask.sum(1).tolist()
    rows = len(lengths) * args.samples + len(pair.video_rows) * (args.samples // 2)
    res = Results("rollout", args)
    res.env["gpu"] = "cpu (tiny model)" if args.device.type == "cpu" and not args.cpu_smoke else res.env["gpu"]
    dtype = "bf16" if args.shape == "7b" else "fp32"
    shape = dict(N=rows * args.tokens, H=text.hidden_size, V=text.vocab_size, dtype=dtype)
    note = (f"{args.shape} model ({text.num_hidden_layers} layers); {len(lengths)} prompts of {lengths} tokens + "
            f"{len(pair.video_rows)} shuffled, G={args.samples}+{args.samples // 2}, {args.tokens} new tokens forced, "
            f"pages of {args.page_size}; device {args.device}")
    case = "rollout" if args.shape == "tiny" else f"rollout_7b_{args.layers}L"
    p50 = time_impls(res, model, pair, args, case, shape, note)
    if args.shape == "7b" and args.base_layers:
        set_depth((model,), args.base_layers)
        base = time_impls(res, model, pair, args, f"rollout_7b_{args.base_layers}L", shape,
                          note.replace(f"({args.layers} layers)", f"({args.base_layers} layers)"))
        estimate_rows(res, args, shape, p50, base, note)
    token_bytes = 2 * text.num_hidden_layers * text.num_key_value_heads * (text.hidden_size //
                                                                            text.num_attention_heads) * 4
    _kv_rows(res, "prompt_kv_read_per_step", shape,
             kv_read_per_step(lengths, [args.samples] * len(lengths), pair.ordered.input_ids.shape[1],
                              args.page_size, token_bytes), note + "; counted from page tables, not timed")
    s7 = SHAPE_7B
    samples = [s7["samples"][i % 2] for i in range(s7["prompts"])]
    bytes_7b = 2 * KV_7B["layers"] * KV_7B["kv_heads"] * KV_7B["head_dim"] * 2
    _kv_rows(res, "prompt_kv_read_per_step_7b", dict(N=sum(samples), H=3584, V=152064, dtype="bf16"),
             kv_read_per_step([s7["length"]] * s7["prompts"], samples, s7["length"], s7["page_size"], bytes_7b),
             "Qwen2.5-VL-7B KV (28 layers, 4 KV heads of 128, bf16); 4 videos x {ordered, shuffled} prompts of "
             "1229 tokens, G = 8 + 4, 16-token pages; counted from page tables, not timed")
    print(f"saved {res.save()}")


if __name__ == "__main__":
    main()
