"""One full T-GRPO step of the reference path, timed per stage: data, processor, rollout, reward, ref,
policy_fwd_bwd, optimizer (``vr1fast.train.train_step`` with its stage timer, CUDA-synchronised at stage edges).

GPU: a Qwen2.5-VL-7B-shaped model with random bf16 weights (text 3584 hidden, 18944 MLP, 28 heads / 4 KV heads,
vocab 152064; vision depth 32, hidden 1280), Video-R1's settings (``videor1`` preset: one prompt, 16 frames at
128·28·28 pixels, G = 8 ordered + 4 shuffled completions, 768 new tokens, β = 0.04), one GPU, no sharding, HF
``generate`` rollouts and the pure-torch loss/log-prob reference (``--impl reference``). Completions are forced to
full length: the stop token is a padded vocabulary row the tokenizer never emits (a random model draws it with
probability 1/152064 per token; the mean length is in the note). The policy trains in pure bf16 (AdamW states in
bf16) so that policy, gradients, optimizer and the frozen reference fit one GPU: 28 layers need about 85 GB
(H200); ``--layers`` defaults to 28 when the GPU has 120 GB or more, else 14 (the row says which).
CPU (``--cpu-smoke``): the demo's tiny model and synthetic data, a plumbing check.

Rows (``benchmarks/results/step.csv``): case = stage (and ``step`` for the whole), N = completion tokens per
step, ms p20/p50/p80 over ``--reps`` steps after ``--warmup``; the ``step`` row has the peak memory and
tokens/s (prompt × G + completion tokens per second).

    python benchmarks/bench_step.py [--reps 3] [--warmup 1] [--layers 28] [--impl reference|auto]
    python benchmarks/bench_step.py --cpu-smoke --out /tmp/bench
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import torch

from _harness import ROOT, Results, _sig, percentiles

STAGES = ("data", "processor", "rollout", "reward", "ref", "policy_fwd_bwd", "optimizer")
TEXT_7B = dict(hidden_size=3584, intermediate_size=18944, num_attention_heads=28, num_key_value_heads=4,
               vocab_size=152064, max_position_embeddings=128000, rms_norm_eps=1e-6,
               rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]})
VISION_7B = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584,
                 patch_size=14, temporal_patch_size=2, spatial_merge_size=2, window_size=112,
                 fullatt_block_indexes=[7, 15, 23, 31], tokens_per_second=2, in_channels=3)


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--layers", type=int, default=None, help="text decoder layers of the 7B shape (default: by GPU)")
    p.add_argument("--tokens", type=int, default=768, help="new tokens per completion (Video-R1: 768)")
    p.add_argument("--impl", default="reference", choices=("reference", "auto"), help="loss / log-prob kernels")
    p.add_argument("--out", default=str(ROOT / "results"))
    p.add_argument("--cpu-smoke", action="store_true", help="the demo's tiny model on the CPU: plumbing only")
    args = p.parse_args()
    if not args.cpu_smoke and not torch.cuda.is_available():
        sys.exit("bench_step.py: needs a CUDA GPU (run with --cpu-smoke for a CPU plumbing check)")
    args.device = torch.device("cpu" if args.cpu_smoke else "cuda")
    if args.layers is None and not args.cpu_smoke:
        args.layers = 28 if torch.cuda.get_device_properties(0).total_memory >= 120 * 2**30 else 14
    os.environ["VR1FAST_IMPL"] = args.impl  # model.forward's reference log-probs dispatch on it
    return args


def models_7b(layers: int):
    """(policy, reference, tokenizer): 7B-shaped random bf16 weights on the GPU, the tiny tokenizer's ids."""
    from transformers import Qwen2_5_VLConfig
    from transformers import Qwen2_5_VLForConditionalGeneration as QwenVL

    from vr1fast.model.load import _generation_config, freeze
    from vr1fast.model.tokenizer import build_tiny_tokenizer, token_ids

    tokenizer = build_tiny_tokenizer()
    ids = token_ids(tokenizer)
    config = Qwen2_5_VLConfig(text_config=dict(TEXT_7B, num_hidden_layers=layers, **ids.text_config_kwargs()),
                              vision_config=dict(VISION_7B), tie_word_embeddings=False, **ids.config_kwargs())
    with torch.device("cuda"):
        policy = QwenVL._from_config(config, dtype=torch.bfloat16, attn_implementation="sdpa")
        ref = QwenVL._from_config(config, dtype=torch.bfloat16, attn_implementation="sdpa")
    ref.load_state_dict(policy.state_dict())
    for model in (policy, ref):
        model.generation_config = _generation_config(tokenizer)
        model.generation_config.eos_token_id = [TEXT_7B["vocab_size"] - 1]  # forces full-length completions
    policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return policy, freeze(ref), tokenizer


