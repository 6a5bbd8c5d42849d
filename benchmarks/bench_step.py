"""One T-GRPO step, side by side in one run on the same inputs: a Video-R1-style step (``videor1_step.py``: HF
generate, prompt and pixels ×G, vision tower ×G, full logits, log-softmax in bf16) against vr1fast's
``vr1fast.train.train_step``, stage by stage (data, processor, rollout, reward, ref, policy_fwd_bwd, optimizer),
each stage CUDA-synchronised at its edges (``metrics.StageTimer``), with tokens/s per GPU (prompt × G + completion
tokens of the step / step time, the convention of verl and EasyR1).

Inputs (both steps): one prompt per step, 16 random uint8 frames at Video-R1's 128·28·28 pixels per frame (a
360×640 source through ``smart_resize``) held in memory (no decoding: ``vr1fast.data.loader.load_media`` is replaced
for the run, and the Video-R1 step reads the same frames), multiple-choice and numerical questions (rewards that
need no rouge), the same sample order and the same ``videor1`` config (G = 8 ordered + 4 shuffled, β = 0.04).

GPU: Qwen2.5-VL-7B-shaped random bf16 weights (text 3584 hidden, 18944 MLP, 28 / 4 heads, vocab 152064; vision
32 blocks of 1280, full depth) with ``--layers`` text decoder layers, shared by both steps (policy, frozen
reference, AdamW with bf16 states). Completions are forced to ``--tokens`` new tokens (the stop token is a padded
vocabulary row the tokenizer never emits). After the ``--layers`` runs, the decoders are cut to
``--base-layers`` and both steps are timed again: the difference is the per-layer time of each stage.

Extrapolation to Qwen2.5-VL-7B (28 layers) and Video-R1's 768 new tokens, per stage and step, from p50s:
  t(28) = t(L) + (28 − L) · max(0, t(L) − t(L0)) / (L − L0)   for rollout, ref, policy_fwd_bwd, optimizer
          (linear in depth: the decoder layers scale, vision tower / embeddings / LM head / sampling do not);
          data, processor and reward do not depend on depth;
  × 768 / tokens for rollout (one decode step per token at a fixed cost per step; the prefill is scaled with
          them and the growth of attention with the context ignored), × (P + 768) / (P + tokens) for ref and
          policy_fwd_bwd (work linear in sequence length: attention's quadratic part is ignored), × 1 for the others.
Both assumptions are applied alike to both steps. Both rollouts are HF generate, so over-scaling the prefill
inflates the same term on both sides and lowers the estimated ratio (conservative for the ≥ 10× target). 768
forced tokens is Video-R1's ceiling (its mean is ~390).

Rows (``<out>/step.csv``): case = stage or ``step`` (N = ordered completion tokens per step, ms p20/p50/p80 over
``--reps`` steps after ``--warmup``), impl = videor1 | vr1fast | ``videor1/vr1fast`` (rate = the p50 ratio);
the ``step`` rows carry peak GiB (above what was resident before the step) and tokens/s; ``step_28L_768tok_est``
rows hold the extrapolated step times, tokens/s and ratio with the SPEC verdict (one step ≥ 10×).
CPU (``--cpu-smoke``): the tiny model (2 layers, cut to 1), a few tokens: plumbing only.

    python benchmarks/bench_step.py [--layers 4] [--base-layers 1] [--tokens 128] [--reps 3] [--warmup 1]
                                    [--max-seconds S]
    python benchmarks/bench_step.py --cpu-smoke --out /tmp/bench
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from _harness import ROOT, Results, _sig, percentiles
from vr1fast.data.dataset import Position
from vr1fast.model.qwen import TEXT_7B, VISION_7B

STAGES = ("data", "processor", "rollout", "reward", "ref", "policy_fwd_bwd", "optimizer")
IMPLS = ("videor1", "vr1fast")
DEPTH_STAGES = ("rollout", "ref", "policy_fwd_bwd", "optimizer")
FULL_LAYERS, FULL_TOKENS, TARGET = 28, 768, 10.0
SOURCE_HW = (360, 640)  # the source video's size before smart_resize
QUESTIONS = (
    dict(problem="In which direction does the red square move?", problem_type="multiple choice",
         options=["A. left", "B. right", "C. up", "D. down"], solution="<answer>B</answer>"),
    dict(problem="How many times does the light flash?", problem_type="numerical", solution="<answer>3</answer>"),
)


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--layers", type=int, default=4, help="text decoder layers of the 7B shape (Qwen2.5-VL-7B: 28)")
    p.add_argument("--base-layers", type=int, default=1, help="second depth for the per-layer slope; 0 = skip")
    p.add_argument("--tokens", type=int, default=None, help="forced new tokens per completion (default 128; smoke 8)")
    p.add_argument("--max-seconds", type=float, default=None,
                   help="start no new repetition after this many seconds of steps (60%% for the --layers depth); "
                        "each depth keeps at least one timed repetition")
    p.add_argument("--out", default=str(ROOT / "results"))
    p.add_argument("--cpu-smoke", action="store_true", help="the tiny model on the CPU: plumbing only")
    args = p.parse_args()
    if not args.cpu_smoke and not torch.cuda.is_available():
        sys.exit("bench_step.py: needs a CUDA GPU (run with --cpu-smoke for a CPU plumbing check)")
    args.device = torch.device("cpu" if args.cpu_smoke else "cuda")
    if args.cpu_smoke:
        args.layers, args.base_layers, args.reps, args.warmup = 2, 1, 1, 0
    args.tokens = args.tokens or (8 if args.cpu_smoke else 128)
    if not 0 <= args.base_layers < args.layers:
        sys.exit(f"bench_step.py: --base-layers {args.base_layers} must be in [0, --layers {args.layers})")
    return args


def _force_full_length(model) -> None:
    """Stop only at the last (padded) vocabulary row, which the tokenizer never emits: completions run to the limit."""
    model.generation_config.eos_token_id = [model.config.get_text_config().vocab_size - 1]


def models_7b(layers: int, device: str = "cuda"):
    """(policy, reference, tokenizer): 7B-shaped random bf16 weights on ``device``, the tiny tokenizer's ids."""
    from transformers import Qwen2_5_VLConfig
    from transformers import Qwen2_5_VLForConditionalGeneration as QwenVL

    from vr1fast.model.load import _generation_config, freeze, resolve_attn
    from vr1fast.model.rope import use_rope_positions
    from vr1fast.model.tokenizer import build_tiny_tokenizer, token_ids
    from vr1fast.model.vision import use_batched_vision_attention

    tokenizer = build_tiny_tokenizer()
    ids = token_ids(tokenizer)
    config = Qwen2_5_VLConfig(text_config=dict(TEXT_7B, num_hidden_layers=layers, **ids.text_config_kwargs()),
                              vision_config=dict(VISION_7B), tie_word_embeddings=False, **ids.config_kwargs())
    attn = resolve_attn("auto", torch.device(device))
    with torch.device(device):
        policy = QwenVL._from_config(config, dtype=torch.bfloat16, attn_implementation=attn)
        ref = QwenVL._from_config(config, dtype=torch.bfloat16, attn_implementation=attn)
    ref.load_state_dict(policy.state_dict())
    for model in (policy, ref):
        model.generation_config = _generation_config(tokenizer)
        _force_full_length(model)
        use_batched_vision_attention(model)
        use_rope_positions(model, "videor1")
    policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return policy, freeze(ref), tokenizer


