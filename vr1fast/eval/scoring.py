"""Video-R1's benchmark scoring (``reward_fn`` and ``mean_relative_accuracy`` of ``src/eval_bench.py``, 2025-04-27),
one model output at a time, plus the per-benchmark means and the VSI-Bench combination.

Extraction (:func:`prediction`): the stripped content of the output's first ``<answer>…</answer>`` block (the same
pattern as training, ``vr1fast.rl.rewards.extract_answer``); when that is ``""`` (no tag, an unclosed tag, or an
empty or all-whitespace ``<answer> </answer>``) the prediction is the *whole, unstripped* output. The ground truth
is ``extract_answer(solution)`` with no such fallback: a solution without tags has the answer ``""``.

:func:`score` by ``problem_type`` (exact, case-sensitive names) on the prediction ``out`` and the ground truth ``gt``:

================  =================================================================================================
multiple choice   training's rule: 1.0 iff ``out.strip() == gt.strip()`` ("B" != "B." != "(B)" != "b")
numerical         training's rule: 0.0 if exactly one of ``out``, ``gt`` contains "." or ","; else commas removed,
                  ``float`` and 1.0 iff ``round(gt, 2) == round(out, 2)``; an unparseable number scores 0.0
regression        ``mean_relative_accuracy(float(out), float(gt))`` (commas removed); an unparseable number
                  scores 0.0 here (training raises and counts it)
OCR, free-form    0.0 (Video-R1's eval has no branch for them; its eval sets hold none, Video-R1 #121). With
                  ``rules="train"``: training's 1 - WER and ROUGE rules on the prediction
anything else     0.0
================  =================================================================================================

Multiple choice, numerical and ``rules="train"`` call the training reward (``vr1fast.rl.rewards.accuracy_reward``)
rather than a copy of it. On the untagged fallback the prediction is re-wrapped in ``<answer>…</answer>`` for it,
which strips it (harmless: both rules strip or ignore outer whitespace) and would cut it at a ``"</answer>"`` it
contains; such a prediction can never equal a ground truth nor parse as a number, so it scores 0.0 for multiple
choice and numerical without the call, as in Video-R1. Under ``rules="train"`` OCR and free-form predictions holding
``"</answer>"`` are scored up to it (an option, not a Video-R1 path). Any exception scores 0.0, as in Video-R1,
except a missing ``rouge_score`` for free-form under ``rules="train"``, which is raised (``MissingPackageError``).

:func:`mean_relative_accuracy` is VSI-Bench's MRA computed as Video-R1 does, in float32 torch tensors:
``rel = |p - t| / (|t| + 1e-8)`` and the mean over the ten thresholds θ = ``arange(0.5, 0.975, 0.05)`` of
``rel < 1 - θ``, returned as the float32 mean (``k / 10`` rounded to float32: 7 of 10 is 0.699999988…, the value
Video-R1 writes). Consequences kept on purpose, all results rather than errors:

* float32 rounding decides boundaries: exactly 10 % off (p 9, t 10) gives rel 0.1f < 1 - 0.9f = 0.10000002, so
  9 of 10 thresholds pass (0.9, not the 0.8 of exact arithmetic);
* target 0: rel = |p| / 1e-8, so p = 0 scores 1.0, |p| ≥ 1e-8 scores 0.0 and a smaller |p| a fraction (training's
  reward gives 0.0 to every answer when the target is 0, even 0);
* negative values: only |p - t| and |t| enter, so (p -9, t -10) scores as (9, 10); a sign error scores 0.0;
* huge values: |x| beyond float32's 3.4e38 becomes inf, so p = t = 1e39 scores 0.0 (inf - inf is NaN), as does any
  pair whose float32 difference overflows (3e38 vs -3e38); within range, e.g. 1e30 vs 1e30, it is exact;
* NaN or inf in p or t scores 0.0 (a NaN comparison is false; inf / inf is NaN); never an exception.

Benchmark means (:func:`benchmark_means`): Video-R1 averages non-regression scores into ``mean_acc`` and regression
scores into ``mean_mra``, each a float32 torch mean. Its empty cases differ (an empty ``mean_acc`` is NaN, an empty
``mean_mra`` is 0.0); here an empty group is ``None``. :func:`vsi_bench_score` = ``(mean_acc + mean_mra) / 2``, the
combination the authors use for the VSI-Bench number (Video-R1 #121; the script itself prints only the two means);
it needs both groups. Other benchmarks report ``mean_acc`` alone.
"""
from __future__ import annotations

import re
from typing import Iterable, Optional

import torch

