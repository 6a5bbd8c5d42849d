"""Video-R1's reward functions (``src/r1-v/src/open_r1/grpo.py``), one completion at a time.

* ``extract_answer`` (``data.dataset``'s, which owns the solution schema; re-exported here, the SPEC name): first
  match of ``<answer>\\s*(.*?)\\s*</answer>`` (DOTALL), stripped; ``""`` if none. It is applied to both the
  completion and the ground-truth ``solution``.
* ``format_reward``: 1.0 iff the *whole* completion matches ``<think>.*?</think>\\s*<answer>.*?</answer>`` (DOTALL).
* ``accuracy_reward``: by ``problem_type`` on the two extracted answers ``out`` and ``gt``:

  ================  ==========================================================================================
  multiple choice   1.0 iff ``out.strip() == gt.strip()`` (exact, case-sensitive: "A" != "A." != "(A)")
  numerical         0.0 if exactly one of them contains "." or ","; else commas removed, ``float``, and
                    1.0 iff ``round(gt, 2) == round(out, 2)``; an unparseable number scores 0.0
  OCR               clip(1 - WER, 0, 1); WER = word-level Levenshtein over ``str.split()`` / max(1, #ref words)
  free-form         clip(mean of ROUGE-1/2/L F-measures, 0, 1), ``rouge_score`` with the Porter stemmer
  regression        1 - clip((|out - gt| + 1e-9) / (|gt| + 1e-9), 0, 1); an unparseable number is an exception
  anything else     0.0
  ================  ==========================================================================================

  Any exception scores 0.0, as in Video-R1. The quirks are kept on purpose: gt = 0 scores 0.0 for every
  regression answer, even ``0``; a regression answer ``nan`` scores 1.0 (Python's ``max(0.0, nan)`` is 0.0).

Exceptions are counted, not hidden: :func:`try_accuracy_reward` returns ``(reward, error)`` and the batch scorer
(``vr1fast.rl.advantages.score_batch``) counts the errors it sees; there is no global counter. The counted
exceptions are exactly those Video-R1's outer ``except`` catches; a numerical answer that does not parse is a
plain 0.0 there (Video-R1 catches it inside ``normalize_number``), a regression one raises and is counted.

Rewards users bring: ``reward.reward_funcs`` also takes ``"module:function"`` names (:func:`custom_reward`), each
with :func:`accuracy_reward`'s signature ``(completion, solution, problem_type) -> float``, added to the total as
TRL sums its reward functions.
"""
from __future__ import annotations

import functools
import importlib
import inspect
import re
from typing import Callable, Optional

from vr1fast.data.dataset import extract_answer
from vr1fast.errors import ConfigError

_FORMAT_RE = re.compile(r"<think>.*?</think>\s*<answer>.*?</answer>", re.DOTALL)


def format_reward(completion: str) -> float:
    """1.0 iff the whole completion is ``<think>…</think>`` + whitespace + ``<answer>…</answer>``, else 0.0."""
    return 1.0 if _FORMAT_RE.fullmatch(completion) else 0.0


def to_number(text: str) -> Optional[float]:
    """``float`` of ``text`` with commas removed, or None (Video-R1's ``normalize_number``)."""
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return None


def word_error_rate(reference: str, hypothesis: str) -> float:
    """Word-level Levenshtein distance over ``str.split()`` tokens divided by max(1, #reference words).

    Case-sensitive, no punctuation normalisation (Video-R1's hand-written ``wer``, not jiwer).
    """
    ref, hyp = reference.split(), hypothesis.split()
    prev = list(range(len(hyp) + 1))
    for i, ref_word in enumerate(ref, start=1):
        row = [i] + [0] * len(hyp)
        for j, hyp_word in enumerate(hyp, start=1):
            if ref_word == hyp_word:
                row[j] = prev[j - 1]
            else:
                row[j] = 1 + min(prev[j], row[j - 1], prev[j - 1])
        prev = row
    return prev[len(hyp)] / max(1, len(ref))


class MissingPackageError(ImportError):
    """A reward needs a package that is not installed; never scored 0.0 as a scoring exception."""


@functools.lru_cache(maxsize=1)
def _rouge():
    """``rouge_score``'s ROUGE-1/2/L scorer with the Porter stemmer, imported on first use (it needs nltk)."""
    try:
        from rouge_score import rouge_scorer
    except ImportError as e:
        raise MissingPackageError(f"the free-form accuracy reward needs the '{e.name or 'rouge_score'}' package, "
                                  f"which is not installed (pip install rouge-score)") from None
    return rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)


