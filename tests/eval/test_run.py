"""``python -m vr1fast.eval`` end to end on CPU: the tiny model, real encoded videos of the synthetic set, HF generate.

The tiny random model answers nonsense, so most scores are 0; where a test needs right answers it writes a benchmark
file whose solutions are the model's own greedy outputs from a first run (the prompt does not contain the solution,
so the second run answers the same).
"""
import json
import shutil
from pathlib import Path

import pytest
import torch

from runs import two_ranks
from vr1fast.config import demo, videor1_eval
from vr1fast.eval.answer import Item, answer_batch, load_item
from vr1fast.eval.benchmarks import heldout_dir, load_benchmark
from vr1fast.eval.results import headline
from vr1fast.eval.run import load_eval_model, main
from vr1fast.eval.scoring import prediction, process, score
from vr1fast.metrics import read_jsonl
from vr1fast.model import lora
from vr1fast.model.load import tiny_model

REPO = Path(__file__).resolve().parents[2]
MC_VIDEO, MC_VIDEO_2, NUMERICAL_VIDEO, REGRESSION_VIDEO, NUMERICAL_IMAGE = 0, 1, 2, 4, 6  # synthetic record kinds


def write_benchmark(folder: Path, synthetic: Path, picks: list[int], name: str = "eval_mini.json",
                    solutions: dict = None, extra: dict = None) -> Path:
    """A Video-R1-schema eval file of the synthetic records ``picks`` with their media copied beside it."""
    records = json.loads((synthetic / "rl.json").read_text())
    out = []
    for i in picks:
        record = {**records[i], **(extra or {})}
        if solutions and i in solutions:
            record["solution"] = f"<answer>{solutions[i]}</answer>"
        (folder / record["path"]).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(synthetic / record["path"], folder / record["path"])
        out.append(record)
    (folder / name).write_text(json.dumps(out, indent=1))
    return folder / name


def eval_args(out: Path, *extra: str) -> list[str]:
    return ["--preset=demo", f"--eval.output_dir={out}", "--eval.sampling=greedy", "--eval.max_new_tokens=4",
            "--eval.batch_size=2", "--metrics.progress_bar=false", *extra]


def summary(out: Path, name: str) -> dict:
    s = json.loads((out / f"{name}.summary.json").read_text())
    s.pop("seconds")
    return s


def test_video_r1_schema_file_rows_summary_and_table(synthetic, tmp_path, capsys):
    bench = write_benchmark(tmp_path / "b", synthetic, [MC_VIDEO, REGRESSION_VIDEO, NUMERICAL_IMAGE],
                            extra={"original_question_id": 7})
    main(eval_args(tmp_path / "out", f"--eval.benchmarks=[{bench}]"))
    rows = read_jsonl(tmp_path / "out" / "mini.jsonl")
    raw = json.loads(bench.read_text())
    assert [r["index"] for r in rows] == [0, 1, 2] and [r["record"] for r in rows] == raw
    for r in rows:
        assert isinstance(r["output"], str) and r["output"]
        assert r["prediction"] == prediction(r["output"])
        assert r["score"] == score(r["output"], r["record"]["solution"], r["record"]["problem_type"])
        assert r["correct"] == (r["score"] == 1.0) and "shuffled_output" not in r
        assert r.get("process", "") == process(r["output"])
    s = summary(tmp_path / "out", "mini")
    assert (s["benchmark"], s["records"], s["scored"], s["broken"], s["video_items"]) == ("mini", 3, 3, 0, 0)
    assert s["settings"]["max_new_tokens"] == 4 and s["settings"]["sampling"] == "greedy"
    table = capsys.readouterr().out.splitlines()
    assert table[-2].split()[:3] == ["score", "mean_acc", "mean_mra"] and table[-1].split()[0] == "mini"

    # VSI-Bench's combination through the runner: the MC answers made right by taking the outputs as solutions
    right = {MC_VIDEO: rows[0]["output"].strip()}
    vsi = write_benchmark(tmp_path / "v", synthetic, [MC_VIDEO, MC_VIDEO_2, REGRESSION_VIDEO], "eval_vsibench.json",
                          solutions=right)
    main(eval_args(tmp_path / "out", f"--eval.benchmarks=[{vsi}]"))
    s = summary(tmp_path / "out", "vsibench")
    assert (s["mean_acc"], s["mean_mra"]) == (0.5, 0.0)
    assert s["score"] == 0.25 and s["accuracy"] == pytest.approx(1 / 3)  # (acc + mra) / 2, not the item mean


