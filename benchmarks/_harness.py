"""Shared benchmark plumbing: timing, peak memory, rooflines measured in the same run, result rows and plots.

* ``timed(fn)``: CUDA-event times of ``reps`` calls after ``warmup`` → ms at p20 / p50 / p80 (perf_counter on CPU).
* ``peak_gib(fn)``: ``torch.cuda.max_memory_allocated`` during one call minus what was allocated before it, in
  GiB (0 on CPU): the working memory and outputs of the call, whatever else is resident. Rows also carry the inputs'
  size and the ideal (the outputs any implementation must allocate, e.g. gradients), so the SPEC's memory ratio is
  (inputs + peak) / (inputs + ideal).
* Rooflines, measured on the same GPU in the same process: ``matmul_tflops`` (cuBLAS ``torch.mm`` of a given
  shape and dtype) and ``copy_gbps`` (a device-to-device copy, read + write bytes counted).
* ``Results`` appends rows to ``<out>/<name>.csv`` with GPU, torch/triton/liger versions, git commit and date
  (house rule 8) and plots ms p50 (and % of roofline) against N per case and implementation.

Benchmarks refuse to run without a GPU unless given ``--cpu-smoke``: tiny shapes on the CPU, kernels under
``TRITON_INTERPRET=1``, results written to ``--out`` (a plumbing check only, no numbers worth reading).
"""
from __future__ import annotations

import argparse
import csv
import datetime
import importlib.metadata
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import torch

ROOT = Path(__file__).resolve().parent
FIELDS = ["bench", "case", "impl", "N", "H", "V", "dtype", "ms_p20", "ms_p50", "ms_p80", "peak_gib", "inputs_gib",
          "ideal_gib",
          "rate", "unit", "roofline", "pct_roofline", "note", "gpu", "torch", "triton", "liger", "commit", "date"]


def parse_args(description: str, default_n: str, smoke_n: str) -> argparse.Namespace:
    """Common flags; exits with a one-line message (status 1) when there is no GPU and no ``--cpu-smoke``."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--n", default=None, help=f"comma-separated token counts N (default {default_n})")
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--out", default=str(ROOT / "results"), help="directory for the CSV and the plot")
    p.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on the CPU (interpreter): plumbing only")
    args = p.parse_args()
    if args.cpu_smoke:
        os.environ["TRITON_INTERPRET"] = "1"  # before any kernel module is imported
        args.reps, args.warmup = 1, 0
    elif not torch.cuda.is_available():
        sys.exit(f"{Path(sys.argv[0]).name}: needs a CUDA GPU (run with --cpu-smoke for a CPU plumbing check)")
    args.device = torch.device("cpu" if args.cpu_smoke else "cuda")
    args.sizes = [int(n) for n in (args.n or (smoke_n if args.cpu_smoke else default_n)).split(",")]
    return args


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device, reps: int = 10, warmup: int = 3) -> tuple[float, ...]:
    """(p20, p50, p80) milliseconds of ``fn()`` over ``reps`` calls after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(max(1, reps)):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return percentiles(times)


def percentiles(ms: list[float]) -> tuple[float, ...]:
    """(p20, p50, p80) of a list of times, linearly interpolated (torch.quantile)."""
    q = torch.tensor(ms, dtype=torch.float64).quantile(torch.tensor([0.2, 0.5, 0.8], dtype=torch.float64))
    return tuple(q.tolist())


def peak_gib(fn: Callable[[], object], device: torch.device) -> float:
    """GiB allocated at the peak of one ``fn()`` call above what was allocated before it (0.0 on CPU)."""
    if device.type != "cuda":
        fn()
        return 0.0
    sync(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    sync(device)
    return (torch.cuda.max_memory_allocated(device) - before) / 2**30


def matmul_tflops(m: int, n: int, k: int, dtype: torch.dtype, device: torch.device, reps: int = 10) -> float:
    """cuBLAS rate of [m, k] @ [k, n] in ``dtype`` (TFLOP/s, p50), the GEMM roofline of this GPU and shape."""
    a = torch.randn(m, k, device=device).to(dtype)
    b = torch.randn(n, k, device=device).to(dtype)
    ms = timed(lambda: a @ b.T, device, reps)[1]
    return 2 * m * n * k / (ms * 1e-3) / 1e12


def copy_gbps(nbytes: int, device: torch.device, reps: int = 10) -> float:
    """Device-to-device copy rate (GB/s, read + write bytes, p50): the memory roofline of this GPU."""
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    ms = timed(lambda: dst.copy_(src), device, reps)[1]
    return 2 * src.numel() * 2 / (ms * 1e-3) / 1e9


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "absent"


def environment(device: torch.device) -> dict:
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True).stdout.strip()
        commit += "+dirty" if dirty else ""
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (smoke)"
    return dict(gpu=gpu, torch=torch.__version__, triton=_version("triton"), liger=_version("liger-kernel"),
                commit=commit, date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))


