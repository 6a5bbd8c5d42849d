"""Prompt texts against literal strings typed from docs/video-r1.md §4 (not imported from the module)."""
import pytest

from vr1fast.data.dataset import Sample
from vr1fast.data.prompts import build_messages, build_sft_messages, format_question, prompt_text, sft_target

TRAIN_TAIL = (
    "\nPlease think about this question as if you were a human pondering deeply. Engage in an internal dialogue "
    "using expressions such as 'let me think', 'wait', 'Hmm', 'oh, I see', 'let's break it down', etc, or other "
    "natural language thought expressions It's encouraged to include self-reflection or verification in the "
    "reasoning process. Provide your detailed reasoning between the <think> </think> tags, and then give your "
    "final answer between the <answer> </answer> tags."
)
EVAL_TAIL = (
    "\nPlease think about this question as if you were a human pondering deeply. Engage in an internal dialogue "
    "using expressions such as 'let me think', 'wait', 'Hmm', 'oh, I see', 'let's break it down', etc, or other "
    "natural language thought expressions It's encouraged to include self-reflection or verification in the "
    "reasoning process. Provide your detailed reasoning between the <think> and </think> tags, and then give your "
    "final answer between the <answer> and </answer> tags."
)
TYPE_TEXT = {
    "multiple choice": " Please provide only the single option letter (e.g., A, B, C, D, etc.) within the "
                       "<answer> </answer> tags.",
    "numerical": " Please provide the numerical value (e.g., 42 or 3.14) within the <answer> </answer> tags.",
    "regression": " Please provide the numerical value (e.g., 42 or 3.14) within the <answer> </answer> tags.",
    "OCR": " Please transcribe text from the image/video clearly and provide your text answer within the "
           "<answer> </answer> tags.",
    "free-form": " Please provide your text answer within the <answer> </answer> tags.",
}


def sample(problem_type="multiple choice", data_type="video", problem="What happens first?",
           options=("A. The cube moves", "B. The sphere stops"), process=None):
    return Sample(problem_id=7, problem=problem, options=tuple(options), solution="<answer>A</answer>",
                  answer="A", data_type=data_type, problem_type=problem_type, path="/data/CLEVRER/v.mp4",
                  process=process, index=0, source="train.json")


def test_multiple_choice_prompt_character_for_character():
    expected = (
        "What happens first?Options:\nA. The cube moves\nB. The sphere stops\n\n"
        "Please think about this question as if you were a human pondering deeply. Engage in an internal dialogue "
        "using expressions such as 'let me think', 'wait', 'Hmm', 'oh, I see', 'let's break it down', etc, or "
        "other natural language thought expressions It's encouraged to include self-reflection or verification "
        "in the reasoning process. Provide your detailed reasoning between the <think> </think> tags, and then "
        "give your final answer between the <answer> </answer> tags. Please provide only the single option letter "
        "(e.g., A, B, C, D, etc.) within the <answer> </answer> tags."
    )
    assert prompt_text(sample()) == expected


def test_question_has_no_separator_before_options():
    assert format_question(sample()) == "What happens first?Options:\nA. The cube moves\nB. The sphere stops\n"


@pytest.mark.parametrize("problem_type", ["numerical", "regression", "OCR", "free-form"])
def test_other_types_use_the_problem_as_is(problem_type):
    s = sample(problem_type=problem_type, problem="How many {red} cubes?", options=("A. ignored",))
    assert format_question(s) == "How many {red} cubes?"
    assert prompt_text(s) == "How many {red} cubes?" + TRAIN_TAIL + TYPE_TEXT[problem_type]


@pytest.mark.parametrize("problem_type", sorted(TYPE_TEXT))
def test_eval_variant(problem_type):
    s = sample(problem_type=problem_type, problem="Q?")
    question = "Q?Options:\nA. The cube moves\nB. The sphere stops\n" if problem_type == "multiple choice" else "Q?"
    assert prompt_text(s, eval_mode=True) == question + EVAL_TAIL + TYPE_TEXT[problem_type]
    assert prompt_text(s, eval_mode=False) == question + TRAIN_TAIL + TYPE_TEXT[problem_type]


@pytest.mark.parametrize("data_type", ["video", "image"])
def test_messages_put_media_first(data_type):
    s = sample(data_type=data_type, problem_type="free-form", problem="Describe it.")
    assert build_messages(s) == [{
        "role": "user",
        "content": [
            {"type": data_type, data_type: "/data/CLEVRER/v.mp4"},
            {"type": "text", "text": "Describe it." + TRAIN_TAIL + TYPE_TEXT["free-form"]},
        ],
    }]
    assert build_messages(s, eval_mode=True)[0]["content"][1]["text"] == (
        "Describe it." + EVAL_TAIL + TYPE_TEXT["free-form"])


def test_sft_target_and_messages():
    s = sample(process="<think>The cube moves at t=1.</think>")
    assert sft_target(s) == "<think>The cube moves at t=1.</think>\n<answer>A</answer>"
    messages = build_sft_messages(s)
    assert [m["role"] for m in messages] == ["system", "user", "assistant"]
    assert messages[0]["content"] == [{"type": "text", "text": "You are a helpful assistant"}]
    assert messages[1] == build_messages(s)[0]
    target = "<think>The cube moves at t=1.</think>\n<answer>A</answer>"
    assert messages[2]["content"] == [{"type": "text", "text": target}]
    with pytest.raises(ValueError, match="train.json: record 0: field 'process'"):
        sft_target(sample(process=None))
