"""Shared benchmark plumbing: timing, clean peak memory, rooflines measured in the same run, SPEC verdicts, rows, plots.

* ``timed(fn)``: CUDA-event times of ``reps`` calls after ``warmup`` → ms at p20 / p50 / p80 (perf_counter on CPU).
* ``peak_gib(fn, device, start)``: ``torch.cuda.max_memory_allocated`` during one call minus what was allocated
  just before it, in GiB. Clean by construction: ``Results.add`` clears the ``.grad`` of the given leaves after
  every call (so a call never starts with the previous call's gradients resident, the F7 bias), and the
  measurement refuses (the row gets a note) when more than ``RETAINED_SLACK`` stayed allocated since before the
  first call. Not measured on the CPU (empty). Rows also carry the inputs' size and the ideal (what any
  implementation must allocate, e.g. dW), so the SPEC's memory ratio is (inputs + peak) / (inputs + ideal).
* Rooflines, measured on the same GPU in the same process: ``matmul_tflops`` (cuBLAS ``torch.mm`` of a given
  shape and dtype) and ``copy_gbps`` (a device-to-device copy, read + write bytes counted).
* ``judge(rows)``: the ratio columns (x_eager, x_liger, vs_bf16, mem_ratio) and a PASS/FAIL column per SPEC target
  (``TARGETS``; SPEC.md "Performance targets") for vr1fast's rows.
* ``Results`` adds rows to ``<out>/<name>.csv`` with GPU, torch/triton/liger versions, the float32 matmul
  precision of the row, git commit and date (house rule 8), writing the file after every row (a run stopped by a
  timeout keeps what it measured; earlier runs' rows stay), and plots ms p50 (and % of roofline) against N.

Benchmarks refuse to run without a GPU unless given ``--cpu-smoke``: tiny shapes on the CPU, kernels under
``TRITON_INTERPRET=1``, results written to ``--out`` (a plumbing check only, no numbers worth reading).
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import datetime
import importlib.metadata
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Optional

import torch

from vr1fast import provenance

ROOT = Path(__file__).resolve().parent
RATIOS = ["x_eager", "x_liger", "vs_bf16", "mem_ratio"]
VERDICTS = ["pass_roofline", "pass_eager", "pass_liger", "pass_memory", "pass_autocast"]
FIELDS = ["bench", "case", "impl", "N", "H", "V", "dtype", "ms_p20", "ms_p50", "ms_p80", "peak_gib", "inputs_gib",
          "ideal_gib", "ideal_is", "rate", "unit", "roofline", "pct_roofline", *RATIOS, *VERDICTS, "note", "gpu",
          "torch", "triton", "liger", "fp32_matmul", "commit", "date"]
PRINTED = ["case", "impl", "N", "ms_p50", "rate", "unit", "pct_roofline", "peak_gib", "fp32_matmul", "note"]
RETAINED_SLACK = 128 * 2**20  # bytes a call may leave allocated (cuBLAS workspaces, autotune caches)


@dataclass(frozen=True)
class Target:
    """One SPEC target: rows of ``case`` by a judged implementation pass when ``metric`` ≥ ``bar`` (≤ if not
    ``higher``); the verdict goes to ``column``."""
    column: str
    case: str
    metric: str
    bar: float
    higher: bool
    text: str


TARGETS = (
    Target("pass_roofline", "head_grpo", "pct_roofline", 80.0, True, "≥ 80% of the cuBLAS rate for 6NHV"),
    Target("pass_liger", "head_grpo", "x_liger", 1.5, True, "≥ 1.5× liger (fastest liger row)"),
    Target("pass_eager", "head_grpo", "x_eager", 1.2, True, "≥ 1.2× torch eager"),
    Target("pass_memory", "head_grpo", "mem_ratio", 1.2, False, "inputs + peak ≤ 1.2× (inputs + ideal)"),
    Target("pass_autocast", "head_grpo_autocast", "vs_bf16", 1.1, False, "fp32 masters + autocast within 10% of bf16"),
    Target("pass_roofline", "logits_nograd", "pct_roofline", 85.0, True, "≥ 85% of the copy bandwidth"),
)


def judged(impl: str) -> bool:
    """vr1fast's own implementations (not its pure-torch reference) are the ones the SPEC targets judge."""
    return impl.startswith("vr1fast") and not impl.startswith("vr1fast_reference")


