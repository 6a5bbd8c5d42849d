"""The benchmark scripts run end to end in their ``--cpu-smoke`` mode (tiny shapes, kernels interpreted) and refuse to
run without a GPU otherwise, so they cannot rot between GPU runs; their rows carry the version, precision, ratio and
verdict columns, and ``summarize.py`` turns them into a verdict table. The numbers they print here mean nothing."""
import argparse
import csv
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

import _harness  # noqa: E402

HEADS = ["vr1fast_chunked", "vr1fast_fused", "torch_eager", "vr1fast_reference"]
LOGITS = ["vr1fast", "torch_eager", "vr1fast_reference", "liger"]
CASES = {  # case → every implementation that must have been timed (liger is installed in the dev venv)
    "bench_logprobs.py": ("logprobs", {"head_nograd": HEADS + ["liger"], "head_fwd_bwd": HEADS,
                                       "head_entropy": HEADS, "logits_nograd": LOGITS}),
    "bench_grpo_loss.py": ("grpo_loss", {
        "head_grpo": ["cublas_gemms", *HEADS, "liger", "liger_tf32"],
        "head_grpo_frozen": ["cublas_gemms", *HEADS, "liger"],
        "head_grpo_autocast": ["vr1fast_chunked", "vr1fast_fused", "torch_eager"],
        "head_grpo_padded": ["vr1fast_chunked_packed", "vr1fast_fused_packed", "vr1fast_chunked", "vr1fast_fused",
                             "torch_eager"],
        "logits_grpo": LOGITS}),
}


