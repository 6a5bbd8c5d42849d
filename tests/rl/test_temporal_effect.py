"""Whether the temporal bonus changes any advantage (temporal_adv_delta / _changed) and the ``advantage`` rule that
adds it after the group normalisation, on hand-built groups."""
import dataclasses

import pytest
import torch

from vr1fast.config import RewardConfig
from vr1fast.rl.advantages import group_advantages, score_batch


def said(answer: str) -> str:
    return f"<think>I look at the frames.</think><answer>{answer}</answer>"


def cfg_with(**changes) -> RewardConfig:
    return dataclasses.replace(RewardConfig(len_control=False), **changes)


def mc_batch(cfg: RewardConfig, ordered=("A", "A", "A", "B"), shuffled=("A", "B")):
    """One multiple-choice video group (0/1 accuracy, every completion well formed, equal lengths)."""
    completions = [said(a) for a in ordered]
    return score_batch(completions, [20] * len(completions), ["<answer>A</answer>"], ["multiple choice"],
                       shuffled=[[said(a) for a in shuffled]], cfg=cfg)


@pytest.mark.parametrize("rule", ["code", "strict", "diff"])
def test_reward_rules_leave_binary_groups_unchanged(rule):
    """0/1 accuracy, equal format and length: the bonus multiplies the spread by (1 + alpha) and the normalisation
    divides it out (Video-R1 #51), up to the eps in the std."""
    scored = mc_batch(cfg_with(temporal_rule=rule))      # p = 0.75 > p~ = 0.5: every rule fires
    assert scored.temporal.tolist() == [1.0]
    assert not torch.equal(scored.total, scored.accuracy + scored.format)   # the bonus is in the reward ...
    metrics = scored.metrics()
    assert 0.0 < metrics["temporal_adv_delta"] < 1e-4                      # ... and not in the advantages
    assert metrics["temporal_adv_changed"] == 0.0


def test_reward_rule_acts_on_fractional_accuracy():
    """Regression answers score fractionally (mean relative accuracy): +alpha on the correct ones is no longer a
    rescaling of the spread, so the advantages move."""
    ordered = ["10", "9", "7", "0"]         # accuracies 1, 0.9, 0.7, 0: the bonus goes to three of four
    scored = score_batch([said(a) for a in ordered], [20] * 4, ["<answer>10</answer>"], ["regression"],
                         shuffled=[[said("2"), said("30")]], cfg=cfg_with())
    assert 0.0 < scored.accuracy[2] < 1.0 and scored.temporal.tolist() == [1.0]
    metrics = scored.metrics()
    assert metrics["temporal_adv_delta"] > 0.01 and metrics["temporal_adv_changed"] == 1.0
    # the metric is |A_with - A_without| against the same group scored with the bonus off
    plain = score_batch([said(a) for a in ordered], [20] * 4, ["<answer>10</answer>"], ["regression"],
                        shuffled=[[said("2"), said("30")]], cfg=cfg_with(temporal=False))
    expected = (scored.advantages - plain.advantages).abs().mean().item()
    assert metrics["temporal_adv_delta"] == pytest.approx(expected, rel=1e-6)


def test_advantage_rule_adds_alpha_after_normalisation():
    cfg = cfg_with(temporal_rule="advantage", temporal_alpha=0.25)
    scored = mc_batch(cfg)
    plain = group_advantages(scored.accuracy + scored.format, 4, cfg.adv_eps)
    torch.testing.assert_close(scored.total, scored.accuracy + scored.format, rtol=0, atol=0)  # not in the reward
    torch.testing.assert_close(scored.advantages, plain + 0.25 * torch.tensor([1.0, 1, 1, 0]), rtol=0, atol=1e-7)
    metrics = scored.metrics()
    assert metrics["temporal_adv_delta"] == pytest.approx(0.75 * 0.25)
    assert metrics["temporal_adv_changed"] == 1.0 and metrics["temporal_rewards"] == 1.0


def test_advantage_rule_acts_where_grpo_has_no_signal():
    """All four ordered answers correct, shuffled half wrong: GRPO's advantages are all 0, the rule gives +alpha."""
    scored = mc_batch(cfg_with(temporal_rule="advantage"), ordered=("A",) * 4, shuffled=("A", "C"))
    torch.testing.assert_close(scored.advantages, torch.full((4,), 0.3), rtol=0, atol=1e-7)
    assert scored.plain_advantages.abs().max().item() == 0.0


@pytest.mark.parametrize("shuffled", [("A", "A"), ("A", "B", "A", "A")])
def test_advantage_rule_needs_ordered_to_win(shuffled):
    """p = 0.75 against p~ = 1.0 or 0.75 (not strictly above): no bonus, the advantages are GRPO's."""
    scored = mc_batch(cfg_with(temporal_rule="advantage"), shuffled=shuffled)
    assert scored.temporal.tolist() == [0.0]
    torch.testing.assert_close(scored.advantages, scored.plain_advantages, rtol=0, atol=0)
    assert scored.metrics()["temporal_adv_changed"] == 0.0


def test_effect_counts_video_groups_only():
    """An image group (no shuffled completions) is neither in the mean nor in the fraction; a batch of images
    logs 0.0 (nothing could change)."""
    cfg = cfg_with(temporal_rule="advantage")
    completions = [said(a) for a in ("A", "A", "A", "B")] + [said(a) for a in ("A", "B", "B", "B")]
    scored = score_batch(completions, [20] * 8, ["<answer>A</answer>"] * 2, ["multiple choice"] * 2,
                         shuffled=[[said("B"), said("B")], None], cfg=cfg)
    metrics = scored.metrics()
    assert metrics["temporal_adv_delta"] == pytest.approx(0.75 * 0.3) and metrics["temporal_adv_changed"] == 1.0
    images = score_batch(completions[4:], [20] * 4, ["<answer>A</answer>"], ["multiple choice"], cfg=cfg)
    assert images.metrics()["temporal_adv_delta"] == 0.0 and images.metrics()["temporal_adv_changed"] == 0.0


def test_temporal_off_logs_no_effect():
    scored = mc_batch(cfg_with(temporal=False))
    assert scored.plain_advantages is None
    assert not {"temporal_adv_delta", "temporal_adv_changed"} & set(scored.metrics())