def models_tiny():
    """(policy, reference, tokenizer): the tiny model twice (same seed), completions forced to full length."""
    from vr1fast.model.load import freeze, tiny_model

    policy, tokenizer = tiny_model(0)
    ref = freeze(tiny_model(0, tokenizer=tokenizer)[0])
    for model in (policy, ref):
        _force_full_length(model)
    return policy, ref, tokenizer


def write_records(folder: Path, n: int = 8) -> Path:
    """``n`` video records (multiple choice and numerical in turn) whose media files are placeholders."""
    records = []
    for i in range(n):
        (folder / f"clip{i}.mp4").write_bytes(b"in-memory frames, never decoded")
        records.append(dict(QUESTIONS[i % len(QUESTIONS)], problem_id=i, data_type="video", path=f"./clip{i}.mp4"))
    path = folder / "records.json"
    path.write_text(json.dumps(records))
    return path


def random_frames(video_cfg) -> torch.Tensor:
    """uint8 [T, H, W, 3]: ``max_frames`` random frames at the size ``smart_resize`` gives a 360×640 source."""
    from vr1fast.data.video import smart_resize, video_pixel_bounds

    t = video_cfg.max_frames
    low, high = video_pixel_bounds(t, video_cfg)
    h, w = smart_resize(*SOURCE_HW, min_pixels=low, max_pixels=high)
    return torch.randint(0, 256, (t, h, w, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))


