"""Videos to ``pixel_values`` at Video-R1's training settings (at most 16 frames at 2 fps, 128·28·28 pixels each)
on generated H.264 clips, and what prefetching leaves inside the demo's step.

Clips: ``--clips`` files, sizes cycling through 640×360, 960×540 and 1280×720 at 30 fps, lengths spread over
``--seconds LO,HI`` (a scrolling colour pattern with a moving square; libx264 ``ultrafast``, crf 23), written once
under ``--clip-dir`` and reused. The CPU decoder is PyAV (decord where installed: ``video.backend=auto``).

Rows (``<out>/video.csv``, the columns of ``_harness``), case ``to_pixels``: ms p20/p50/p80 of one pass over every
clip (``--reps`` passes), N = clips, rate = videos/s at the p50 (frames/s in the note); each pass turns each clip
into ``pixel_values`` (``vr1fast.data.video.load_media``: decode of the sampled frames and the cubic resize, then
``vr1fast.data.processor.video_to_patches``):
  sync           one clip after the other in this thread (the training step's ``data`` + ``processor`` today);
  prefetch_w<N>  through ``vr1fast.data.prefetch.PromptStream`` with N worker threads (depth 2 micro-batches of one
                 clip), the patches made here as each clip arrives;
  cache_fill     ``data.frame_cache`` on an empty cache (each entry written), one pass;
  cache_hit      the same cache again (a second epoch or run: nothing decoded);
  decord_hf      Video-R1's decord path: a note row where decord is not installed.
Case ``demo_step``: two short runs of the demo (``python -m vr1fast.train``, warm start off, ``--steps`` steps),
synchronous and with ``data.prefetch_workers=2``; per step from step 2 (step 1 has nothing prefetched) the ms of
``time/data_s`` + ``time/processor_s`` (impl ``<arm>_data_processor``) and of the whole step (``<arm>_step``) from
``metrics.jsonl``, p20/p50/p80 over the steps; ``prefetch/sync`` rows: the ratio of the means (target for data +
processor: ≤ 0.10). On a 2-core machine the workers and the rollout share the cores: the step row says what is left.

    python benchmarks/bench_video.py [--clips 6] [--seconds 30,60] [--workers 2] [--reps 2] [--steps 8]
    python benchmarks/bench_video.py --cpu-smoke --out /tmp/bench
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from _harness import ROOT, Results, _sig, timed

SIZES = ((640, 360), (960, 540), (1280, 720))
FPS = 30


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clips", type=int, default=6)
    p.add_argument("--seconds", default="30,60", help="clip lengths, spread from LO to HI seconds")
    p.add_argument("--workers", type=int, default=2, help="prefetch worker threads")
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--steps", type=int, default=8, help="steps of each demo run")
    p.add_argument("--clip-dir", default=str(Path(tempfile.gettempdir()) / "vr1fast_bench_clips"))
    p.add_argument("--out", default=str(ROOT / "results"))
    p.add_argument("--cpu-smoke", action="store_true", help="2 tiny 2-second clips, 1 rep, 2 demo steps")
    args = p.parse_args()
    args.device, args.warmup, args.sizes = torch.device("cpu"), 0, SIZES
    if args.cpu_smoke:
        args.clips, args.seconds, args.reps, args.steps, args.sizes = 2, "2,2", 1, 2, ((128, 72), (160, 96))
    lo, hi = (float(s) for s in args.seconds.split(","))
    args.lengths = [lo + (hi - lo) * i / max(args.clips - 1, 1) for i in range(args.clips)]
    return args


def make_clip(path: Path, seconds: float, width: int, height: int) -> Path:
    """An H.264 clip of ``seconds`` at 30 fps (module docstring); kept if it exists."""
    import av

    if path.exists():
        return path
    tmp = path.with_suffix(".tmp.mp4")
    yy, xx = np.mgrid[0:height, 0:2 * width]
    base = np.stack([xx % 256, yy % 256, (xx + yy) // 3 % 256], -1).astype(np.uint8)
    with av.open(str(tmp), "w") as out:
        stream = out.add_stream("libx264", rate=FPS)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"preset": "ultrafast", "crf": "23"}
        for i in range(int(seconds * FPS)):
            img = base[:, (3 * i) % width:(3 * i) % width + width].copy()
            x = (5 * i) % (width - height // 4)
            img[height // 3:height // 3 + height // 4, x:x + height // 4] = (255, 255, 255)
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    tmp.rename(path)
    return path


def clips(args) -> list[Path]:
    folder = Path(args.clip_dir)
    folder.mkdir(parents=True, exist_ok=True)
    return [make_clip(folder / f"clip{i}_{w}x{h}_{s:.0f}s.mp4", s, w, h)
            for i, (s, (w, h)) in enumerate(zip(args.lengths, [args.sizes[i % len(args.sizes)]
                                                              for i in range(args.clips)]))]


def records(paths: list[Path], folder: Path):
    """The clips as RL records (``vr1fast.data.dataset.load_records``), in file order."""
    from vr1fast.data.dataset import load_records

    items = [{"problem_id": i, "problem": "What moves?", "data_type": "video", "problem_type": "multiple choice",
              "options": ["A. a square", "B. nothing"], "solution": "<answer>A</answer>", "path": str(p)}
             for i, p in enumerate(paths)]
    (folder / "clips.json").write_text(json.dumps(items))
    return load_records(folder / "clips.json")


def to_pixels_rows(res: Results, args, paths: list[Path], work: Path) -> None:
    """The ``to_pixels`` rows (module docstring)."""
    from vr1fast.config import Config
    from vr1fast.data.dataset import Position, Sampler
    from vr1fast.data.frame_cache import FrameCache
    from vr1fast.data.prefetch import PromptStream
    from vr1fast.data.processor import video_to_patches
    from vr1fast.data.video import load_media

    cfg = Config()
    cfg.train = replace(cfg.train, prompts_per_rank=1)
    cfg.data = replace(cfg.data, shuffle=False, prefetch_workers=args.workers, prefetch_depth=2)
    recs, frames = records(paths, work), []

    def sync(cache=None):
        frames[:] = [int(video_to_patches(load_media(p, "video", cfg.video, cache))[1][0]) * 2 for p in paths]

    def prefetch():
        stream, position = PromptStream(recs, Sampler(len(recs), 0, False), cfg, rank=0, world_size=1), Position()
        for i in range(len(recs)):
            _, media, _, position = stream.next_prompts(position, i)
            video_to_patches(media[0])
        stream.close()  # a decode of the next epoch may still run: it finishes here, inside the pass

    cache = FrameCache(work / "cache", 10**12)
    for impl, fn, reps in (("sync", sync, args.reps), (f"prefetch_w{args.workers}", prefetch, args.reps),
                           ("cache_fill", lambda: sync(cache), 1), ("cache_hit", lambda: sync(cache), args.reps)):
        q = timed(fn, args.device, reps, args.warmup if impl != "cache_hit" else 0)
        videos_s = len(paths) / (q[1] * 1e-3)
        _row(res, "to_pixels", impl, len(paths), q, rate=_sig(videos_s), unit="videos/s",
             note=f"{_sig(videos_s * sum(frames) / len(frames))} frames/s; {_clip_note(args, frames)}")
    note = "decord is not installed here" if _absent("decord") else "decord + HF processor: not measured yet"
    _row(res, "to_pixels", "decord_hf", len(paths), note=note)


def _absent(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is None


def _clip_note(args, frames: list[int]) -> str:
    sizes = sorted({f"{w}x{h}" for w, h in args.sizes[:args.clips]})
    return (f"{args.clips} H.264 clips {args.lengths[0]:.0f}-{args.lengths[-1]:.0f} s at {FPS} fps, "
            f"{'/'.join(sizes)}; {frames[0] if frames else '?'} frames each at <= 128*28*28 px; PyAV decode, "
            f"{torch.get_num_threads()} torch threads, {args.workers} prefetch workers")


def demo_run(args, out: Path, workers: int) -> list[dict]:
    """``metrics.jsonl`` rows of a short demo run (module docstring), step 1 left out."""
    argv = [sys.executable, "-m", "vr1fast.train", "--model.warmstart_steps=0", f"--train.max_steps={args.steps}",
            "--eval.final=false", f"--train.output_dir={out}", f"--data.synthetic_dir={out.parent / 'synthetic'}",
            "--metrics.progress_bar=false", "--metrics.plot=false", "--metrics.tensorboard=false",
            "--train.save_every=1000", f"--data.prefetch_workers={workers}"]
    if args.cpu_smoke:
        argv += ["--rollout.max_new_tokens=8", "--data.synthetic_size=8"]
    proc = subprocess.run(argv, cwd=ROOT.parent, capture_output=True, text=True, timeout=900)
    if proc.returncode:
        raise SystemExit(f"bench_video: the demo run failed: {proc.stderr[-2000:]}")
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][1:]


def demo_rows(res: Results, args, work: Path) -> None:
    """The ``demo_step`` rows (module docstring)."""
    arms = {"sync": 0, f"prefetch_w{args.workers}": args.workers}
    means: dict[str, dict[str, float]] = {}
    for arm, workers in arms.items():
        rows = demo_run(args, work / f"demo_{arm}", workers)
        per = {"data_processor": [1e3 * (r["time/data_s"] + r["time/processor_s"]) for r in rows],
               "step": [1e3 * r["time/step_s"] for r in rows]}
        means[arm] = {k: statistics.fmean(v) for k, v in per.items()}
        for what, ms in per.items():
            q = np.percentile(ms, [20, 50, 80]).tolist()
            _row(res, "demo_step", f"{arm}_{what}", len(ms), q, rate=_sig(means[arm][what]), unit="ms (mean)",
                 note=f"demo (8 frames at 8*28*28 px, tiny model, warm start off), steps 2..{args.steps}; "
                      f"2 cores shared by the workers and the rollout" if not args.cpu_smoke else "smoke")
    sync, pre = means["sync"], means[f"prefetch_w{args.workers}"]
    for what in sync:
        ratio = pre[what] / sync[what]
        verdict = f"; target <= 0.10: {'PASS' if ratio <= 0.10 else 'FAIL'}" if what == "data_processor" else ""
        _row(res, "demo_step", f"prefetch/sync_{what}", args.steps - 1, rate=_sig(ratio), unit="x (mean)",
             note=f"mean ms {pre[what]:.1f} / {sync[what]:.1f}{verdict}")


def _row(res: Results, case: str, impl: str, n: int, q=("", "", ""), **extra) -> None:
    row = dict(bench="video", case=case, impl=impl, N=n, dtype="uint8", ms_p20=q[0] and _sig(q[0]),
               ms_p50=q[1] and _sig(q[1]), ms_p80=q[2] and _sig(q[2]), **res.env)
    row.update(extra)
    res.rows.append(row)
    print(" ".join(f"{k}={row[k]}" for k in ("case", "impl", "N", "ms_p50", "rate", "unit", "note")
                   if row.get(k, "") != ""), flush=True)


def main() -> None:
    args = parse()
    res = Results("video", args)
    res.env["gpu"] = "cpu (smoke)" if args.cpu_smoke else f"cpu ({torch.get_num_threads()} threads)"
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        to_pixels_rows(res, args, clips(args), Path(tmp))
        demo_rows(res, args, Path(tmp))
    print(f"saved {res.flush()} in {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