def parse_args(description: str, default_n: str, smoke_n: str) -> argparse.Namespace:
    """Common flags; exits with a one-line message (status 1) when there is no GPU and no ``--cpu-smoke``."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--n", default=None, help=f"comma-separated token counts N, run in this order (default {default_n})")
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--max-seconds", type=float, default=None, help="start no new N after this many seconds")
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


def sizes(args: argparse.Namespace) -> Iterable[int]:
    """``args.sizes`` in order, stopping (with a line saying so) once ``--max-seconds`` have passed."""
    start = time.monotonic()
    for n in args.sizes:
        if args.max_seconds is not None and time.monotonic() - start > args.max_seconds:
            print(f"skipping N={n} and later: over --max-seconds {args.max_seconds:g}", flush=True)
            return
        yield n


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


def peak_gib(fn: Callable[[], object], device: torch.device, start: int) -> Optional[float]:
    """GiB allocated at the peak of one ``fn()`` call above what was allocated just before it (None on CPU).

    ``start``: bytes allocated before the implementation's first call. More than RETAINED_SLACK above it now means
    something (gradients, caches) survives between calls and would hide part of the peak: that raises."""
    if device.type != "cuda":
        return None
    sync(device)
    before = torch.cuda.memory_allocated(device)
    if before - start > RETAINED_SLACK:
        raise RuntimeError(f"{(before - start) / 2**30:.3f} GiB stayed allocated between calls: peak not clean")
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
    """Device-to-device copy rate (GB/s, read + write bytes, p50) of random data: the memory roofline."""
    src = torch.randn(nbytes // 2, device=device, dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    ms = timed(lambda: dst.copy_(src), device, reps)[1]
    return 2 * src.numel() * 2 / (ms * 1e-3) / 1e9


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "absent"


def environment(device: torch.device) -> dict:
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (smoke)"
    return dict(gpu=gpu, torch=torch.__version__, triton=_version("triton"), liger=_version("liger-kernel"),
                commit=provenance.commit(ROOT),
                date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))


def _sig(x: float) -> float:
    return float(f"{x:.4g}")


@contextlib.contextmanager
def fp32_matmul(precision: Optional[str]):
    """torch.set_float32_matmul_precision(precision) inside the block (unchanged for None)."""
    saved = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(precision or saved)
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(saved)


def _clearing(fn: Callable[[], object], leaves: tuple) -> Callable[[], None]:
    """``fn()`` with its output dropped and the leaves' gradients cleared after it."""
    def call() -> None:
        fn()
        for t in leaves:
            t.grad = None
    return call


def _num(row: dict, key: str) -> Optional[float]:
    value = row.get(key, "")
    return None if value in ("", None) else float(value)


def _ratios(row: dict, rows: list[dict]) -> dict:
    """x_eager / x_liger (their p50 over this row's, same case and N), vs_bf16 (an autocast row's p50 over the same
    implementation's in the bf16 case), mem_ratio ((inputs + peak) / (inputs + ideal))."""
    ms = _num(row, "ms_p50")
    if ms is None:
        return {}
    peers = [r for r in rows if r["case"] == row["case"] and r["N"] == row["N"] and _num(r, "ms_p50")]
    eager = [_num(r, "ms_p50") for r in peers if r["impl"] == "torch_eager"]
    liger = [_num(r, "ms_p50") for r in peers if r["impl"].startswith("liger")]
    out = {"x_eager": eager and _sig(eager[0] / ms), "x_liger": liger and _sig(min(liger) / ms)}
    if row["case"].endswith("_autocast"):
        base = [_num(r, "ms_p50") for r in rows if r["case"] == row["case"][:-len("_autocast")]
                and r["N"] == row["N"] and r["impl"] == row["impl"] and _num(r, "ms_p50")]
        out["vs_bf16"] = base and _sig(ms / base[0])
    peak, ideal, inputs = _num(row, "peak_gib"), _num(row, "ideal_gib"), _num(row, "inputs_gib") or 0.0
    if peak is not None and ideal:
        out["mem_ratio"] = _sig((inputs + peak) / (inputs + ideal))
    return {k: v for k, v in out.items() if v}


def judge(rows: list[dict]) -> None:
    """Fill the ratio columns of every timed row and the SPEC verdicts (PASS/FAIL) of vr1fast's rows, in place."""
    for row in rows:
        row.update(_ratios(row, rows))
    for row in rows:
        for t in TARGETS:
            value = _num(row, t.metric)
            if row["case"] == t.case and judged(row["impl"]) and value is not None:
                row[t.column] = "PASS" if (value >= t.bar if t.higher else value <= t.bar) else "FAIL"


