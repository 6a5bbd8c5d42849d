"""Verdict table of benchmark CSVs: each SPEC target met or missed, with its ratio, and ms p50 per case.

Reads the CSVs the benchmarks write (``_harness.FIELDS``; the ratio and PASS/FAIL columns are filled when the rows
are written, from ``_harness.TARGETS``), keeps the latest run of each CSV (its rows share one ``date``; ``--all``
keeps every run) and prints markdown: the environment of each run, one line per judged row and target (SPEC states
its head targets at N = 8192, marked ◀), and a table of ms p50 per case, implementation and N.

    python benchmarks/summarize.py [benchmarks/results | a.csv b.csv ...] [--out summary.md] [--all]
"""
from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

from _harness import ROOT, TARGETS

SPEC_N = "8192"


def read(paths: list[Path], every_run: bool) -> dict[str, list[dict]]:
    """CSV name → its rows (latest run only unless ``every_run``); a path may be a CSV or a folder of CSVs."""
    files = [f for p in paths for f in (sorted(p.glob("*.csv")) if p.is_dir() else [p])]
    missing = [str(f) for f in files if not f.is_file()]
    if missing or not files:
        raise SystemExit(f"summarize.py: no benchmark CSV at {', '.join(missing or map(str, paths))}")
    out = {}
    for f in files:
        with f.open(newline="") as fh:
            rows = list(csv.DictReader(fh))
        if rows and not every_run:
            latest = max(r["date"] for r in rows)
            rows = [r for r in rows if r["date"] == latest]
        out[f.stem] = rows
    return out


def environment(name: str, rows: list[dict]) -> str:
    runs = sorted({(r["date"], r["gpu"], r["torch"], r["triton"], r["liger"], r["commit"]) for r in rows})
    lines = [f"- `{name}`: " + "; ".join(f"{k} {v}" for k, v in zip(
        ("date", "GPU", "torch", "triton", "liger", "commit"), run)) for run in runs]
    precisions = sorted({r.get("fp32_matmul", "") for r in rows} - {""})
    if precisions:
        lines[-1] += f"; float32 matmul precision {', '.join(precisions)} (per row)"
    return "\n".join(lines)


def verdicts(rows: list[dict]) -> list[str]:
    """Markdown table rows: target, case, impl, N, measured value vs bar, PASS/FAIL (rows without a value skipped)."""
    out = []
    for t in TARGETS:
        for r in rows:
            verdict = r.get(t.column, "")
            if r["case"] != t.case or verdict == "" or r.get(t.metric, "") == "":
                continue
            bar = f"{'≥' if t.higher else '≤'} {t.bar:g}"
            extra = f" ({r['ideal_is']})" if t.metric == "mem_ratio" and r.get("ideal_is") else ""
            mark = " ◀" if r["N"] == SPEC_N else ""
            out.append(f"| {t.text} | {t.case} | {r['impl']} | {r['N']}{mark} | {r[t.metric]}{extra} | {bar} | "
                       f"**{verdict}** |")
    return out


def timings(rows: list[dict]) -> list[str]:
    """Per case: ms p50 of each implementation at each N (rate and % of roofline in brackets; a note if it failed)."""
    out = []
    for case in dict.fromkeys(r["case"] for r in rows):
        sizes = list(dict.fromkeys(r["N"] for r in rows if r["case"] == case))
        sizes.sort(key=lambda n: int(n) if n.isdigit() else 0)
        out += [f"\n**{case}** (ms p50; rate, % of roofline)\n", "| impl | " + " | ".join(f"N={n}" for n in sizes)
                + " |", "|---" * (len(sizes) + 1) + "|"]
        for impl in dict.fromkeys(r["impl"] for r in rows if r["case"] == case):
            cells = []
            for n in sizes:
                hit = [r for r in rows if r["case"] == case and r["impl"] == impl and r["N"] == n]
                cells.append(cell(hit[-1]) if hit else "")
            out.append(f"| {impl} | " + " | ".join(cells) + " |")
    return out


def cell(r: dict) -> str:
    """ms p50 (rate, % of roofline); a row without a time shows its rate (a ratio row) or its note (a failure)."""
    extra = ", ".join(e for e in (f"{r['rate']} {r['unit']}" if r.get("rate") else "",
                                  f"{r['pct_roofline']}%" if r.get("pct_roofline") else "") if e)
    if r.get("ms_p50", "") != "":
        return r["ms_p50"] + (f" ({extra})" if extra else "")
    note = r.get("note", "").replace("|", "/")
    return (extra or "—") + (f" ({note[:100]})" if note else "")


def summary(runs: dict[str, list[dict]]) -> str:
    rows = [r for name in runs for r in runs[name]]
    lines = ["# Benchmark summary", "", "## Runs", *(environment(n, rs) for n, rs in runs.items() if rs)]
    if any(r["gpu"].startswith("cpu") for r in rows):
        lines.append("\n**CPU smoke rows: a plumbing check; their numbers and verdicts mean nothing.**")
    table = verdicts(rows)
    lines += ["", "## SPEC targets (SPEC.md \"Performance targets\"; ◀ = the N the SPEC names)", ""]
    lines += ["| target | case | impl | N | measured | bar | verdict |", "|---|---|---|---|---|---|---|", *table] \
        if table else ["No row could be judged (no GPU run, or the judged rows failed: see their notes)."]
    for name, rs in runs.items():
        lines += ["", f"## {name}", *timings(rs)]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("paths", nargs="*", type=Path, default=[ROOT / "results"], help="CSV files or folders of them")
    p.add_argument("--out", type=Path, default=None, help="also write the markdown here")
    p.add_argument("--all", action="store_true", help="every run in the CSVs, not only the latest of each")
    args = p.parse_args(argv)
    text = summary(read(args.paths, args.all))
    sys.stdout.write(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
