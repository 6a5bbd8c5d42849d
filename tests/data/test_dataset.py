"""Record loading and validation (docs/video-r1.md §5) and the resumable sampler."""
import json
import logging
import os

import pytest

from vr1fast.config import DataConfig
from vr1fast.data.dataset import Position, Sampler, load_records
from vr1fast.errors import RecordError

MEDIA = ["CLEVRER/video_1.mp4", "Math/img_2.png", "STAR/video_3.mp4"]


def good_records():
    return [
        {"problem_id": 2, "problem": "What moves first?", "data_type": "video", "problem_type": "multiple choice",
         "options": ["A. The cube", "B. The sphere"], "solution": "<answer>A</answer>",
         "path": "./CLEVRER/video_1.mp4", "data_source": "CLEVRER"},
        {"problem_id": "p3", "problem": "What is x?", "data_type": "image", "problem_type": "numerical",
         "options": [], "solution": "<answer> 3.5 </answer>", "path": "./Math/img_2.png"},
        {"problem": "Describe the scene.", "data_type": "video", "problem_type": "free-form",
         "solution": "<answer>A man walks a dog.</answer>", "path": "STAR/video_3.mp4",
         "process": "<think>I see a man.</think>"},
    ]


@pytest.fixture
def media_root(tmp_path):
    root = tmp_path / "media"
    for rel in MEDIA:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(b"\x00\x00\x00\x18ftypmp42")
    return root


def write(tmp_path, records, name="train.json", jsonl=False):
    path = tmp_path / name
    if jsonl:
        path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    else:
        path.write_text(json.dumps(records, indent=1))
    return path


def cfg(media_root, **kw):
    return DataConfig(media_root=str(media_root), **kw)


def test_json_list_fields(tmp_path, media_root):
    path = write(tmp_path, good_records())
    records = load_records(path, cfg(media_root))
    assert len(records) == 3 and records.skipped == 0
    first, second, third = records
    assert first.problem_id == 2 and first.problem == "What moves first?"
    assert first.options == ("A. The cube", "B. The sphere")
    assert first.solution == "<answer>A</answer>" and first.answer == "A"
    assert (first.data_type, first.problem_type) == ("video", "multiple choice")
    assert first.path == os.path.join(str(media_root), "CLEVRER", "video_1.mp4")
    assert first.process is None and first.index == 0 and first.source == str(path)
    assert second.problem_id == "p3" and second.answer == "3.5" and second.options == ()
    assert second.path == str(media_root / "Math" / "img_2.png")
    assert third.problem_id is None and third.process == "<think>I see a man.</think>"
    assert third.path == str(media_root / "STAR" / "video_3.mp4") and third.index == 2


def test_jsonl_equals_json_list(tmp_path, media_root):
    from_list = load_records(write(tmp_path, good_records()), cfg(media_root))
    lines = [json.dumps(r) for r in good_records()]
    from_lines = load_records(write(tmp_path, [lines[0], "", lines[1], lines[2]], "t.jsonl", jsonl=True),
                              cfg(media_root))
    strip = [(s.problem, s.options, s.answer, s.path, s.index) for s in from_list]
    assert strip == [(s.problem, s.options, s.answer, s.path, s.index) for s in from_lines]


def test_media_root_defaults_to_the_file_directory(tmp_path, media_root):
    path = write(media_root, good_records())
    records = load_records(path, DataConfig())
    assert records[0].path == str(media_root / "CLEVRER" / "video_1.mp4")
    assert load_records(None, DataConfig(path=str(path)))[1].answer == "3.5"


def edit(index, field, value):
    def apply(records):
        if value is DELETE:
            del records[index][field]
        else:
            records[index][field] = value
        return records
    return apply


DELETE = object()
BAD = [
    (edit(0, "problem", DELETE), 0, "problem", "missing"),
    (edit(1, "problem", 17), 1, "problem", "expected a string"),
    (edit(2, "problem", "  "), 2, "problem", "empty"),
    (edit(0, "data_type", "audio"), 0, "data_type", "'audio' is not one of"),
    (edit(1, "problem_type", "math"), 1, "problem_type", "'math' is not one of"),
    (edit(0, "problem_type", DELETE), 0, "problem_type", "missing"),
    (edit(0, "options", DELETE), 0, "options", "missing"),
    (edit(0, "options", []), 0, "options", "at least one option"),
    (edit(0, "options", ["A. x", 3]), 0, "options", "list of strings"),
    (edit(1, "options", "A. x"), 1, "options", "list of strings"),
    (edit(0, "solution", "A"), 0, "solution", "no <answer>"),
    (edit(0, "solution", "<answer>  </answer>"), 0, "solution", "empty"),
    (edit(2, "solution", DELETE), 2, "solution", "missing"),
    (edit(1, "path", DELETE), 1, "path", "missing"),
    (edit(1, "path", "./Math/nope.png"), 1, "path", "media file not found"),
    (edit(2, "process", 5), 2, "process", "expected a string"),
    (edit(0, "problem_id", [1]), 0, "problem_id", "integer or string"),
]


@pytest.mark.parametrize("mutate, index, field, reason", BAD)
def test_bad_record_names_file_index_field(tmp_path, media_root, mutate, index, field, reason):
    path = write(tmp_path, mutate(good_records()))
    with pytest.raises(RecordError) as info:
        load_records(path, cfg(media_root))
    err = info.value
    assert (err.file, err.index, err.field) == (str(path), index, field)
    assert reason in err.reason
    assert str(err).startswith(f"{path}: record {index}: field {field!r}: ")


