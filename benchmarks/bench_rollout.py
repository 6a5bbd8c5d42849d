"""The rollout engines side by side on the same prompts: ``paged`` (``vr1fast.rollout.engine``: each prompt prefilled
once, its KV pages shared by its samples) against ``hf`` (HF ``generate`` as Video-R1 calls it).

Inputs: the tiny random Qwen2.5-VL (``model.load.tiny_model``, float32) and ``--prompts`` RL prompts built by
``data.processor`` from random frames, videos of 8 and 4 frames and images in turn, ``--samples`` completions per
prompt forced to ``--tokens`` new tokens (the stop id is the last vocabulary row, which the model does not emit),
Video-R1's sampling (T = 1, top-p 0.95, top-k 50), the same seed for both engines.

Rows (``<out>/rollout.csv``, the columns of ``_harness``):
- ``rollout``: one ``generate`` call per engine, ms p20/p50/p80 over ``--reps`` calls after ``--warmup``; N = the
  completion tokens of a call; rate = completion tokens/s at the p50; peak_gib = the growth of the peak during one
  call (CUDA: ``max_memory_allocated``; CPU: the process's peak resident set, VmHWM, reset through
  ``/proc/self/clear_refs`` after ``malloc_trim`` before the call); ``hf/paged`` = the p50 ratio;
- ``prompt_kv_read_per_step``: prompt-KV bytes one decode step reads with every sample running, counted (not
  timed) from the page tables of a block manager holding these prompts: ``paged_cascade`` reads each prompt's pages
  once per step for its whole group (the cascade kernel's layout, part 2), ``paged_per_sample`` once per sample
  (vLLM's and SGLang's paged kernels, and today's pure-torch reference), ``hf`` one copy of the left-padded prompt
  per sample (DynamicCache); rate in MB per step;
- ``prompt_kv_read_per_step_7b``: the same count at Video-R1's shape (Qwen2.5-VL-7B's KV: 28 layers, 4 KV heads
  of 128, bf16; 4 videos × {ordered, shuffled} prompts of 1229 tokens, G = 8 + 4, 16-token pages).
On the CPU the attention of the paged engine is the pure-torch reference (``kernels.reference_paged``): the
timings say how the engine's structure costs on a CPU, not what part 2's kernels will do on a GPU.

    python benchmarks/bench_rollout.py [--prompts 4] [--samples 8] [--tokens 64] [--reps 3] [--warmup 1]
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


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--samples", type=int, default=8, help="completions per prompt (G)")
    p.add_argument("--tokens", type=int, default=64, help="forced new tokens per completion")
    p.add_argument("--page-size", type=int, default=16)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--device", default="cpu", help="cpu (the tiny model's home) or cuda")
    p.add_argument("--out", default=str(ROOT / "results"))
    p.add_argument("--cpu-smoke", action="store_true", help="two prompts, two samples, 8 tokens: plumbing only")
    args = p.parse_args()
    if args.cpu_smoke:
        args.prompts, args.samples, args.tokens, args.reps, args.warmup, args.device = 2, 2, 8, 1, 0, "cpu"
    args.device = torch.device(args.device)
    return args


def prompts(tokenizer, n: int):
    """Model inputs of ``n`` RL prompts on random media (videos of 8 and 4 frames, images), left-padded."""
    from vr1fast.data.dataset import Sample
    from vr1fast.data.processor import build_prompt_batch
    from vr1fast.data.prompts import build_messages

    g = torch.Generator().manual_seed(0)
    messages, media = [], []
    for i in range(n):
        frames = FRAMES[i % len(FRAMES)]
        kind = "video" if frames else "image"
        sample = Sample(i, f"What happens in this {kind}?", ("A. left", "B. right"), "<answer>A</answer>", "A",
                        kind, "multiple choice", f"/in-memory/{i}", None, i, "bench")
        messages.append(build_messages(sample))
        shape = (frames, 224, 224, 3) if frames else (224, 280, 3)
        media.append(torch.randint(0, 256, shape, dtype=torch.uint8, generator=g))
    return build_prompt_batch(tokenizer, messages, media).model_inputs()


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


def main() -> None:
    args = parse()
    from vr1fast.model.load import tiny_model
    from vr1fast.rollout import generate

    model, tokenizer = tiny_model(0)
    model = model.to(args.device).eval()
    inputs = {k: v.to(args.device) for k, v in prompts(tokenizer, args.prompts).items()}
    text = model.config.get_text_config()
    settings = dict(num_samples=args.samples, max_new_tokens=args.tokens, temperature=1.0, top_p=0.95, top_k=50,
                    eos_token_id=text.vocab_size - 1, seed=0, page_size=args.page_size)
    lengths = inputs["attention_mask"].sum(1).tolist()
    n = args.prompts * args.samples * args.tokens
    res = Results("rollout", args)
    res.env["gpu"] = "cpu (tiny model)" if args.device.type == "cpu" and not args.cpu_smoke else res.env["gpu"]
    shape = dict(N=n, H=text.hidden_size, V=text.vocab_size, dtype="fp32")
    note = (f"tiny model; {args.prompts} prompts of {lengths} tokens (padded {inputs['input_ids'].shape[1]}), "
            f"G={args.samples}, {args.tokens} new tokens forced, pages of {args.page_size}; device {args.device}")
    p50 = {}
    for engine in ("hf", "paged"):
        call = lambda engine=engine: generate(model, inputs, engine=engine, **settings)
        out = call()
        assert out.ids.shape == (args.prompts * args.samples, args.tokens), out.ids.shape
        q = timed(call, args.device, args.reps, args.warmup)
        p50[engine] = q[1]
        _row(res, "rollout", engine, shape, q, rate=_sig(n / (q[1] * 1e-3)), unit="tok/s",
             peak_gib=_sig(peak_gib(call, args.device)), note=note)
    _row(res, "rollout", "hf/paged", shape, rate=_sig(p50["hf"] / p50["paged"]), unit="x (p50)", note=note)
    token_bytes = 2 * text.num_hidden_layers * text.num_key_value_heads * (text.hidden_size //
                                                                            text.num_attention_heads) * 4
    _kv_rows(res, "prompt_kv_read_per_step", shape,
             kv_read_per_step(lengths, [args.samples] * len(lengths), inputs["input_ids"].shape[1], args.page_size,
                              token_bytes), note + "; counted from page tables, not timed")
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