def _multiple_choice(out: str, gt: str) -> float:
    return 1.0 if out.strip() == gt.strip() else 0.0


def _numerical(out: str, gt: str) -> float:
    gt_decimal = "." in gt or "," in gt
    out_decimal = "." in out or "," in out
    if gt_decimal != out_decimal:
        return 0.0
    gt_number, out_number = to_number(gt), to_number(out)
    if gt_number is None or out_number is None:
        return 0.0
    return 1.0 if round(gt_number, 2) == round(out_number, 2) else 0.0


def _ocr(out: str, gt: str) -> float:
    return max(0.0, min(1.0, 1 - word_error_rate(gt, out)))


def _free_form(out: str, gt: str) -> float:
    scores = _rouge().score(gt, out)
    mean_f = (scores["rouge1"].fmeasure + scores["rouge2"].fmeasure + scores["rougeL"].fmeasure) / 3
    return max(0.0, min(1.0, mean_f))


def _regression(out: str, gt: str) -> float:
    gt_number, out_number = to_number(gt), to_number(out)
    if gt_number is None or out_number is None:
        raise ValueError(f"regression answer {out!r} or ground truth {gt!r} is not a number")
    rel_diff = (abs(out_number - gt_number) + 1e-9) / (abs(gt_number) + 1e-9)
    rel_diff = min(1.0, max(0.0, rel_diff))
    return 1 - rel_diff


_RULES: dict[str, Callable[[str, str], float]] = {
    "multiple choice": _multiple_choice,
    "numerical": _numerical,
    "OCR": _ocr,
    "free-form": _free_form,
    "regression": _regression,
}


def try_accuracy_reward(completion: str, solution: str, problem_type: str) -> tuple[float, Optional[str]]:
    """``(reward, None)``, or ``(0.0, "problem_type: ErrorType: message")`` when scoring raised; a missing package
    (``MissingPackageError``) is raised, not scored."""
    try:
        out, gt = extract_answer(completion), extract_answer(solution)
        rule = _RULES.get(problem_type)
        return (float(rule(out, gt)) if rule is not None else 0.0), None
    except MissingPackageError:
        raise
    except Exception as e:  # Video-R1 scores any exception 0.0; the caller counts it
        return 0.0, f"{problem_type}: {type(e).__name__}: {e}"


def accuracy_reward(completion: str, solution: str, problem_type: str) -> float:
    """Video-R1's accuracy reward of one completion against the ``<answer>``-wrapped ``solution`` (table above)."""
    return try_accuracy_reward(completion, solution, problem_type)[0]


BUILTIN_REWARDS = ("accuracy", "format")


def custom_reward(name: str) -> Callable[[str, str, str], float]:
    """The user's reward function named ``"package.module:function"`` (importable from ``sys.path``, which holds
    the working directory under ``python -m``); a ConfigError naming ``reward.reward_funcs`` and the cause when
    the name does not resolve to a function callable as ``fn(completion, solution, problem_type)``."""
    where = f"reward.reward_funcs: {name!r}"
    module_name, sep, attr = name.partition(":")
    if not (sep and module_name and attr):
        raise ConfigError(f"{where} is neither {' nor '.join(BUILTIN_REWARDS)} nor 'module:function'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ConfigError(f"{where}: cannot import module {module_name!r} ({e})") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ConfigError(f"{where}: module {module_name!r} has no function {attr!r}")
    try:
        inspect.signature(fn).bind("completion", "solution", "problem_type")
    except TypeError:
        raise ConfigError(f"{where}: {attr}{inspect.signature(fn)} cannot be called as {attr}(completion, solution, "
                          f"problem_type), the signature of vr1fast.rl.rewards.accuracy_reward") from None
    except ValueError:  # no signature to inspect (a builtin): called as is
        pass
    return fn


def try_custom_reward(fn: Callable[[str, str, str], float], completion: str, solution: str,
                      problem_type: str) -> tuple[float, Optional[str]]:
    """``(float(fn(...)), None)``, or ``(0.0, "name: ErrorType: message")`` when it raised or returned no number,
    counted by the batch scorer like :func:`try_accuracy_reward`'s exceptions."""
    try:
        return float(fn(completion, solution, problem_type)), None
    except Exception as e:
        return 0.0, f"{getattr(fn, '__name__', fn)}: {type(e).__name__}: {e}"
