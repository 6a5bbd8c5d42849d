"""Video-R1's eval scoring (``src/eval_bench.py::reward_fn``), branch by branch, against values derived by hand.

MRA values are float32: ``k`` of the ten thresholds passing gives ``f32(k / 10)``. The thresholds' float32 margins
``1 - θ`` are 0.5, 0.44999999, 0.39999998, 0.35000002, 0.30000001, 0.25, 0.19999999, 0.14999998, 0.10000002 and
0.05000001 (``1 - f32(θ)`` for θ = 0.5 + 0.05 i accumulated in float32 by ``torch.arange``)."""
import math
import struct

import pytest

from vr1fast.eval.scoring import benchmark_means, mean_relative_accuracy, prediction, process, score, vsi_bench_score
from vr1fast.rl.rewards import accuracy_reward


def f32(x: float) -> float:
    """``x`` rounded to float32, back as a Python float (no torch: an independent oracle)."""
    return struct.unpack("f", struct.pack("f", x))[0]


def ans(text: str) -> str:
    return f"<think>reasoning</think><answer>{text}</answer>"


NAN, INF = float("nan"), float("inf")


# ------------------------------------------------------------------ extraction


@pytest.mark.parametrize("output, expected", [
    ("<think>x</think><answer> B </answer>", "B"),
    ("<answer>A</answer> then <answer>B</answer>", "A"),          # first block
    ("B", "B"),                                                   # no tag: the whole output
    ("  the answer is B\n", "  the answer is B\n"),               # ... unstripped
    ("<answer>B", "<answer>B"),                                   # unclosed tag
    ("<answer> </answer>", "<answer> </answer>"),                 # empty block falls back too
    ("", ""),
])
def test_prediction(output, expected):
    assert prediction(output) == expected


# ------------------------------------------------------------------ multiple choice


@pytest.mark.parametrize("output, expected", [
    (ans("B"), 1.0),
    (ans(" B\n"), 1.0),
    (ans("B."), 0.0), (ans("(B)"), 0.0), (ans("b"), 0.0), (ans("A"), 0.0),
    ("B", 1.0),                        # no tag: the whole output is the answer (training scores this 0.0)
    ("  B \n", 1.0),                   # ... compared stripped
    ("The answer is B", 0.0),
    ("<answer>B", 0.0),                # unclosed: the whole "<answer>B" is compared
    ("B</answer>", 0.0),               # a stray end tag stays in the answer (re-wrapping would have cut it to "B")
    ("<answer></answer>B", 0.0),       # empty block: the whole output, tags included
])
def test_multiple_choice(output, expected):
    assert score(output, "<answer>B</answer>", "multiple choice") == expected


def test_multiple_choice_untagged_is_where_eval_and_training_differ():
    assert accuracy_reward("B", "<answer>B</answer>", "multiple choice") == 0.0
    assert score("B", "<answer>B</answer>", "multiple choice") == 1.0


def test_ground_truth_has_no_fallback():
    """A solution without tags has the answer "": only an empty output matches it (Video-R1 does the same)."""
    assert score("B", "B", "multiple choice") == 0.0
    assert score("", "B", "multiple choice") == 1.0


# ------------------------------------------------------------------ numerical


@pytest.mark.parametrize("output, solution, expected", [
    (ans("3.14"), "3.14", 1.0),
    (ans("3.141"), "3.14", 1.0),       # round(·, 2) on both
    (ans("3.15"), "3.14", 0.0),
    (ans("3"), "3.0", 0.0),            # "." on one side only
    (ans("1,000"), "1000", 0.0),       # "," on one side only
    (ans("1,000"), "1,000", 1.0),      # commas removed before float
    (ans("42"), "42", 1.0),
    ("42", "42", 1.0),                 # no tag
    (" 42\n", "42", 1.0),
    ("the answer is 42", "42", 0.0),   # unparseable: 0.0, no exception
    ("42</answer>", "42", 0.0),        # a stray end tag: not a number
    (ans("forty-two"), "42", 0.0),
])
def test_numerical(output, solution, expected):
    assert score(output, f"<answer>{solution}</answer>", "numerical") == expected


# ------------------------------------------------------------------ mean relative accuracy


@pytest.mark.parametrize("p, t, passing", [
    (10, 10, 10),                      # exact: rel 0 passes all
    (1e30, 1e30, 10),                  # huge but inside float32
    (9, 10, 9),                        # rel f32(0.1) = 0.1000000015 < 0.10000002: θ 0.9 passes (exact maths: 8)
    (11, 10, 9),
    (14, 10, 2),                       # rel 0.4000000060: passes 0.5 and 0.44999999 only
    (15, 10, 0),                       # rel 0.5 is not < 0.5
    (0, 0, 10),                        # target 0: rel = 0 / 1e-8
    (2.2e-9, 0, 6),                    # target 0: rel 0.22 < 0.25 (θ 0.75), not < 0.19999999
    (1e-8, 0, 0),                      # target 0: rel 1
    (1, 0, 0),                         # target 0: rel 1e8
    (-9, -10, 9),                      # negative: as (9, 10)
    (-12, -10, 6),                     # rel f32(0.2) = 0.2000000030 fails 0.19999999
    (10, -10, 0),                      # sign error: rel 2
])
def test_mean_relative_accuracy(p, t, passing):
    assert mean_relative_accuracy(p, t) == f32(passing / 10)


def test_mean_relative_accuracy_is_float32():
    assert mean_relative_accuracy(9, 10) == 0.8999999761581421 != 0.9