@pytest.mark.parametrize("script", sorted(CASES))
def test_cpu_smoke_writes_rows_verdicts_and_plot(script, tmp_path):
    name, cases = CASES[script]
    proc = subprocess.run([sys.executable, str(BENCH / script), "--cpu-smoke", "--n", "48,32", "--out",
                           str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with (tmp_path / f"{name}.csv").open() as f:
        assert next(csv.reader(f)) == _harness.FIELDS
    rows = list(csv.DictReader((tmp_path / f"{name}.csv").open()))
    assert [r["N"] for r in rows][0] == "48"  # sizes run in the given order
    got = {(r["case"], r["impl"], r["N"]) for r in rows}
    assert got == {(c, i, n) for c, impls in cases.items() for i in impls for n in ("32", "48")}
    for r in rows:  # every implementation ran and was timed, on the CPU (no peak), with its precision recorded
        assert r["note"] == "" or (r["case"] == "head_grpo_padded" and " real of " in r["note"]), r
        assert float(r["ms_p20"]) <= float(r["ms_p50"]) <= float(r["ms_p80"]), r
        assert r["gpu"] == "cpu (smoke)" and r["commit"] and r["liger"] != "absent" and r["peak_gib"] == ""
        assert r["fp32_matmul"] == ("high" if r["impl"] == "liger_tf32" else torch.get_float32_matmul_precision())
        if r["impl"] != "cublas_gemms" and "torch_eager" in cases[r["case"]]:
            assert float(r["x_eager"]) > 0, r
    judged = [r for r in rows if _harness.judged(r["impl"])]
    for r in judged:
        if r["case"] == "head_grpo":
            assert {r[c] for c in ("pass_roofline", "pass_eager", "pass_liger")} <= {"PASS", "FAIL"}, r
            assert r["pass_memory"] == "" and r["ideal_is"].startswith("dW"), r  # no peak measured on the CPU
        if r["case"] == "head_grpo_autocast":
            assert float(r["vs_bf16"]) > 0 and r["pass_autocast"] in ("PASS", "FAIL"), r
        if r["case"] == "logits_nograd":
            assert r["pass_roofline"] in ("PASS", "FAIL"), r
    assert sum(r["pass_roofline"] != "" for r in judged) == (4 if name == "grpo_loss" else 2)
    assert (tmp_path / f"{name}.png").stat().st_size > 10_000
    summary = subprocess.run([sys.executable, str(BENCH / "summarize.py"), str(tmp_path), "--out",
                              str(tmp_path / "summary.md")], capture_output=True, text=True, timeout=120)
    assert summary.returncode == 0, summary.stderr[-3000:]
    text = (tmp_path / "summary.md").read_text()
    assert "CPU smoke rows" in text and all(f"**{c}**" in text for c in cases)
    assert ("≥ 80% of the cuBLAS rate" in text) == (name == "grpo_loss")


def test_judge_ratios_and_verdicts():
    """The ratio columns and SPEC verdicts of hand-made rows (liger at its faster precision; autocast vs bf16)."""
    def row(case, impl, ms, **kw):
        return dict(case=case, impl=impl, N=8192, ms_p50=ms, **kw)

    rows = [row("head_grpo", "vr1fast_chunked", 10.0, pct_roofline=82.0, peak_gib=2.8, inputs_gib=1.2,
                ideal_gib=2.2), row("head_grpo", "torch_eager", 11.0), row("head_grpo", "liger", 40.0),
            row("head_grpo", "liger_tf32", 16.0), row("head_grpo_autocast", "vr1fast_chunked", 11.5)]
    _harness.judge(rows)
    ours, eager, _, _, autocast = rows
    assert (ours["x_eager"], ours["x_liger"], ours["mem_ratio"]) == (1.1, 1.6, _harness._sig(4.0 / 3.4))
    assert (ours["pass_roofline"], ours["pass_eager"], ours["pass_liger"], ours["pass_memory"]) == \
        ("PASS", "FAIL", "PASS", "PASS")
    assert autocast["vs_bf16"] == 1.15 and autocast["pass_autocast"] == "FAIL"
    assert eager["x_eager"] == 1.0 and "pass_eager" not in eager  # baselines get ratios, not verdicts


def test_each_call_starts_without_the_previous_gradients(tmp_path):
    """F7: ``Results.add`` clears the leaves' gradients after every call, so no call (timed or measured for its
    peak) starts with the previous call's dX/dW resident."""
    args = argparse.Namespace(device=torch.device("cpu"), reps=3, warmup=2, out=str(tmp_path))
    res = _harness.Results("t", args)
    x = torch.randn(4, 3, requires_grad=True)
    calls = []

    def fwd_bwd():
        calls.append(x.grad is None)
        (x * x).sum().backward()

    row = res.add("case", "impl", dict(N=4, H=3, V="", dtype="fp32"), fwd_bwd, leaves=(x,))
    assert row["note"] == "" and calls == [True] * 5 and x.grad is None
    assert res.add("case", "other", dict(N=4, H=3, V="", dtype="fp32"), lambda: 1 / 0)["note"].startswith(
        "ZeroDivisionError")
    assert [r["impl"] for r in csv.DictReader(res.path.open())] == ["impl", "other"]  # written row by row
    again = _harness.Results("t", args)  # a second run keeps the first one's rows
    again.add("case", "third", dict(N=4, H=3, V="", dtype="fp32"), None, note="absent here")
    assert [r["impl"] for r in csv.DictReader(again.save().open())] == ["impl", "other", "third"]
    (tmp_path / "old.csv").write_text("bench,case,impl\nx,y,z\n")
    with pytest.raises(SystemExit, match="old.csv: its columns are not this harness's"):
        _harness.Results("old", args)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present: the script would run for real")
def test_refuses_without_gpu(tmp_path):
    proc = subprocess.run([sys.executable, str(BENCH / "bench_grpo_loss.py"), "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "needs a CUDA GPU" in proc.stderr and not any(tmp_path.iterdir())


def test_bench_rollout_cpu_smoke(tmp_path):
    """bench_rollout.py: both engines timed with tokens/s and peak memory, and the prompt-KV bytes per decode step
    counted from page tables: at Video-R1's 7B shape (8 prompts of 1229 tokens, G = 8 + 4) the cascade reads each
    prompt once per step (8 × 1229 tokens of 56 KiB, rounded up to 16-token pages), per-sample reading 48 times."""
    proc = subprocess.run([sys.executable, str(BENCH / "bench_rollout.py"), "--cpu-smoke", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with (tmp_path / "rollout.csv").open() as f:
        assert next(csv.reader(f)) == _harness.FIELDS
    by = {(r["case"], r["impl"]): r for r in csv.DictReader((tmp_path / "rollout.csv").open())}
    for engine in ("hf", "paged"):
        r = by[("rollout", engine)]
        assert 0 < float(r["ms_p20"]) <= float(r["ms_p50"]) <= float(r["ms_p80"]) and r["unit"] == "tok/s", r
        assert r["N"] == "40"  # (2 prompts × G = 2 + 1 shuffled video prompt × G/2 = 1) rows × 8 forced tokens
        assert float(r["rate"]) == pytest.approx(int(r["N"]) / float(r["ms_p50"]) * 1e3, rel=1e-3)
        assert float(r["peak_gib"]) > 0 and r["gpu"] == "cpu (smoke)" and r["commit"], r
    page_bytes = 16 * 2 * 28 * 4 * 128 * 2
    kv = {impl: float(by[("prompt_kv_read_per_step_7b", impl)]["rate"]) * 1e6 for impl in
          ("paged_cascade", "paged_per_sample", "hf")}
    assert kv["paged_cascade"] == pytest.approx(8 * 77 * page_bytes, rel=1e-3)  # ⌈1229 / 16⌉ = 77 pages
    assert kv["paged_per_sample"] == pytest.approx(48 * 77 * page_bytes, rel=1e-3)
    assert kv["hf"] == pytest.approx(48 * 1229 * page_bytes / 16, rel=1e-3)
    small = {impl: float(by[("prompt_kv_read_per_step", impl)]["rate"]) for impl in ("paged_cascade",
                                                                                     "paged_per_sample")}
    assert small["paged_per_sample"] == pytest.approx(2 * small["paged_cascade"], rel=1e-3)  # G = 2


def test_bench_attention_cpu_smoke(tmp_path):
    """bench_attention.py: every implementation timed per (suffix case, groups), the prompt-KV MB per step counted
    (the cascade reads each prompt once per group, the others once per sample: 2 siblings → half), and the cascade's
    speed-up over the unshared kernel noted."""
    proc = subprocess.run([sys.executable, str(BENCH / "bench_attention.py"), "--cpu-smoke", "--n", "2,1", "--out",
                           str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = list(csv.DictReader((tmp_path / "attention.csv").open()))
    impls = ["vr1fast_unshared", "vr1fast_cascade", "torch_sdpa", "vr1fast_reference"]
    assert {(r["case"], r["impl"], r["N"]) for r in rows} == {
        (f"decode_s{s}", i, n) for s in (0, 9) for i in impls for n in ("1", "2")}
    by = {(r["case"], r["impl"], r["N"]): r for r in rows}
    for r in rows:
        assert float(r["ms_p20"]) <= float(r["ms_p50"]) <= float(r["ms_p80"]) and float(r["rate"]) > 0, r
        assert r["gpu"] == "cpu (smoke)" and r["unit"] == "GB/s" and r["note"].startswith("prompt KV "), r
    for n in ("1", "2"):
        mb = {i: float(by[("decode_s0", i, n)]["note"].split()[2]) for i in impls}
        token = 2 * 16 * 2 * 2  # K and V of 2 KV heads × 16 dims in bf16
        assert mb["vr1fast_cascade"] == pytest.approx(int(n) * 23 * token / 1e6, rel=1e-3)  # groups × prompt
        assert mb["vr1fast_unshared"] == mb["torch_sdpa"] == pytest.approx(2 * mb["vr1fast_cascade"], rel=1e-3)
        assert "x vr1fast_unshared" in by[("decode_s9", "vr1fast_cascade", n)]["note"]
    assert (tmp_path / "attention.png").stat().st_size > 10_000


def test_bench_train_forward_cpu_smoke(tmp_path):
    """bench_train_forward.py: the policy forward + backward and the reference forward timed for the prompt-once
    (shared) and repeated layouts, with peak memory, the decoder tokens of each layout counted exactly (shared: Σ real
    prompt tokens + Σ (l − 1); repeated: B·G·(P + L)) and the repeated/shared ratios of every measurement."""
    import bench_train_forward as btf
    from vr1fast.model.tokenizer import build_tiny_tokenizer

    proc = subprocess.run([sys.executable, str(BENCH / "bench_train_forward.py"), "--cpu-smoke", "--out",
                           str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with (tmp_path / "train_forward.csv").open() as f:
        assert next(csv.reader(f)) == _harness.FIELDS
    rows = list(csv.DictReader((tmp_path / "train_forward.csv").open()))
    by = {(r["case"], r["impl"]): r for r in rows}
    assert len(by) == len(rows)
    inputs, ids, lengths = btf.build_inputs("tiny", 2, 2, 4, 8, build_tiny_tokenizer())  # the smoke's inputs
    B, P = inputs["input_ids"].shape
    shared = int(inputs["attention_mask"].sum()) + sum(max(n - 1, 0) for n in lengths)
    repeated = B * 2 * (P + max(lengths))
    assert ids.shape == (B * 2, max(lengths)) and shared < repeated
    assert (by[("decoder_tokens", "shared")]["rate"], by[("decoder_tokens", "repeated")]["rate"]) == \
        (str(shared), str(repeated))
    assert all(by[("decoder_tokens", i)]["unit"] == "tokens" for i in ("shared", "repeated"))
    assert float(by[("decoder_tokens", "repeated/shared")]["rate"]) == pytest.approx(repeated / shared, rel=1e-3)
    tokens = dict(shared=shared, repeated=repeated)
    for case in ("policy_fwd_bwd", "ref_fwd"):
        for impl in ("shared", "repeated"):
            r = by[(case, impl)]
            assert 0 < float(r["ms_p20"]) <= float(r["ms_p50"]) <= float(r["ms_p80"]), r
            assert r["N"] == str(sum(lengths)) and r["gpu"] == "cpu (smoke)" and r["peak_gib"] != "", r
            assert float(r["rate"]) == pytest.approx(tokens[impl] / float(r["ms_p50"]) * 1e3, rel=1e-3)
        got = {impl: by[(case, impl)] for impl in ("shared", "repeated")}
        assert float(by[(case, "repeated/shared")]["rate"]) == pytest.approx(
            float(got["repeated"]["ms_p50"]) / float(got["shared"]["ms_p50"]), rel=2e-3)
        peak = by.get((case, "repeated/shared_peak"))
        if float(got["shared"]["peak_gib"]) > 0:
            assert float(peak["rate"]) == pytest.approx(
                float(got["repeated"]["peak_gib"]) / float(got["shared"]["peak_gib"]), rel=2e-3)
    assert "tiny model" in rows[0]["note"] and f"P={P}" in rows[0]["note"] and "G=2" in rows[0]["note"]
    assert (tmp_path / "train_forward.png").stat().st_size > 10_000


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present: the script would run for real")
def test_bench_train_forward_refuses_7b_without_gpu(tmp_path):
    proc = subprocess.run([sys.executable, str(BENCH / "bench_train_forward.py"), "--shape", "7b", "--out",
                           str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "--shape 7b needs a CUDA GPU" in proc.stderr and not any(tmp_path.iterdir())


def test_bench_patchify_cpu_smoke(tmp_path):
    """bench_patchify.py: the Triton kernel, today's processor and the reference timed per case and frame count (an
    odd T included), the bytes moved (uint8 frames in + pixel_values out) as the rate, and the kernel's output
    compared with the CPU reference (exact in fp32)."""
    proc = subprocess.run([sys.executable, str(BENCH / "bench_patchify.py"), "--cpu-smoke", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with (tmp_path / "patchify.csv").open() as f:
        assert next(csv.reader(f)) == _harness.FIELDS
    rows = list(csv.DictReader((tmp_path / "patchify.csv").open()))
    cases, impls = ("patchify_fp32", "patchify_bf16", "shuffled_fp32"), ("vr1fast", "torch_eager", "vr1fast_reference")
    assert {(r["case"], r["impl"], r["N"]) for r in rows} == {(c, i, n) for c in cases for i in impls for n in "43"}
    for r in rows:
        assert 0 < float(r["ms_p20"]) <= float(r["ms_p50"]) <= float(r["ms_p80"]) and r["unit"] == "GB/s", r
        assert r["gpu"] == "cpu (smoke)" and r["commit"] and (r["H"], r["V"]) == ("28", "56"), r
        t, size = int(r["N"]), 4 if r["dtype"] == "fp32" else 2
        moved = t * 28 * 56 * 3 + -(-t // 2) * 2 * 4 * 1176 * size
        assert float(r["rate"]) == pytest.approx(moved / float(r["ms_p50"]) / 1e6, rel=2e-3), r
        if r["impl"] == "vr1fast" and size == 4:
            assert r["note"].endswith("equal to the CPU reference"), r
        elif r["impl"] == "vr1fast":  # the interpreter truncates to bf16: within one bf16 ulp of values below 4
            assert 0 < float(r["note"].rsplit(" ", 1)[1]) <= 2.0 ** -6, r
    assert (tmp_path / "patchify.png").stat().st_size > 10_000


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present: the script would run for real")
def test_bench_patchify_refuses_without_gpu(tmp_path):
    proc = subprocess.run([sys.executable, str(BENCH / "bench_patchify.py"), "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "needs a CUDA GPU" in proc.stderr and not any(tmp_path.iterdir())


def test_bench_video_cpu_smoke(tmp_path):
    """bench_video.py: every way to pixel_values timed on generated H.264 clips (videos/s, frames/s in the note), the
    decord row a note where it is absent, and the demo's data + processor and step times of a synchronous and a
    prefetching run with their ratios (the data + processor one judged against 0.10)."""
    proc = subprocess.run([sys.executable, str(BENCH / "bench_video.py"), "--cpu-smoke", "--out", str(tmp_path),
                           "--clip-dir", str(tmp_path / "clips")], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with (tmp_path / "video.csv").open() as f:
        assert next(csv.reader(f)) == _harness.FIELDS
    by = {(r["case"], r["impl"]): r for r in csv.DictReader((tmp_path / "video.csv").open())}
    for impl in ("sync", "prefetch_w2", "cache_fill", "cache_hit"):
        r = by[("to_pixels", impl)]
        assert 0 < float(r["ms_p20"]) <= float(r["ms_p50"]) <= float(r["ms_p80"]) and r["unit"] == "videos/s", r
        assert float(r["rate"]) == pytest.approx(2 / float(r["ms_p50"]) * 1e3, rel=1e-3) and " frames/s" in r["note"]
        assert r["gpu"] == "cpu (smoke)" and r["commit"], r
    assert by[("to_pixels", "decord_hf")]["ms_p50"] == "" and by[("to_pixels", "decord_hf")]["note"]
    for arm in ("sync", "prefetch_w2"):
        for what in ("data_processor", "step"):
            assert float(by[("demo_step", f"{arm}_{what}")]["rate"]) >= 0
    ratio = by[("demo_step", "prefetch/sync_data_processor")]
    assert float(ratio["rate"]) >= 0 and ratio["note"].split(": ")[-1] in ("PASS", "FAIL")
    assert float(by[("demo_step", "prefetch/sync_step")]["rate"]) > 0
