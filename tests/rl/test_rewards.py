"""Video-R1's reward functions, branch by branch, against values derived by hand from grpo.py's rules."""
import math

import pytest
from rouge_score import rouge_scorer

from vr1fast.rl.rewards import (accuracy_reward, extract_answer, format_reward, try_accuracy_reward,
                                word_error_rate)


def ans(text: str) -> str:
    return f"<think>reasoning</think><answer>{text}</answer>"


# ------------------------------------------------------------------ extract_answer


@pytest.mark.parametrize("text, expected", [
    ("<answer> B </answer>", "B"),
    ("<think>x</think>\n<answer>\n  line one\nline two \n</answer>", "line one\nline two"),
    ("<answer>A</answer> then <answer>B</answer>", "A"),          # first match
    ("no tags at all", ""),
    ("<answer>A", ""),                                            # unclosed
    ("<ANSWER>A</ANSWER>", ""),                                   # tags are case-sensitive
    ("<answer></answer>", ""),
    ("<answer>\tC.\t</answer>", "C."),
])
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


# ------------------------------------------------------------------ format_reward


@pytest.mark.parametrize("text, expected", [
    ("<think>x</think><answer>A</answer>", 1.0),
    ("<think>x</think>\n\n  <answer>A</answer>", 1.0),           # whitespace between the blocks
    ("<think>a\nb</think><answer>\nA\n</answer>", 1.0),           # DOTALL
    ("<think></think><answer></answer>", 1.0),
    ("<think>a<think>b</think></think><answer>A</answer>", 1.0),  # nested think: the lazy .*? backtracks
    ("<think>x</think><answer>A</answer><answer>B</answer>", 1.0),  # .*? spans into the second block
    (" <think>x</think><answer>A</answer>", 0.0),                 # text before <think>
    ("Sure. <think>x</think><answer>A</answer>", 0.0),
    ("<think>x</think><answer>A</answer>\n", 0.0),                # text after </answer>
    ("<think>x</think> so <answer>A</answer>", 0.0),              # non-whitespace between blocks
    ("<answer>A</answer>", 0.0),
    ("<answer>A</answer><think>x</think>", 0.0),
])
def test_format_reward(text, expected):
    assert format_reward(text) == expected


# ------------------------------------------------------------------ multiple choice


@pytest.mark.parametrize("out, gt, expected", [
    (ans("A"), "<answer>A</answer>", 1.0),
    (ans("  A "), "<answer>A</answer>", 1.0),
    (ans("a"), "<answer>A</answer>", 0.0),        # case-sensitive
    (ans("A."), "<answer>A</answer>", 0.0),
    (ans("(A)"), "<answer>A</answer>", 0.0),
    ("A", "<answer>A</answer>", 0.0),             # no tag: "" != "A"
    ("<answer>B</answer><answer>A</answer>", "<answer>A</answer>", 0.0),  # first block only
    ("no answer", "<answer></answer>", 1.0),      # "" == "": Video-R1 scores an empty gt this way
])
def test_multiple_choice(out, gt, expected):
    assert accuracy_reward(out, gt, "multiple choice") == expected


# ------------------------------------------------------------------ numerical


@pytest.mark.parametrize("out, gt, expected", [
    ("3.14", "3.14", 1.0),
    ("3.141", "3.14", 1.0),     # round(3.141, 2) = 3.14
    ("3.146", "3.14", 0.0),     # 3.15
    ("3.00", "3.0", 1.0),
    ("3", "3.0", 0.0),          # the gt has a ".", the output not -> 0 before any parsing
    ("3.0", "3", 0.0),
    ("1000", "1,000", 0.0),     # "," counts as a decimal mark for that check
    ("1000.0", "1,000", 1.0),   # both have one; commas stripped: 1000.0 == 1000
    ("1.000", "1,000", 0.0),    # 1.0 vs 1000
    ("1e3", "1000", 1.0),       # float("1e3"); neither has "." or ","
    ("-5", "-5", 1.0),
    ("0.12", "0.125", 1.0),     # round(0.125, 2) = 0.12 (0.125 is exact, half to even)
    ("0.37", "0.375", 0.0),     # round(0.375, 2) = 0.38
    ("three", "3", 0.0),        # unparseable -> 0 (not an exception in Video-R1)
    ("", "3", 0.0),
])
def test_numerical(out, gt, expected):
    reward, error = try_accuracy_reward(ans(out), f"<answer>{gt}</answer>", "numerical")
    assert reward == expected
    assert error is None


# ------------------------------------------------------------------ OCR


@pytest.mark.parametrize("ref, hyp, wer", [
    ("hello world", "hello world", 0.0),
    ("the quick brown fox", "the quick brown dog", 0.25),   # 1 substitution / 4
    ("a b c d", "a c d", 0.25),                             # 1 deletion / 4
    ("a b c d e", "b a c d e", 0.4),                        # 2 edits / 5
    ("a b", "a x b y z", 1.5),                              # 3 insertions / 2
    ("Hello", "hello", 1.0),                                # case-sensitive
    ("stop.", "stop", 1.0),                                 # no punctuation normalisation
    ("", "", 0.0),                                          # 0 / max(1, 0)
    ("", "x", 1.0),
    ("a  b\nc", "a b c", 0.0),                              # str.split() tokens
])
def test_word_error_rate(ref, hyp, wer):
    assert word_error_rate(ref, hyp) == pytest.approx(wer, abs=1e-12)