@pytest.mark.parametrize("p, t", [
    (1e39, 1e39),                      # both overflow float32 to inf; inf - inf is NaN
    (3e38, -3e38),                     # the difference overflows: rel inf
    (1e39, 10), (10, 1e39),
    (NAN, 1.0), (1.0, NAN), (NAN, NAN),
    (INF, INF), (INF, 1.0), (1.0, INF), (-INF, -INF),
])
def test_mean_relative_accuracy_non_finite_scores_zero(p, t):
    assert mean_relative_accuracy(p, t) == 0.0


# ------------------------------------------------------------------ regression


@pytest.mark.parametrize("output, solution, expected", [
    (ans("10"), "10", 1.0),
    (ans("9"), "10", f32(0.9)),
    ("9", "10", f32(0.9)),             # no tag
    (ans("9.0"), "10", f32(0.9)),      # no decimal-point rule for regression
    (ans("1,000"), "1000", 1.0),       # commas removed
    (ans("0"), "0", 1.0),              # training: 0.0 for every answer when the target is 0
    (ans("nine"), "10", 0.0),          # unparseable: 0.0 (training raises and counts it)
    (ans("10"), "ten", 0.0),
    (ans("nan"), "10", 0.0),           # training scores "nan" 1.0
    (ans("inf"), "10", 0.0),
    (ans("1e39"), "1e39", 0.0),        # float32 overflow
])
def test_regression(output, solution, expected):
    assert score(output, f"<answer>{solution}</answer>", "regression") == expected


def test_regression_nan_differs_from_training():
    assert accuracy_reward(ans("nan"), "<answer>10</answer>", "regression") == 1.0
    assert score(ans("nan"), "<answer>10</answer>", "regression") == 0.0


# ------------------------------------------------------------------ OCR, free-form, others


@pytest.mark.parametrize("problem_type", ["OCR", "free-form", "math", "Multiple Choice", ""])
def test_other_types_score_zero(problem_type):
    assert score(ans("a red cube"), "<answer>a red cube</answer>", problem_type) == 0.0


def test_training_rules_for_ocr():
    solution = "<answer>a b c</answer>"
    assert score(ans("a b c"), solution, "OCR", rules="train") == 1.0
    assert math.isclose(score(ans("a b d"), solution, "OCR", rules="train"), 1 - 1 / 3)   # one substitution of 3
    assert math.isclose(score("a b d", solution, "OCR", rules="train"), 1 - 1 / 3)        # untagged fallback
    assert score("a b c", solution, "OCR") == 0.0


def test_training_rules_for_free_form():
    pytest.importorskip("rouge_score")
    solution = "<answer>a red cube</answer>"
    assert score("a red cube", solution, "free-form", rules="train") == 1.0     # identical: all F-measures 1
    assert score("green", solution, "free-form", rules="train") == 0.0          # no shared token


def test_training_rules_change_nothing_else():
    assert score("9", "<answer>10</answer>", "regression", rules="train") == f32(0.9)
    assert score("B", "<answer>B</answer>", "multiple choice", rules="train") == 1.0


def test_unknown_rules_rejected():
    with pytest.raises(ValueError, match="rules"):
        score("B", "<answer>B</answer>", "multiple choice", rules="training")


# ------------------------------------------------------------------ benchmark means and VSI-Bench


ITEMS = [("multiple choice", 1.0), ("multiple choice", 0.0), ("numerical", 1.0), ("multiple choice", 1.0),
         ("regression", 0.75), ("regression", 0.25)]


def test_benchmark_means_split_by_type():
    assert benchmark_means(ITEMS) == {"mean_acc": 0.75, "mean_mra": 0.5}


def test_benchmark_means_are_float32():
    assert benchmark_means([("multiple choice", 1.0), ("numerical", 0.0), ("numerical", 0.0)])["mean_acc"] == f32(1 / 3)


def test_benchmark_means_empty_groups():
    assert benchmark_means([("numerical", 1.0)]) == {"mean_acc": 1.0, "mean_mra": None}
    assert benchmark_means([("regression", 0.5)]) == {"mean_acc": None, "mean_mra": 0.5}
    assert benchmark_means([]) == {"mean_acc": None, "mean_mra": None}


def test_vsi_bench_score_averages_the_two_means():
    """(0.75 + 0.5) / 2, not the mean over all six items (2/3) nor a count-weighted mix."""
    assert vsi_bench_score(ITEMS) == 0.625
    assert vsi_bench_score(iter(ITEMS)) == 0.625                                 # any iterable


@pytest.mark.parametrize("items", [[("multiple choice", 1.0)], [("regression", 1.0)], []])
def test_vsi_bench_score_needs_both_groups(items):
    with pytest.raises(ValueError, match="both"):
        vsi_bench_score(items)


def test_vsi_bench_from_scored_outputs():
    """score → benchmark_means → VSI: MC right, MC wrong (untagged "A"), regression 9 vs 10 and 10 vs 10."""
    rows = [("multiple choice", ans("B"), "B"), ("multiple choice", "A", "B"),
            ("regression", ans("9"), "10"), ("regression", "10", "10")]
    items = [(kind, score(output, f"<answer>{gt}</answer>", kind)) for kind, output, gt in rows]
    mra = f32((f32(0.9) + 1.0) / 2)    # float32 sum 1.8999999762 is exact; / 2 is exact
    assert benchmark_means(items) == {"mean_acc": 0.5, "mean_mra": mra}
    assert vsi_bench_score(items) == (0.5 + mra) / 2


@pytest.mark.parametrize("output, expected", [
    ("<think> let me think\nwait </think>\n<answer>B</answer>", "<think>let me think\nwait</think>"),
    ("<think>a</think><think>b</think>", "<think>a</think>"),          # the first block
    ("<think>  </think><answer>B</answer>", ""),                       # empty
    ("<think>unclosed <answer>B</answer>", ""),
    ("B", ""),
])
def test_process_is_the_first_think_block(output, expected):
    assert process(output) == expected