def test_resume_over_a_partial_output_gives_the_one_run_summary(synthetic, tmp_path):
    bench = write_benchmark(tmp_path / "b", synthetic, [0, 1, 2, 4, 6, 7])
    main(eval_args(tmp_path / "full", f"--eval.benchmarks=[{bench}]", "--eval.shuffled=true"))
    full = read_jsonl(tmp_path / "full" / "mini.jsonl")
    (tmp_path / "part").mkdir()
    lines = (tmp_path / "full" / "mini.jsonl").read_text().splitlines()
    broken = {"index": 3, "record": full[3]["record"], "broken": "cannot decode x.mp4: an earlier failure"}
    torn = lines[4][: len(lines[4]) // 2]
    (tmp_path / "part" / "mini.jsonl").write_text("\n".join([*lines[:3], json.dumps(broken), torn]))
    main(eval_args(tmp_path / "part", f"--eval.benchmarks=[{bench}]", "--eval.shuffled=true"))
    resumed = read_jsonl(tmp_path / "part" / "mini.jsonl")
    assert sorted(resumed, key=lambda r: r["index"]) == full  # the broken row was retried, the torn one redone
    assert summary(tmp_path / "part", "mini") == summary(tmp_path / "full", "mini")

    # The summary covers the earlier rows too (Video-R1's resume scores only the new ones).
    edited = [{**r, "score": 1.0} if r["index"] == 0 else r for r in resumed]
    (tmp_path / "part" / "mini.jsonl").write_text("".join(json.dumps(r) + "\n" for r in edited))
    main(eval_args(tmp_path / "part", f"--eval.benchmarks=[{bench}]", "--eval.shuffled=true"))
    types = [r["record"]["problem_type"] for r in edited]
    assert summary(tmp_path / "part", "mini")["score"] == headline([(t, r["score"]) for t, r in zip(types, edited)])
    assert summary(tmp_path / "part", "mini")["mean_acc"] == pytest.approx(0.2)  # 1 of 5 non-regression items


def test_broken_video_is_counted_with_skip_bad_else_one_line_error(synthetic, tmp_path, capsys):
    bench = write_benchmark(tmp_path / "b", synthetic, [MC_VIDEO, MC_VIDEO_2, NUMERICAL_IMAGE])
    bad = tmp_path / "b" / json.loads(bench.read_text())[1]["path"]
    bad.write_bytes(bad.read_bytes()[: bad.stat().st_size // 3])
    with pytest.raises(SystemExit) as e:
        main(eval_args(tmp_path / "out", f"--eval.benchmarks=[{bench}]"))
    err = capsys.readouterr().err.strip()
    assert e.value.code == 1 and err.startswith("vr1fast.eval: error: cannot decode") and str(bad) in err
    assert "\n" not in err
    main(eval_args(tmp_path / "out", f"--eval.benchmarks=[{bench}]", "--data.skip_bad=true", "--eval.resume=false"))
    rows = read_jsonl(tmp_path / "out" / "mini.jsonl")
    assert "score" not in rows[1] and str(bad) in rows[1]["broken"] and all("score" in rows[i] for i in (0, 2))
    s = summary(tmp_path / "out", "mini")
    assert (s["scored"], s["broken"]) == (2, 1) and s["broken_items"][0]["index"] == 1
    out = capsys.readouterr().out
    assert "mini: 1 broken media file(s)" in out


def test_shuffled_eval_on_the_synthetic_held_out_set(synthetic, tmp_path):
    main(eval_args(tmp_path / "out", f"--data.synthetic_dir={synthetic}", "--eval.heldout_size=8",
                   "--eval.shuffled=true"))
    rows = read_jsonl(tmp_path / "out" / "heldout.jsonl")
    videos = [r for r in rows if r["record"]["data_type"] == "video"]
    assert len(rows) == 8 and len(videos) == 6
    for r in rows:
        shuffled = r["record"]["data_type"] == "video"
        assert ("shuffled_output" in r) == ("permutation" in r) == shuffled
        if shuffled:
            assert sorted(r["permutation"]) == list(range(8)) and r["permutation"] != list(range(8))
            assert r["shuffled_score"] == score(r["shuffled_output"], r["record"]["solution"],
                                                r["record"]["problem_type"])
    s = summary(tmp_path / "out", "heldout")
    ordered = headline([(r["record"]["problem_type"], r["score"]) for r in videos])
    shuffled = headline([(r["record"]["problem_type"], r["shuffled_score"]) for r in videos])
    assert (s["video_items"], s["ordered_accuracy"], s["shuffled_accuracy"]) == (6, ordered, shuffled)
    assert s["gap"] == ordered - shuffled
    # held out: other records than the training set's (another seed), written beside it
    train_videos = sorted((synthetic / "videos").iterdir())
    held_videos = sorted((heldout_dir(demo_with(synthetic)) / "videos").iterdir())
    assert [p.name for p in held_videos] == [p.name for p in train_videos[:6]]
    assert all(a.read_bytes() != b.read_bytes() for a, b in zip(held_videos, train_videos))


def demo_with(synthetic: Path):
    cfg = demo()
    cfg.data.synthetic_dir = str(synthetic)
    return cfg


def test_videor1_eval_preset_and_the_real_fps_in_m_rope(synthetic, capsys):
    with pytest.raises(SystemExit):
        main(["--help"])  # python -m vr1fast.eval starts from videor1_eval
    assert "preset (videor1_eval here;" in capsys.readouterr().out
    cfg = videor1_eval()
    assert (cfg.data.eval_mode, cfg.video.max_frames, cfg.video.max_pixels, cfg.video.min_pixels) == \
        (True, 32, 256 * 28 * 28, 128 * 28 * 28)
    assert (cfg.eval.sampling, cfg.eval.temperature, cfg.eval.top_p, cfg.eval.max_new_tokens) == \
        ("videor1", 0.1, 0.001, 1024)
    bench = load_benchmark(synthetic / "rl.json", cfg)
    video = Item(bench.samples[MC_VIDEO], bench.records[MC_VIDEO])  # 32 frames at 4 fps
    loaded = load_item(video, cfg)  # 2 fps over 8 s: 16 frames, sampled at 2 fps -> 2 / 2 s per temporal patch
    assert loaded.media.shape[0] == 16 and loaded.seconds_per_grid == 1.0
    demo_cfg = demo_with(synthetic)  # at most 8 frames: sampled at 1 fps -> 2 s per temporal patch
    assert load_item(video, demo_cfg).seconds_per_grid == 2.0
    demo_cfg.eval.real_fps = False  # training's constant instead
    assert load_item(video, demo_cfg).seconds_per_grid == demo_cfg.data.second_per_grid_ts == 1.0


def test_greedy_answers_are_deterministic_across_seeds_engines_and_videor1_sampling(synthetic):
    cfg = demo_with(synthetic)
    cfg.eval.max_new_tokens = 6
    bench = load_benchmark(synthetic / "rl.json", cfg)
    items = [Item(s, r) for s, r in zip(bench.samples, bench.records)][:4]
    model, tokenizer = tiny_model(0)
    device = torch.device("cpu")
    first = answer_batch(model, tokenizer, items, cfg, device=device, seed=1, shuffled=True)
    assert answer_batch(model, tokenizer, items, cfg, device=device, seed=2, shuffled=True) == first
    cfg.rollout.engine = "paged"
    assert answer_batch(model, tokenizer, items, cfg, device=device, seed=3, shuffled=True) == first
    cfg.rollout.engine, cfg.eval.sampling = "hf", "videor1"  # temperature 0.1, top-p 0.001: the top token
    assert answer_batch(model, tokenizer, items, cfg, device=device, seed=4, shuffled=True) == first


def test_a_lora_checkpoint_is_loaded_onto_its_base_model(synthetic, tmp_path):
    cfg = demo_with(synthetic)
    cfg.eval.max_new_tokens = 6
    model, tokenizer = tiny_model(0)
    lora.apply_lora(model, cfg.model.lora)  # base None: the tiny model
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator))
    lora.save_adapter(model, model.state_dict(), tmp_path / "step_000001" / "model")
    loaded, _ = load_eval_model(cfg, tmp_path / "step_000001", torch.device("cpu"))
    adapters = {k: v for k, v in model.state_dict().items() if "lora_" in k}
    assert adapters and all(torch.equal(loaded.state_dict()[k], v) for k, v in adapters.items())
    bench = load_benchmark(synthetic / "rl.json", cfg)
    items = [Item(s, r) for s, r in zip(bench.samples, bench.records)][:2]
    answers = [answer_batch(m, tokenizer, items, cfg, device=torch.device("cpu"), seed=0) for m in (model, loaded)]
    assert answers[0] == answers[1]


@pytest.mark.slow
def test_two_process_torchrun_eval_equals_the_one_process_eval(synthetic, tmp_path):
    def args(out):
        return eval_args(out, f"--data.synthetic_dir={synthetic}", "--eval.heldout_size=8", "--eval.shuffled=true",
                         "--eval.batch_size=3")  # 3 batches: rank 0 answers batches 0 and 2, rank 1 batch 1

    two = two_ranks("-m", "vr1fast.eval", *args(tmp_path / "two"), timeout=300)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each torchrun worker
    try:
        main(args(tmp_path / "one"))
    finally:
        torch.set_num_threads(threads)
    assert read_jsonl(tmp_path / "two" / "heldout.jsonl") == read_jsonl(tmp_path / "one" / "heldout.jsonl")
    assert summary(tmp_path / "two", "heldout") == summary(tmp_path / "one", "heldout")
    assert sum(line.startswith("heldout ") for line in two.stdout.splitlines()) == 1  # one table, from rank 0


def test_demo_preset_evaluates_a_model_folder(synthetic, tmp_path):
    """The README's ``python -m vr1fast.eval --preset=demo --model.path=CKPT``: the demo preset's warm start (a
    training setting that refuses a model.path) is off in eval, so a saved model evaluates."""
    from vr1fast.model.load import save_tiny

    out = tmp_path / "out"
    main(eval_args(out, f"--model.path={save_tiny(tmp_path / 'tiny')}", f"--eval.benchmarks=[{synthetic / 'rl.json'}]"))
    assert summary(out, "rl")["scored"] == 8