def _sig(x: float) -> float:
    return float(f"{x:.4g}")


class Results:
    """Rows of one benchmark: ``add`` measures and prints one, ``save`` appends them to CSV and draws the plot."""

    def __init__(self, name: str, args: argparse.Namespace):
        self.name, self.args, self.rows = name, args, []
        self.env = environment(args.device)

    def add(self, case: str, impl: str, shape: dict, fn: Optional[Callable[[], object]], *, work: float = 0.0,
            unit: str = "TFLOP/s", roofline: float = 0.0, inputs_gib: float = 0.0, ideal_gib: float = 0.0,
            note: str = "") -> dict:
        """Time ``fn`` (``work`` = FLOPs or bytes per call); a failing or missing implementation becomes a note."""
        row = dict(bench=self.name, case=case, impl=impl, **shape, inputs_gib=_sig(inputs_gib),
                   ideal_gib=_sig(ideal_gib), unit=unit, roofline=_sig(roofline), note=note, **self.env)
        try:
            if fn is None:
                raise RuntimeError(note or "not available")
            ms = timed(fn, self.args.device, self.args.reps, self.args.warmup)
            row["ms_p20"], row["ms_p50"], row["ms_p80"] = (_sig(t) for t in ms)
            row["peak_gib"] = _sig(peak_gib(fn, self.args.device))
            rate = work / (ms[1] * 1e-3) / (1e12 if unit == "TFLOP/s" else 1e9) if work else None
            row["rate"] = _sig(rate) if rate else ""
            row["pct_roofline"] = _sig(100 * rate / roofline) if rate and roofline else ""
        except Exception as e:  # one broken baseline must not lose the other rows
            row["note"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
        finally:
            if self.args.device.type == "cuda":
                torch.cuda.empty_cache()
        self.rows.append(row)
        print(" ".join(f"{k}={row.get(k, '')}" for k in FIELDS[:FIELDS.index("gpu")]), flush=True)
        return row

    def save(self) -> Path:
        out = Path(self.args.out)
        out.mkdir(parents=True, exist_ok=True)
        path = out / f"{self.name}.csv"
        new = not path.exists()
        with path.open("a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=FIELDS)
            if new:
                writer.writeheader()
            writer.writerows({k: row.get(k, "") for k in FIELDS} for row in self.rows)
        plot(self.rows, out / f"{self.name}.png", self.name)
        return path


def plot(rows: list[dict], path: Path, title: str) -> None:
    """One panel per case: ms p50 against N for every implementation (log-log), annotated with % of roofline."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = sorted({r["case"] for r in rows})
    colors = {impl: f"C{i}" for i, impl in enumerate(sorted({r["impl"] for r in rows}))}
    fig, axes = plt.subplots(1, len(cases), figsize=(5 * len(cases), 4), squeeze=False)
    for ax, case in zip(axes[0], cases):
        for impl in sorted({r["impl"] for r in rows if r["case"] == case}):
            pts = sorted((r["N"], r["ms_p50"], r.get("pct_roofline", "")) for r in rows
                         if r["case"] == case and r["impl"] == impl and r.get("ms_p50", "") != "")
            if not pts:
                continue
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=impl, color=colors[impl])
            for n, ms, pct in pts:
                if pct != "":
                    ax.annotate(f"{pct:.0f}%", (n, ms), textcoords="offset points", xytext=(3, 3), fontsize=7)
        ax.set(xscale="log", yscale="log", xlabel="tokens N", ylabel="ms (p50)", title=case)
        ax.legend(fontsize=7)
    fig.suptitle(f"{title} — {rows[0]['gpu'] if rows else ''}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