def test_record_not_an_object_and_bad_jsonl_line(tmp_path, media_root):
    with pytest.raises(RecordError, match=r"record 1: field '<record>': expected a JSON object"):
        load_records(write(tmp_path, [good_records()[0], [1, 2]]), cfg(media_root))
    path = write(tmp_path, [json.dumps(good_records()[0]), "{not json"], "b.jsonl", jsonl=True)
    with pytest.raises(RecordError, match=r"record 1: field '<json>': line 2 is not valid JSON"):
        load_records(path, cfg(media_root))


def test_process_required_for_sft(tmp_path, media_root):
    path = write(tmp_path, good_records())
    with pytest.raises(RecordError, match=r"record 0: field 'process': missing"):
        load_records(path, cfg(media_root), require_process=True)


def test_missing_media_allowed_when_not_checked(tmp_path, media_root):
    records = good_records()
    records[1]["path"] = "./Math/not_there.png"
    loaded = load_records(write(tmp_path, records), cfg(media_root), check_media=False)
    assert loaded[1].path == str(media_root / "Math" / "not_there.png")


def test_skip_bad_counts_and_reports(tmp_path, media_root, caplog):
    records = good_records() + good_records()          # indices 0..5
    records[1]["problem_type"] = "math"
    records[3]["path"] = "./CLEVRER/missing.mp4"
    records[4]["solution"] = "3.5"
    path = write(tmp_path, records)
    with caplog.at_level(logging.WARNING):
        loaded = load_records(path, cfg(media_root, skip_bad=True))
    assert loaded.skipped == 3
    assert [s.index for s in loaded] == [0, 2, 5]     # kept in place, nothing substituted
    assert [s.problem for s in loaded] == ["What moves first?", "Describe the scene.", "Describe the scene."]
    assert len(loaded.reasons) == 3
    assert "record 1: field 'problem_type'" in loaded.reasons[0]
    assert "record 3: field 'path'" in loaded.reasons[1] and "record 4: field 'solution'" in loaded.reasons[2]
    assert loaded.summary.startswith(f"{path}: 3 records loaded, 3 skipped; ")
    assert loaded.summary in caplog.text


def test_skip_bad_summary_is_truncated(tmp_path, media_root):
    records = [dict(good_records()[1], data_type="audio") for _ in range(8)] + [good_records()[0]]
    loaded = load_records(write(tmp_path, records), cfg(media_root, skip_bad=True))
    assert loaded.skipped == 8 and len(loaded.reasons) == 5 and loaded.summary.endswith("; ...")


def test_file_level_errors(tmp_path, media_root):
    with pytest.raises(FileNotFoundError, match="nope.json"):
        load_records(tmp_path / "nope.json", cfg(media_root))
    broken = tmp_path / "broken.json"
    broken.write_text('[{"problem": 1},')
    with pytest.raises(ValueError, match="broken.json: not a valid JSON list"):
        load_records(broken, cfg(media_root))
    all_bad = write(tmp_path, [dict(good_records()[0], data_type="x")])
    with pytest.raises(ValueError, match="no usable records"):
        load_records(all_bad, cfg(media_root, skip_bad=True))


# ------------------------------------------------------------------ sampler


def test_sampler_orders_are_seeded_permutations():
    a, b = Sampler(50, seed=3), Sampler(50, seed=3)
    assert sorted(a.order(0)) == list(range(50))
    assert a.order(0) == b.order(0) and a.order(1) == b.order(1)
    assert a.order(0) != a.order(1) and a.order(0) != Sampler(50, seed=4).order(0)
    assert a.order(0) != list(range(50))
    assert Sampler(5, shuffle=False).order(2) == [0, 1, 2, 3, 4]


def test_sampler_stream_crosses_epochs_and_resumes():
    sampler = Sampler(7, seed=1)
    stream = sampler.order(0) + sampler.order(1) + sampler.order(2)
    position, taken = Position(), []
    for _ in range(5):                                  # 5 steps x 3 = 15 items: epochs 0, 1 and one of 2
        indices, position = sampler.take(position, 3)
        taken += indices
    assert taken == stream[:15] and position == Position(2, 1)
    resumed = Sampler(7, seed=1).take(Position(1, 4), 3)   # a fresh sampler picks up mid-epoch
    assert resumed == (stream[11:14], Position(2, 0))


def test_sampler_splits_a_step_across_ranks():
    sampler = Sampler(10, seed=0, shuffle=False)
    parts = [sampler.take(Position(0, 8), 2, rank=r, world_size=3) for r in range(3)]
    assert [p[0] for p in parts] == [[8, 9], [0, 1], [2, 3]]
    assert {p[1] for p in parts} == {Position(1, 4)}
    with pytest.raises(ValueError, match="outside"):
        sampler.take(Position(0, 10), 1)
    with pytest.raises(ValueError, match="rank"):
        sampler.take(Position(), 1, rank=3, world_size=3)


def test_samples_are_frozen(tmp_path, media_root):
    sample = load_records(write(tmp_path, good_records()), cfg(media_root))[0]
    with pytest.raises(AttributeError):
        sample.answer = "B"  # type: ignore[misc]