def config(args, out: Path, records: Path):
    from vr1fast.cli import parse as parse_args

    common = [f"--train.output_dir={out}", "--train.max_steps=1000000", "--train.save_every=1000000",
              "--train.prompts_per_rank=1", "--metrics.jsonl=false", "--metrics.tensorboard=false",
              "--metrics.plot=false", "--metrics.progress_bar=false", f"--data.path={records}",
              f"--rollout.max_new_tokens={args.tokens}"]
    if args.cpu_smoke:
        return parse_args(["--preset=demo", *common, "--model.warmstart_steps=0", "--rollout.num_generations=4",
                           "--rollout.num_shuffled=2"])
    return parse_args(["--preset=videor1", *common])


@contextlib.contextmanager
def frames_from_memory(frames_of: dict):
    """``vr1fast.data.loader.load_media`` returns the in-memory frames of a record's path for the block."""
    import vr1fast.data.loader as loader

    saved = loader.load_media
    loader.load_media = lambda path, data_type, cfg=None, cache=None: frames_of[path]
    try:
        yield
    finally:
        loader.load_media = saved


def set_depth(models, depth: int) -> None:
    """Keep the first ``depth`` text decoder layers of each model (their config says so too)."""
    for model in models:
        text = model.model.language_model
        text.layers = text.layers[:depth]
        cfg = model.config.get_text_config()
        cfg.num_hidden_layers = depth
        if getattr(cfg, "layer_types", None):
            cfg.layer_types = cfg.layer_types[:depth]


def _measured(fn, device: torch.device):
    """(fn(), GiB allocated at the step's peak above what was resident before it, GiB resident before it)."""
    if device.type != "cuda":
        return fn(), None, None
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = fn()
    torch.cuda.synchronize()
    return out, (torch.cuda.max_memory_allocated() - before) / 2**30, before / 2**30


@dataclass
class Baseline:
    """Where the Video-R1-style step stands in the sample stream (it draws the prompts vr1fast's step draws)."""

    position: Position = field(default_factory=Position)
    steps: int = 0


def run_steps(run, state, baseline: Baseline, frames_of: dict, args, deadline: float = math.inf
              ) -> dict[str, list[dict]]:
    """Warm-up + timed steps of both implementations in turn, on the same prompts (the same stream position);
    no new repetition after ``deadline`` (``time.monotonic()``) once one is timed."""
    from videor1_step import videor1_step

    from vr1fast import dist
    from vr1fast.train import train_step

    def ours() -> dict:
        metrics, peak, resident = _measured(lambda: train_step(run, state, timed=True), args.device)
        return dict(seconds={s: metrics[f"time/{s}_s"] for s in STAGES}, length=metrics["completion_length"],
                    tokens=metrics["tokens_per_s"] * metrics["time/step_s"], peak=peak, resident=resident)

    def theirs() -> dict:
        seed = dist.step_seed(run.cfg.train.seed, baseline.steps, 0, 0)
        (res, baseline.position), peak, resident = _measured(
            lambda: videor1_step(run, baseline.position, frames_of, seed), args.device)
        baseline.steps += 1
        return dict(seconds=res.seconds, length=res.completion_length, tokens=res.tokens, peak=peak,
                    resident=resident)

    samples: dict[str, list[dict]] = {impl: [] for impl in IMPLS}
    for i in range(args.warmup + args.reps):
        order = (("vr1fast", ours), ("videor1", theirs)) if i % 2 == 0 else (("videor1", theirs), ("vr1fast", ours))
        step = {impl: fn() for impl, fn in order}  # the order alternates from one repetition to the next
        if i >= args.warmup:
            for impl in IMPLS:
                samples[impl].append(step[impl])
        print(f"layers {len(run.policy.model.model.language_model.layers)}, step {i + 1}/{args.warmup + args.reps}: "
              + ", ".join(f"{impl} {sum(step[impl]['seconds'].values()):.2f} s" for impl in IMPLS), flush=True)
        if i >= args.warmup and time.monotonic() > deadline and i + 1 < args.warmup + args.reps:
            print(f"stopping after {i + 1 - args.warmup} timed repetition(s): over --max-seconds", flush=True)
            break
    return samples