class Results:
    """Rows of one benchmark in ``<out>/<name>.csv``: ``add`` measures, prints and writes one (the file is rewritten
    with the ratio columns judged again after every row, so a run killed by a timeout keeps every finished row and
    the rows of earlier runs in the file), ``save`` also draws the plot."""

    def __init__(self, name: str, args: argparse.Namespace):
        self.name, self.args, self.rows = name, args, []
        self.env = environment(args.device)
        self.path = Path(args.out) / f"{name}.csv"
        self.earlier = self._earlier_runs()

    def _earlier_runs(self) -> list[dict]:
        if not self.path.exists() or not self.path.stat().st_size:
            return []
        with self.path.open(newline="") as f:
            reader = csv.DictReader(f)
            if reader.fieldnames != FIELDS:
                raise SystemExit(f"{self.path}: its columns are not this harness's (an older run?): move it away")
            return list(reader)

    def add(self, case: str, impl: str, shape: dict, fn: Optional[Callable[[], object]], *, leaves: tuple = (),
            precision: Optional[str] = None, work: float = 0.0, unit: str = "TFLOP/s", roofline: float = 0.0,
            inputs_gib: float = 0.0, ideal_gib: float = 0.0, ideal_is: str = "", note: str = "") -> dict:
        """Time ``fn`` (``work`` = FLOPs or bytes per call) under float32 matmul ``precision`` (None: as set),
        clearing the grads of ``leaves`` after each call; a failing or missing implementation becomes a note."""
        dev = self.args.device
        row = dict(bench=self.name, case=case, impl=impl, **shape, inputs_gib=_sig(inputs_gib),
                   ideal_gib=_sig(ideal_gib), ideal_is=ideal_is, unit=unit, roofline=_sig(roofline),
                   note=note or ("" if fn else "not available"), **self.env)
        if fn is None:
            return self._keep(row)
        try:
            call = _clearing(fn, leaves)
            start = torch.cuda.memory_allocated(dev) if dev.type == "cuda" else 0
            with fp32_matmul(precision):
                row["fp32_matmul"] = torch.get_float32_matmul_precision()
                ms = timed(call, dev, self.args.reps, self.args.warmup)
                row["ms_p20"], row["ms_p50"], row["ms_p80"] = (_sig(t) for t in ms)
                rate = work / (ms[1] * 1e-3) / (1e12 if unit == "TFLOP/s" else 1e9) if work else None
                row["rate"] = _sig(rate) if rate else ""
                row["pct_roofline"] = _sig(100 * rate / roofline) if rate and roofline else ""
                peak = peak_gib(call, dev, start)
            row["peak_gib"] = "" if peak is None else _sig(peak)
        except Exception as e:  # one broken baseline must not lose the other rows
            row["note"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
        finally:
            for t in leaves:
                t.grad = None
            if dev.type == "cuda":
                torch.cuda.empty_cache()
        return self._keep(row)

    def _keep(self, row: dict) -> dict:
        self.rows.append(row)
        print(" ".join(f"{k}={row[k]}" for k in PRINTED if row.get(k, "") != ""), flush=True)
        self.flush()
        return row

    def flush(self) -> Path:
        """Judge this run's rows and rewrite the CSV: earlier runs' rows, then this run's (atomically replaced)."""
        judge(self.rows)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".csv.tmp")
        with tmp.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=FIELDS)
            writer.writeheader()
            writer.writerows(self.earlier)
            writer.writerows({k: row.get(k, "") for k in FIELDS} for row in self.rows)
        os.replace(tmp, self.path)
        return self.path

    def save(self) -> Path:
        path = self.flush()
        plot(self.rows, path.with_suffix(".png"), self.name)
        return path


def plot(rows: list[dict], path: Path, title: str) -> None:
    """One panel per case: ms p50 against N for every implementation (log-log), annotated with % of roofline."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = sorted({r["case"] for r in rows})
    colors = {impl: f"C{i % 10}" for i, impl in enumerate(sorted({r["impl"] for r in rows}))}
    ncols = min(3, max(1, len(cases)))
    nrows = -(-len(cases) // ncols) or 1
    fig, axes = plt.subplots(nrows, ncols, figsize=(5 * ncols, 4 * nrows), squeeze=False)
    for ax, case in zip(axes.flat, cases):
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
        if ax.lines:
            ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(cases):]:
        ax.set_visible(False)
    fig.suptitle(f"{title} — {rows[0]['gpu'] if rows else ''}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
