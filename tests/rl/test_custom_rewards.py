"""Rewards users bring: ``reward.reward_funcs`` entries ``module:function`` (rl.rewards.custom_reward)."""
import sys
import textwrap

import pytest
import torch

from runs import small
from vr1fast.cli import parse as parse_args
from vr1fast.config import RewardConfig
from vr1fast.errors import ConfigError
from vr1fast.metrics import read_jsonl
from vr1fast.rl.advantages import group_advantages, score_batch
from vr1fast.train import main

MODULE = """
CALLS = []


def brevity(completion, solution, problem_type):
    CALLS.append((completion, solution, problem_type))
    return 0.25 if len(completion) < 6 else -0.5


def keyword(completion, solution, problem_type, *, weight=2.0):
    return weight * ("<answer>" in completion)


def fragile(completion, solution, problem_type):
    if completion == "boom":
        raise RuntimeError("cannot score")
    return 1.0


def two_args(completion, solution):
    return 0.0


def logging_reward(completion, solution, problem_type):
    with open(LOG, "a") as f:
        f.write(f"{problem_type}\\n")
    return 0.5


NOT_A_FUNCTION = 3
"""


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    """A real module ``user_rewards_<n>`` on sys.path (its own name per test: no cached import across tests)."""
    name = f"user_rewards_{tmp_path.name.replace('-', '_')}"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(MODULE).replace("LOG", repr(str(tmp_path / "calls.log"))))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name
    sys.modules.pop(name, None)


def test_custom_rewards_add_to_the_total_in_order(user_module):
    completions = ["<think>a</think><answer>B</answer>", "no", "<answer>A</answer>", "wrong"]
    cfg = RewardConfig(reward_funcs=("accuracy", "format", f"{user_module}:brevity", f"{user_module}:keyword"))
    base = score_batch(completions, [5, 2, 4, 6], ["<answer>B</answer>", "<answer>A</answer>"],
                       ["multiple choice"] * 2, cfg=RewardConfig())
    got = score_batch(completions, [5, 2, 4, 6], ["<answer>B</answer>", "<answer>A</answer>"],
                      ["multiple choice"] * 2, cfg=cfg)
    brevity = torch.tensor([-0.5, 0.25, -0.5, 0.25])
    keyword = torch.tensor([2.0, 0.0, 2.0, 0.0])
    assert torch.equal(got.total, base.total + brevity + keyword)
    assert torch.equal(got.advantages, group_advantages(got.total, 2, cfg.adv_eps))
    assert [name for name, _ in got.custom] == ["brevity", "keyword"]
    metrics = got.metrics()
    assert metrics["rewards/brevity"] == pytest.approx(-0.125) and metrics["rewards/keyword"] == 1.0
    calls = sys.modules[user_module].CALLS
    assert calls[1] == ("no", "<answer>B</answer>", "multiple choice")  # the group's solution and type
    assert calls[2] == ("<answer>A</answer>", "<answer>A</answer>", "multiple choice")


def test_a_raising_custom_reward_scores_zero_and_is_counted(user_module):
    cfg = RewardConfig(reward_funcs=("accuracy", f"{user_module}:fragile"))
    got = score_batch(["boom", "fine"], [1, 1], ["<answer>A</answer>"], ["multiple choice"], cfg=cfg)
    assert got.custom[0][1].tolist() == [0.0, 1.0]
    assert got.exceptions == 1 and got.errors == ("fragile: RuntimeError: cannot score",)


@pytest.mark.parametrize("suffix, cause", [
    ("missing_module_xyz:f", "cannot import module 'missing_module_xyz'"),
    ("{m}:nope", "has no function 'nope'"),
    ("{m}:NOT_A_FUNCTION", "has no function 'NOT_A_FUNCTION'"),
    ("{m}:two_args", "cannot be called as two_args(completion, solution, problem_type)"),
    ("{m}:", "nor 'module:function'"),
])
def test_bad_custom_reward_is_a_one_line_config_error(user_module, suffix, cause):
    name = suffix.format(m=user_module)
    with pytest.raises(ConfigError) as info:
        parse_args([f"--reward.reward_funcs=[accuracy, '{name}']"])
    message = str(info.value)
    assert message.startswith(f"reward.reward_funcs: {name!r}") and cause in message and "\n" not in message


def test_training_calls_a_custom_reward_by_name(user_module, synthetic, tmp_path):
    """One step of the loop with the user's function named on the command line: it scores every ordered
    completion (2 per prompt) and its mean is logged beside Video-R1's reward names."""
    out = tmp_path / "run"
    main(small(synthetic, out, "--train.max_steps=1",
               f"--reward.reward_funcs=[accuracy, format, '{user_module}:logging_reward']"))
    rows = read_jsonl(out / "metrics.jsonl")
    assert rows[0]["rewards/logging_reward"] == 0.5
    assert len((tmp_path / "calls.log").read_text().splitlines()) == 2


def test_advantage_rule_adds_alpha_after_normalising_the_custom_total(user_module):
    """temporal_rule=advantage with a user reward: the group is normalised over accuracy + format + the user's
    reward, then alpha goes to the correct completions (ordered 3/4 > shuffled 1/2); the total has no bonus."""
    completions = ["<think>a</think><answer>B</answer>", "<answer>B</answer>", "<think>a</think><answer>B</answer>",
                   "no"]
    cfg = RewardConfig(reward_funcs=("accuracy", "format", f"{user_module}:brevity"), temporal_rule="advantage",
                       len_control=False)
    got = score_batch(completions, [9, 9, 9, 9], ["<answer>B</answer>"], ["multiple choice"],
                      shuffled=[["<answer>B</answer>", "<answer>C</answer>"]], cfg=cfg)
    total = torch.tensor([1.0 + 1 - 0.5, 1 + 0 - 0.5, 1 + 1 - 0.5, 0 + 0 + 0.25])
    assert torch.equal(got.total, total)
    expected = group_advantages(total, 4, cfg.adv_eps) + 0.3 * torch.tensor([1.0, 1, 1, 0])
    torch.testing.assert_close(got.advantages, expected, rtol=0, atol=1e-7)