def summarize(samples: dict[str, list[dict]]) -> dict[str, dict[str, tuple[float, ...]]]:
    """impl → case (stages and ``step``) → ms (p20, p50, p80)."""
    out = {}
    for impl, steps in samples.items():
        out[impl] = {s: percentiles([x["seconds"][s] * 1e3 for x in steps]) for s in STAGES}
        out[impl]["step"] = percentiles([sum(x["seconds"].values()) * 1e3 for x in steps])
    return out


def extrapolate(p50: dict[str, float], base_p50: dict[str, float], args, prompt_len: float) -> dict[str, float]:
    """Per-stage ms at 28 layers and 768 tokens from p50s at ``--layers`` and ``--base-layers`` (module docstring)."""
    out = {}
    for stage in STAGES:
        t = p50[stage]
        if stage in DEPTH_STAGES:
            t += (FULL_LAYERS - args.layers) * max(0.0, t - base_p50[stage]) / (args.layers - args.base_layers)
        if stage == "rollout":
            t *= FULL_TOKENS / args.tokens
        elif stage in ("ref", "policy_fwd_bwd"):
            t *= (prompt_len + FULL_TOKENS) / (prompt_len + args.tokens)
        out[stage] = t
    out["step"] = sum(out[s] for s in STAGES)
    return out


def _row(res: Results, case: str, impl: str, shape: dict, q=("", "", ""), **extra) -> dict:
    row = dict(bench="step", case=case, impl=impl, **shape, ms_p20=q[0] and _sig(q[0]), ms_p50=q[1] and _sig(q[1]),
               ms_p80=q[2] and _sig(q[2]), fp32_matmul=torch.get_float32_matmul_precision(), **res.env)
    row.update(extra)
    res.rows.append(row)
    print(" ".join(f"{k}={row[k]}" for k in ("case", "impl", "ms_p50", "rate", "unit") if row.get(k, "") != ""),
          flush=True)
    return row


def _estimate_note(args, prompt_len: float) -> str:
    return (f"extrapolated from p50s at layers={args.layers} and {args.base_layers}, {args.tokens} tokens: rollout, "
            f"ref, policy_fwd_bwd, optimizer + ({FULL_LAYERS}-{args.layers}) x per-layer slope (linear in depth), "
            f"other stages fixed; rollout x {FULL_TOKENS}/{args.tokens} (per-token decode cost fixed, prefill "
            f"included), ref and policy x (P+{FULL_TOKENS})/(P+{args.tokens}) with P={prompt_len:.0f} (linear in "
            f"sequence length; attention's quadratic part ignored)")


def _estimate_rows(res: Results, args, shape: dict, est: dict, prompt_len: float, G: int) -> None:
    """The extrapolated step of each implementation (ms, tokens/s) and their ratio with the SPEC verdict."""
    full, note = dict(shape, N=FULL_TOKENS * G), _estimate_note(args, prompt_len)
    for impl in IMPLS:
        rate = (prompt_len + FULL_TOKENS) * G / (est[impl]["step"] * 1e-3)
        _row(res, "step_28L_768tok_est", impl, full, ("", est[impl]["step"], ""), rate=_sig(rate), unit="tok/s",
             note=note)
    ratio = est["videor1"]["step"] / est["vr1fast"]["step"]
    _row(res, "step_28L_768tok_est", "videor1/vr1fast", full, rate=_sig(ratio), unit="x (p50)",
         note=f"SPEC one T-GRPO step >= {TARGET:g}x the Video-R1-style step: "
              f"{'PASS' if ratio >= TARGET else 'FAIL'}; {note}")