def config(args, out: Path):
    from vr1fast.config import parse_args

    common = [f"--train.output_dir={out}", "--train.max_steps=1000000", "--train.save_every=1000000",
              "--metrics.jsonl=false", "--metrics.tensorboard=false", "--metrics.plot=false",
              "--metrics.progress_bar=false", f"--loss.impl={args.impl}", "--data.synthetic_size=8",
              f"--data.synthetic_dir={ROOT.parent / 'runs' / 'bench_synthetic'}"]
    if args.cpu_smoke:
        return parse_args(["--preset=demo", *common, "--model.warmstart_steps=0"])  # plumbing only: no warm start
    return parse_args(["--preset=videor1", *common, f"--rollout.max_new_tokens={args.tokens}"])


def main() -> None:
    args = parse()
    from vr1fast.train import build, close, train_step

    with tempfile.TemporaryDirectory() as tmp:
        cfg = config(args, Path(tmp))
        run, state = build(cfg, None if args.cpu_smoke else models_7b(args.layers))
        steps = []
        try:
            for i in range(args.warmup + args.reps):
                if i == args.warmup and args.device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                metrics = train_step(run, state)
                if i >= args.warmup:
                    steps.append(metrics)
        finally:
            close(run)
    peak = torch.cuda.max_memory_allocated() / 2**30 if args.device.type == "cuda" else 0.0
    write_rows(args, cfg, steps, peak)


def write_rows(args, cfg, steps: list[dict], peak_gib: float) -> None:
    res = Results("step", args)
    g, prompts = cfg.rollout.num_generations, cfg.train.prompts_per_rank
    length = sum(s["completion_length"] for s in steps) / len(steps)
    n = int(round(length * g * prompts))
    shape = dict(N=n, H=3584 if not args.cpu_smoke else 64, V=152064 if not args.cpu_smoke else 960,
                 dtype="bf16" if not args.cpu_smoke else "fp32")
    note = (f"layers={args.layers or 2}; G={g}+{cfg.rollout.shuffled_samples()}; max_new_tokens="
            f"{cfg.rollout.max_new_tokens}; mean completion {length:.0f} tokens; {prompts} prompt(s)/GPU, no sharding")
    for case in (*STAGES, "step"):
        q = percentiles([s[f"time/{case}_s"] * 1e3 for s in steps])
        row = dict(bench="step", case=case, impl=f"reference ({args.impl} kernels, HF generate)", **shape,
                   ms_p20=_sig(q[0]), ms_p50=_sig(q[1]), ms_p80=_sig(q[2]), note=note, **res.env)
        if case == "step":
            rate = sum(s["tokens_per_s"] for s in steps) / len(steps)
            row.update(peak_gib=_sig(peak_gib), rate=_sig(rate), unit="tok/s")
        res.rows.append(row)
        print(f"{case:>15}: p50 {q[1]:10.1f} ms", flush=True)
    print(f"saved {res.save()}")


if __name__ == "__main__":
    main()