from vr1fast.rl.rewards import MissingPackageError, accuracy_reward, extract_answer, to_number

MRA_EPSILON = 1e-8
MRA_START, MRA_END, MRA_STEP = 0.5, 0.95, 0.05
RULES = ("videor1_eval", "train")
_TRAINING_RULES = ("multiple choice", "numerical")
_TEXT_RULES = ("OCR", "free-form")
_END_TAG = "</answer>"
_THINK = re.compile(r"<think>\s*(.*?)\s*</think>", re.DOTALL)


def prediction(output: str) -> str:
    """The answer Video-R1's eval scores: the first ``<answer>`` block's stripped content, else the whole output."""
    answer = extract_answer(output)
    return answer if answer else output


def process(output: str) -> str:
    """``"<think>…</think>"`` of the output's first think block (content stripped), ``""`` when it has none or an
    empty one: the ``process`` field Video-R1's eval writes beside each answer."""
    match = _THINK.search(output)
    return f"<think>{match.group(1)}</think>" if match and match.group(1) else ""


def mean_relative_accuracy(prediction: float, target: float) -> float:
    """Share of θ ∈ {0.50, 0.55, …, 0.95} with ``|p - t| / (|t| + 1e-8) < 1 - θ``, in float32 (module docstring)."""
    pred = torch.tensor(prediction, dtype=torch.float32)
    tgt = torch.tensor(target, dtype=torch.float32)
    rel_error = (pred - tgt).abs() / (tgt.abs() + MRA_EPSILON)
    thresholds = torch.arange(MRA_START, MRA_END + MRA_STEP / 2, MRA_STEP, dtype=torch.float32)
    return (rel_error < 1 - thresholds).float().mean().item()


def _regression(answer: str, solution: str) -> float:
    out_number, gt_number = to_number(answer), to_number(extract_answer(solution))
    if out_number is None or gt_number is None:
        return 0.0
    return mean_relative_accuracy(out_number, gt_number)


def _training_rule(output: str, solution: str, problem_type: str) -> float:
    """Training's reward on ``output``'s prediction, the whole output re-wrapped in tags when it has no answer."""
    if extract_answer(output):          # a tagged output: training extracts the very same answer
        return accuracy_reward(output, solution, problem_type)
    if _END_TAG in output and problem_type in _TRAINING_RULES:
        return 0.0                      # equals no ground truth, parses as no number (module docstring)
    return accuracy_reward(f"<answer>{output}</answer>", solution, problem_type)


def score(output: str, solution: str, problem_type: str, *, rules: str = "videor1_eval") -> float:
    """Video-R1's eval score of one model ``output`` against the ``<answer>``-wrapped ``solution`` (module docstring).

    ``rules="train"`` scores OCR and free-form with training's rules instead of 0.0; nothing else changes."""
    if rules not in RULES:
        raise ValueError(f"rules must be one of {RULES}, not {rules!r}")
    try:
        if problem_type == "regression":
            return _regression(prediction(output), solution)
        if problem_type in _TRAINING_RULES or (rules == "train" and problem_type in _TEXT_RULES):
            return _training_rule(output, solution, problem_type)
        return 0.0
    except MissingPackageError:
        raise
    except Exception:                   # Video-R1 scores any exception 0.0
        return 0.0


def _float32_mean(values: list[float]) -> Optional[float]:
    return torch.tensor(values, dtype=torch.float32).mean().item() if values else None


def benchmark_means(items: Iterable[tuple[str, float]]) -> dict[str, Optional[float]]:
    """``{"mean_acc": …, "mean_mra": …}`` over ``(problem_type, score)`` pairs: float32 means of the non-regression
    and the regression scores, as Video-R1's ``final_acc``; ``None`` for a group with no items."""
    acc: list[float] = []
    mra: list[float] = []
    for problem_type, item_score in items:
        (mra if problem_type == "regression" else acc).append(float(item_score))
    return {"mean_acc": _float32_mean(acc), "mean_mra": _float32_mean(mra)}


def vsi_bench_score(items: Iterable[tuple[str, float]]) -> float:
    """VSI-Bench's number as Video-R1 reports it: ``(mean_acc + mean_mra) / 2`` over ``(problem_type, score)`` pairs
    (:func:`benchmark_means`); ``ValueError`` when either group is empty."""
    means = benchmark_means(items)
    if means["mean_acc"] is None or means["mean_mra"] is None:
        raise ValueError(f"VSI-Bench needs both non-regression and regression items, got {means}")
    return (means["mean_acc"] + means["mean_mra"]) / 2