def write_rows(args, run, samples: dict, base: Optional[dict]) -> None:
    """Stage and step rows per implementation, ratio rows, and the extrapolated step rows with the SPEC verdict."""
    res, G = Results("step", args), run.cfg.rollout.num_generations
    length = sum(x["length"] for x in samples["vr1fast"]) / len(samples["vr1fast"])
    tokens = {impl: sum(x["tokens"] for x in steps) / len(steps) for impl, steps in samples.items()}
    prompt_len = (tokens["vr1fast"] - length * G) / G
    shape = dict(N=round(length * G), H=64 if args.cpu_smoke else 3584, V=960 if args.cpu_smoke else 152064,
                 dtype="fp32" if args.cpu_smoke else "bf16")
    q, q0 = summarize(samples), base and summarize(base)
    est = {impl: extrapolate({c: v[1] for c, v in q[impl].items()}, {c: v[1] for c, v in q0[impl].items()},
                             args, prompt_len) for impl in IMPLS} if q0 else None
    resident = max(x["resident"] or 0.0 for steps in samples.values() for x in steps)
    note = (f"{'smoke: tiny model' if args.cpu_smoke else '7B shape'}, layers={args.layers}; G={G}+"
            f"{run.cfg.rollout.shuffled_samples()}; {args.tokens} new tokens forced (mean {length:.0f}); prompt "
            f"{prompt_len:.0f} tokens; 1 prompt/GPU; attention {run.policy.model.config._attn_implementation}; "
            f"{shape['dtype']} weights, AdamW states shared by both steps"
            + (f" ({resident:.1f} GiB resident)" if args.device.type == "cuda" else ""))
    for case in (*STAGES, "step"):
        for impl in IMPLS:
            extra = {"note": note}
            if est:
                extra["note"] += (f"; est {FULL_LAYERS}L/{FULL_TOKENS}tok {est[impl][case]:.4g} ms; p50 at "
                                  f"{args.base_layers} layer(s) {q0[impl][case][1]:.4g} ms")
            if case == "step":
                peak = max((x["peak"] for x in samples[impl] if x["peak"] is not None), default=None)
                extra.update(rate=_sig(tokens[impl] / (q[impl]["step"][1] * 1e-3)), unit="tok/s",
                             peak_gib="" if peak is None else _sig(peak))
            _row(res, case, impl, shape, q[impl][case], **extra)
        _row(res, case, "videor1/vr1fast", shape, rate=_sig(q["videor1"][case][1] / q["vr1fast"][case][1]),
             unit="x (p50)", note=note)
    if est:
        _estimate_rows(res, args, shape, est, prompt_len, G)
    print(f"saved {res.save()}")


def main() -> None:
    args = parse()
    from vr1fast.train import build, close

    with tempfile.TemporaryDirectory() as tmp:
        cfg = config(args, Path(tmp) / "run", write_records(Path(tmp)))
        run, state = build(cfg, models_tiny() if args.cpu_smoke else models_7b(args.layers))
        frames = random_frames(cfg.video)
        frames_of = {s.path: frames for s in run.records.samples}
        baseline, base, start = Baseline(), None, time.monotonic()
        budget = math.inf if args.max_seconds is None else args.max_seconds
        try:
            with frames_from_memory(frames_of):
                samples = run_steps(run, state, baseline, frames_of, args, start + 0.6 * budget)
                if args.base_layers:
                    set_depth((run.policy.model, run.ref.model), args.base_layers)
                    base = run_steps(run, state, baseline, frames_of, args, start + budget)
        finally:
            close(run)
    write_rows(args, run, samples, base)


if __name__ == "__main__":
    main()
