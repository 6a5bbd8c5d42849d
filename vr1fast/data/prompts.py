"""Video-R1's prompt texts and chat messages (``grpo.py``, ``sft_video.py``, ``eval_bench.py``), verbatim.

User text = ``QUESTION_TEMPLATE.format(Question=question) + TYPE_TEMPLATE[problem_type]``, with
``question = problem + "Options:\\n" + "".join(option + "\\n")`` for multiple choice (no separator before
"Options:", so the template's own "\\n" leaves a blank line) and ``problem`` otherwise. The RL prompt is one user
turn, media first, then the text; no system turn (the chat template adds its default). The SFT conversation adds
the system text "You are a helpful assistant" (no period) and the assistant target ``process + "\\n" + solution``.
The eval template differs only in its last sentence ("between the <think> and </think> tags ...").
The quirks (missing period after "expressions", the space that starts each type text) are Video-R1's.
"""
from __future__ import annotations

from typing import Any

from vr1fast.data.dataset import Sample

QUESTION_TEMPLATE = (
    "{Question}\n"
    "Please think about this question as if you were a human pondering deeply. "
    "Engage in an internal dialogue using expressions such as 'let me think', 'wait', 'Hmm', 'oh, I see', "
    "'let's break it down', etc, or other natural language thought expressions "
    "It's encouraged to include self-reflection or verification in the reasoning process. "
    "Provide your detailed reasoning between the <think> </think> tags, "
    "and then give your final answer between the <answer> </answer> tags."
)

QUESTION_TEMPLATE_EVAL = (
    "{Question}\n"
    "Please think about this question as if you were a human pondering deeply. "
    "Engage in an internal dialogue using expressions such as 'let me think', 'wait', 'Hmm', 'oh, I see', "
    "'let's break it down', etc, or other natural language thought expressions "
    "It's encouraged to include self-reflection or verification in the reasoning process. "
    "Provide your detailed reasoning between the <think> and </think> tags, "
    "and then give your final answer between the <answer> and </answer> tags."
)

_NUMERIC = " Please provide the numerical value (e.g., 42 or 3.14) within the <answer> </answer> tags."
TYPE_TEMPLATE = {
    "multiple choice": " Please provide only the single option letter (e.g., A, B, C, D, etc.)"
                       " within the <answer> </answer> tags.",
    "numerical": _NUMERIC,
    "OCR": " Please transcribe text from the image/video clearly and provide your text answer"
           " within the <answer> </answer> tags.",
    "free-form": " Please provide your text answer within the <answer> </answer> tags.",
    "regression": _NUMERIC,
}

SFT_SYSTEM_PROMPT = "You are a helpful assistant"


def format_question(sample: Sample) -> str:
    """The question text: ``problem + "Options:\\n" + each option + "\\n"`` for multiple choice, else ``problem``."""
    if sample.problem_type == "multiple choice":
        return sample.problem + "Options:\n" + "".join(option + "\n" for option in sample.options)
    return sample.problem


def prompt_text(sample: Sample, eval_mode: bool = False) -> str:
    """The user text: (eval) question template filled with :func:`format_question`, then the type instruction."""
    template = QUESTION_TEMPLATE_EVAL if eval_mode else QUESTION_TEMPLATE
    return template.format(Question=format_question(sample)) + TYPE_TEMPLATE[sample.problem_type]


def build_messages(sample: Sample, eval_mode: bool = False) -> list[dict[str, Any]]:
    """``[{"role": "user", "content": [{"type": "video"|"image", <type>: path}, {"type": "text", ...}]}]``."""
    media = {"type": sample.data_type, sample.data_type: sample.path}
    text = {"type": "text", "text": prompt_text(sample, eval_mode)}
    return [{"role": "user", "content": [media, text]}]


def sft_target(sample: Sample) -> str:
    """The SFT assistant text ``process + "\\n" + solution``; the sample must carry ``process``."""
    if sample.process is None:
        raise ValueError(f"{sample.source}: record {sample.index}: field 'process': missing (needed for SFT)")
    return sample.process + "\n" + sample.solution


def build_sft_messages(sample: Sample) -> list[dict[str, Any]]:
    """Video-R1's SFT conversation: system "You are a helpful assistant", the user turn, the assistant target."""
    return [
        {"role": "system", "content": [{"type": "text", "text": SFT_SYSTEM_PROMPT}]},
        *build_messages(sample),
        {"role": "assistant", "content": [{"type": "text", "text": sft_target(sample)}]},
    ]
