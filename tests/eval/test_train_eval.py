"""Evaluation inside ``vr1fast.train``: the held-out numbers every ``eval.every`` steps and the final start-vs-last
table (``eval.final``, on in the demo preset), on the tiny model and the synthetic sets."""
import json
from pathlib import Path

import pytest

from runs import small, two_ranks
from vr1fast.metrics import read_jsonl
from vr1fast.train import main

REPO = Path(__file__).resolve().parents[2]
KEYS = ("eval/accuracy", "eval/ordered_accuracy", "eval/shuffled_accuracy", "eval/gap")


def test_training_logs_held_out_numbers_and_ends_with_the_start_vs_last_table(synthetic, tmp_path, capsys):
    out = tmp_path / "run"
    main(small(synthetic, out, "--train.max_steps=2", "--train.log_every=1", "--eval.every=2", "--eval.final=true",
               "--eval.heldout_size=8", "--eval.sampling=greedy", "--eval.max_new_tokens=4", "--eval.batch_size=4"))
    rows = read_jsonl(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2]
    assert not any(k in rows[0] for k in KEYS)
    step2 = rows[1]
    assert all(k in step2 for k in KEYS) and step2["eval/broken"] == 0
    assert step2["eval/gap"] == step2["eval/ordered_accuracy"] - step2["eval/shuffled_accuracy"]

    text = capsys.readouterr().out
    table = text[text.index("eval on heldout"):].splitlines()
    assert "8 items, 6 videos also shuffled; greedy, 4 tokens" in table[0]
    assert table[1].split()[:4] == ["score", "mean_acc", "mean_mra", "ordered"]
    assert [line.split()[0] for line in table[2:]] == ["start", "last"]
    start, last = (json.loads((out / "eval" / m / "heldout.summary.json").read_text()) for m in ("start", "last"))
    assert start["settings"]["model"] == "tiny (seed 0)"
    assert last["settings"]["model"] == str(out / "checkpoints" / "step_000002")
    # the in-training eval at step 2 saw the very weights the last checkpoint holds
    assert (last["score"], last["ordered_accuracy"], last["shuffled_accuracy"]) == \
        (step2["eval/accuracy"], step2["eval/ordered_accuracy"], step2["eval/shuffled_accuracy"])
    assert len(read_jsonl(out / "eval" / "last" / "heldout.jsonl")) == 8


@pytest.mark.slow
def test_two_rank_fsdp2_training_logs_held_out_numbers_equal_to_its_last_checkpoint_eval(synthetic, tmp_path):
    """Under torchrun (gloo, FSDP2) the policy answers inside one weight gather per benchmark, each rank its batches;
    rank 0 logs what the final eval of the saved checkpoint (2 ranks again) also finds."""
    out = tmp_path / "run"
    argv = small(synthetic, out, "--train.max_steps=2", "--dist.strategy=fsdp2", "--eval.every=2",
                 "--eval.final=true", "--eval.heldout_size=8", "--eval.sampling=greedy", "--eval.max_new_tokens=4",
                 "--eval.batch_size=3")
    result = two_ranks("-m", "vr1fast.train", *argv, timeout=300)
    step2 = read_jsonl(out / "metrics.jsonl")[-1]
    last = json.loads((out / "eval" / "last" / "heldout.summary.json").read_text())
    assert last["scored"] == 8 and step2["eval/broken"] == 0
    assert (last["score"], last["ordered_accuracy"], last["shuffled_accuracy"]) == \
        (step2["eval/accuracy"], step2["eval/ordered_accuracy"], step2["eval/shuffled_accuracy"])
    assert result.stdout.count("eval on heldout") == 1