@pytest.mark.parametrize("out, gt, expected", [
    ("the quick brown dog", "the quick brown fox", 0.75),
    ("a b c d e", "a b c d e", 1.0),
    ("b a c d e", "a b c d e", 0.6),
    ("a x b y z", "a b", 0.0),      # 1 - 1.5 clipped to 0
    ("", "", 1.0),
    ("x", "", 0.0),
])
def test_ocr(out, gt, expected):
    assert accuracy_reward(ans(out), f"<answer>{gt}</answer>", "OCR") == pytest.approx(expected, abs=1e-12)


# ------------------------------------------------------------------ free-form (ROUGE-1/2/L F, stemmed)


@pytest.mark.parametrize("out, gt, expected", [
    ("the cat sat", "the cat sat", 1.0),
    # R1 P=1 R=1/3 F=1/2; R2 no bigram in the output F=0; RL LCS=1 F=1/2 -> (1/2 + 0 + 1/2) / 3
    ("cat", "the cat sat", 1 / 3),
    # stemmed "running"->"run", "dogs"->"dog": R1 F=1, R2 (run dog) vs (dog run) F=0, RL LCS 1 F=1/2
    ("dogs running", "running dogs", 0.5),
    # the stemmer makes "dogs" equal "dog": all three F=1 (unstemmed it would be (2/3 + 0 + 2/3) / 3)
    ("the dog ran", "the dogs ran", 1.0),
    # lower-cased, punctuation dropped: one token each, R1 = RL = 1, R2 has no bigrams -> 2/3
    ("paris", "Paris.", 2 / 3),
    ("", "the cat sat", 0.0),
])
def test_free_form_by_hand(out, gt, expected):
    assert accuracy_reward(ans(out), f"<answer>{gt}</answer>", "free-form") == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("out, gt", [
    ("A man is riding a red bicycle down the steep hill.", "The man rides his bicycle down a hill quickly."),
    ("Two people are cooking pasta in the kitchen", "people cooking pasta and sauce together in a kitchen"),
])
def test_free_form_against_rouge_score(out, gt):
    scores = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True).score(gt, out)
    expected = (scores["rouge1"].fmeasure + scores["rouge2"].fmeasure + scores["rougeL"].fmeasure) / 3
    assert 0.0 < expected < 1.0
    assert accuracy_reward(ans(out), f"<answer>{gt}</answer>", "free-form") == pytest.approx(expected, abs=1e-12)


# ------------------------------------------------------------------ regression


@pytest.mark.parametrize("out, gt, expected", [
    ("12", "10", 1 - (2 + 1e-9) / (10 + 1e-9)),       # 0.8
    ("10", "10", 1 - 1e-9 / (10 + 1e-9)),             # just below 1: the 1e-9 stays in the numerator
    ("-3", "-4", 1 - (1 + 1e-9) / (4 + 1e-9)),        # 0.75
    ("900", "1,000", 1 - (100 + 1e-9) / (1000 + 1e-9)),  # commas stripped: 0.9
    ("25", "10", 0.0),                                # relative error 1.5 clipped to 1
    ("0", "0", 0.0),                                  # gt = 0: (0 + 1e-9) / (0 + 1e-9) = 1 -> 0
    ("5", "0", 0.0),
    ("nan", "3", 1.0),                                # Python max(0.0, nan) = 0.0: Video-R1 scores nan 1.0
])
def test_regression(out, gt, expected):
    reward, error = try_accuracy_reward(ans(out), f"<answer>{gt}</answer>", "regression")
    assert reward == pytest.approx(expected, rel=0, abs=1e-15)
    assert error is None


def test_regression_values_are_not_rounded():
    assert accuracy_reward(ans("12"), "<answer>10</answer>", "regression") == pytest.approx(0.8, abs=1e-9)
    assert accuracy_reward(ans("10"), "<answer>10</answer>", "regression") < 1.0


@pytest.mark.parametrize("out, gt", [("abc", "3"), ("3", "abc"), ("", "3")])
def test_regression_unparseable_is_a_counted_exception(out, gt):
    reward, error = try_accuracy_reward(ans(out), f"<answer>{gt}</answer>", "regression")
    assert reward == 0.0
    assert error is not None and error.startswith("regression: ")
    assert accuracy_reward(ans(out), f"<answer>{gt}</answer>", "regression") == 0.0


# ------------------------------------------------------------------ other types, exceptions


@pytest.mark.parametrize("problem_type", ["math", "Multiple Choice", "", "ocr"])
def test_unknown_type_scores_zero_without_error(problem_type):
    assert try_accuracy_reward(ans("A"), "<answer>A</answer>", problem_type) == (0.0, None)


def test_any_exception_scores_zero_and_is_reported():
    reward, error = try_accuracy_reward(None, "<answer>A</answer>", "multiple choice")  # type: ignore[arg-type]
    assert reward == 0.0
    assert error is not None and "TypeError" in error
    assert not math.isnan(accuracy_reward(ans("x"), "<answer>1</answer>", "regression"))
