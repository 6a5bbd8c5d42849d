"""T-GRPO totals and advantages against numbers worked out by hand from grpo_trainer.py::compute_loss."""
import dataclasses

import pytest
import torch

from vr1fast.config import RewardConfig
from vr1fast.rl.advantages import group_advantages, length_bonus, score_batch, temporal_bonus, total_rewards


def f32(*values):
    return torch.tensor(values, dtype=torch.float32)


def close(actual, expected, atol=1e-6):
    torch.testing.assert_close(actual, torch.as_tensor(expected, dtype=actual.dtype), atol=atol, rtol=0)


def cfg_with(**changes):
    return dataclasses.replace(RewardConfig(), **changes)


# ------------------------------------------------------------------ one group, Video-R1 defaults


def test_video_group_temporal_and_length():
    acc = f32(1, 1, 1, 0, 0, 0, 0, 0)           # p = 0.375
    fmt = f32(1, 0, 1, 1, 0, 1, 0, 1)
    lengths = torch.tensor([400, 100, 600, 330, 512, 320, 768, 10])
    shuffled = f32(1, 0, 0, 0)                   # p~ = 0.25; 0.375 >= 0.8 * 0.25 -> +0.3 to the three correct
    # length: 3 correct (>= 2); only #0 (400) of them lies in [320, 512]; #3..#5 are in range but wrong
    # totals: 1.3+1+0.2, 1.3+0, 1.3+1, 0+1, 0, 1, 0, 1
    total = total_rewards(acc, fmt, lengths, shuffled)
    assert total.dtype == torch.float32
    close(total, [2.5, 1.3, 2.3, 1.0, 0.0, 1.0, 0.0, 1.0])
    # mean 9.1/8 = 1.1375; sum of squared deviations 5.87875; unbiased std sqrt(5.87875/7) = 0.9164177151
    close(group_advantages(total, 8), [1.4866051987, 0.1773015375, 1.2683879218, -0.1500243779,
                                       -1.2411107622, -0.1500243779, -1.2411107622, -0.1500243779], atol=1e-5)


def test_image_group_gets_no_temporal_bonus():
    acc, fmt, lengths = f32(1, 1, 0, 0), f32(1, 1, 1, 0), torch.tensor([330, 600, 400, 400])
    # 2 correct -> length bonus for #0 only; no shuffled group -> no temporal bonus, flag 0.5
    close(total_rewards(acc, fmt, lengths), [2.2, 2.0, 1.0, 0.0])
    bonus, flag = temporal_bonus(acc, None, RewardConfig())
    close(bonus, [0.0, 0.0, 0.0, 0.0])
    assert flag == 0.5


def test_both_means_zero():
    acc, shuffled = f32(0, 0, 0, 0), f32(0, 0)
    bonus, flag = temporal_bonus(acc, shuffled, RewardConfig())
    assert flag == 1.0                       # 0 >= 0.8 * 0 holds ...
    close(bonus, [0.0, 0.0, 0.0, 0.0])       # ... but no completion is correct
    assert temporal_bonus(acc, shuffled, cfg_with(temporal_rule="strict"))[1] == 0.0  # 0 > 0 does not


def test_boundary_is_inclusive_and_float32():
    # p = 4/5 = 0.8f, 0.8 * p~ = 0.8 * 1.0 = 0.8f: ">=" fires, the paper's ">" does not
    acc, shuffled = f32(1, 1, 1, 1, 0), f32(1, 1, 1, 1)
    bonus, flag = temporal_bonus(acc, shuffled, RewardConfig())
    assert flag == 1.0
    close(bonus, [0.3, 0.3, 0.3, 0.3, 0.0])
    assert temporal_bonus(acc, shuffled, cfg_with(temporal_rule="strict"))[1] == 0.0


def test_float32_comparison_decides():
    # p = 3/5 -> 0.6f = 0.60000002384; 0.8f * 0.75 rounds to the same float32 -> fires.
    # In float64, 0.6 >= 0.8 * 0.75 = 0.6000000000000001 is False: a float64 comparison would differ.
    acc, shuffled = f32(1, 1, 1, 0, 0), f32(1, 1, 1, 0)
    assert temporal_bonus(acc, shuffled, RewardConfig())[1] == 1.0


def test_rules_code_strict_diff():
    acc, shuffled = f32(1, 1, 0, 0, 0, 0, 0, 0), f32(1, 0, 0, 0)   # p = p~ = 0.25
    assert temporal_bonus(acc, shuffled, cfg_with(temporal_rule="code"))[1] == 1.0   # 0.25 >= 0.2
    assert temporal_bonus(acc, shuffled, cfg_with(temporal_rule="strict"))[1] == 0.0
    assert temporal_bonus(acc, shuffled, cfg_with(temporal_rule="diff"))[1] == 0.0
    # mu is a knob of the code rule: mu = 1.0 with ">=" fires at p = p~
    assert temporal_bonus(acc, shuffled, cfg_with(temporal_mu=1.0))[1] == 1.0
    assert temporal_bonus(acc, f32(1, 1, 0, 0), cfg_with(temporal_mu=1.0))[1] == 0.0  # 0.25 < 0.5


def test_diff_rule_scales_with_the_gap():
    acc, shuffled = f32(1, 1, 1, 1, 0.5, 0.1, 0, 0), f32(1, 0, 0, 0)
    # p = 4.6/8 = 0.575, p~ = 0.25 -> 0.3 * 0.325 = 0.0975 to the five with accuracy > 0.1 (0.1 itself is not)
    bonus, flag = temporal_bonus(acc, shuffled, cfg_with(temporal_rule="diff"))
    assert flag == 1.0
    close(bonus, [0.0975] * 5 + [0.0, 0.0, 0.0])
    bonus, _ = temporal_bonus(acc, shuffled, cfg_with(temporal_rule="strict"))
    close(bonus, [0.3] * 5 + [0.0, 0.0, 0.0])


def test_no_bonus_when_shuffled_wins():
    acc, shuffled = f32(1, 0, 0, 0), f32(1, 1)     # 0.25 < 0.8
    assert temporal_bonus(acc, shuffled, RewardConfig())[1] == 0.0
    close(total_rewards(acc, f32(1, 1, 1, 1), torch.tensor([400] * 4), shuffled), [2.0, 1.0, 1.0, 1.0])


def test_continuous_accuracy_threshold():
    # 0.1 is not > 0.1 (both as float32); 0.15 is; the bonus goes on top of the partial score
    acc, shuffled = f32(0.1, 0.15, 0.9, 0.0), f32(0.2, 0.0)
    close(total_rewards(acc, f32(0, 0, 0, 0), torch.tensor([10] * 4), shuffled), [0.1, 0.45, 1.2, 0.0])


def test_temporal_off():
    acc, shuffled = f32(1, 1, 0, 0), f32(0, 0)
    bonus, flag = temporal_bonus(acc, shuffled, cfg_with(temporal=False))
    assert flag == 0.5
    close(bonus, [0.0] * 4)


# ------------------------------------------------------------------ length rule


def test_length_needs_two_correct():
    lengths = torch.tensor([400, 400, 400, 400])
    close(length_bonus(f32(1, 0, 0, 0), lengths, RewardConfig()), [0.0] * 4)            # 1 correct
    close(length_bonus(f32(1, 0.5, 0, 0), lengths, RewardConfig()), [0.2, 0.2, 0.0, 0.0])  # 2 correct
    close(length_bonus(f32(1, 0.5, 0, 0), lengths, cfg_with(len_min_correct=3)), [0.0] * 4)
    close(length_bonus(f32(1, 1, 1, 1), lengths, cfg_with(len_control=False)), [0.0] * 4)


def test_length_bounds_inclusive():
    acc = f32(1, 1, 1, 1, 1, 1)
    lengths = torch.tensor([319, 320, 511, 512, 513, 768])   # 768 = cut off at max_new_tokens, no EOS
    close(length_bonus(acc, lengths, RewardConfig()), [0.0, 0.2, 0.2, 0.2, 0.0, 0.0])


def test_total_with_config_variants():
    acc, fmt, lengths = f32(1, 1, 0, 0), f32(1, 0, 1, 0), torch.tensor([400, 400, 400, 400])
    close(total_rewards(acc, fmt, lengths, cfg=cfg_with(reward_funcs=("accuracy",))), [1.2, 1.2, 0.0, 0.0])
    close(total_rewards(acc, fmt, lengths, cfg=cfg_with(len_bonus=0.5, len_min=100, len_max=399)),
          [2.0, 1.0, 1.0, 0.0])
    with pytest.raises(ValueError, match="reward_funcs"):
        total_rewards(acc, fmt, lengths, cfg=cfg_with(reward_funcs=("format",)))
    with pytest.raises(ValueError, match="1-D"):
        total_rewards(acc, fmt[:3], lengths)
    with pytest.raises(ValueError, match="empty"):
        total_rewards(acc, fmt, lengths, shuffled_accuracy=f32())


# ------------------------------------------------------------------ advantages


def test_group_advantages_equal_rewards_give_zero():
    close(group_advantages(f32(1.5, 1.5, 1.5, 1.5), 4), [0.0] * 4, atol=0)


def test_group_advantages_unbiased_std_per_group():
    # groups (0, 2), (1, 1), (3, 0): unbiased std sqrt(2) and sqrt(4.5); 1/(1.41421356+1e-4) = 0.7070567847,
    # 1.5/(2.12132034+1e-4) = 0.7070734494 (a biased std would give 0.9999 for both)
    adv = group_advantages(f32(0, 2, 1, 1, 3, 0), 2)
    close(adv, [-0.7070567847, 0.7070567847, 0.0, 0.0, 0.7070734494, -0.7070734494])
    close(group_advantages(f32(0, 2), 2, eps=1.0), [-1 / (2 ** 0.5 + 1), 1 / (2 ** 0.5 + 1)])
    with pytest.raises(ValueError, match="group_size"):
        group_advantages(f32(0, 1, 2), 2)


# ------------------------------------------------------------------ a mixed batch


def think(answer):
    return f"<think>t</think><answer>{answer}</answer>"


def test_score_batch_mixed_image_video():
    completions = [
        # P0 video, multiple choice B: acc 1 1 0 0, format 1 0 0 1; shuffled p~ = 0.5 <= p = 0.5 -> +0.3 x2;
        # 2 correct, #0 (400) in range -> +0.2. Totals 2.5, 1.3, 0, 1
        think("B"), "<think>t</think> <answer>B</answer> done", "<answer>C</answer>", think("A"),
        # P1 image, numerical 3.5: "3.50" ok, "35" has no "." -> 0, "3,5" -> 35 != 3.5; 2 correct at 320 and
        # 512 (in range). Totals 2.2, 2.2, 1, 1
        think("3.50"), think("3.5"), think("35"), think("3,5"),
        # P2 image, OCR, all exact: 2.0 each (length 100 out of range)
        *[think("hello world")] * 4,
        # P3 video, free-form "the cat sat" vs "cat": 1/3 (see test_rewards); no format; shuffled scores 1.0,
        # 1/3 < 0.8 -> flag 0; 4 correct, 3 in range -> totals 1/3+0.2 x3, 1/3
        *["<answer>cat</answer>"] * 4,
    ]
    lengths = [400, 200, 330, 500, 320, 512, 513, 768, 100, 100, 100, 100, 320, 400, 512, 100]
    solutions = ["<answer>B</answer>", "<answer>3.5</answer>", "<answer>hello world</answer>",
                 "<answer>the cat sat</answer>"]
    types = ["multiple choice", "numerical", "OCR", "free-form"]
    shuffled = [[think("B"), think("D")], None, None, ["<answer>the cat sat</answer>"]]
    out = score_batch(completions, lengths, solutions, types, shuffled)
    close(out.accuracy, [1, 1, 0, 0, 1, 1, 0, 0, 1, 1, 1, 1] + [1 / 3] * 4)
    close(out.format, [1, 0, 0, 1] + [1] * 8 + [0] * 4)
    close(out.total, [2.5, 1.3, 0, 1, 2.2, 2.2, 1, 1, 2, 2, 2, 2] + [1 / 3 + 0.2] * 3 + [1 / 3])
    close(out.temporal, [1.0, 0.5, 0.5, 0.0])
    # group stds (unbiased): sqrt(3.18/3) = 1.0295630141, sqrt(1.44/3) = 0.6928203230, 0, sqrt(0.03/3) = 0.1
    close(out.group_std, [1.0295630141, 0.6928203230, 0.0, 0.1], atol=1e-5)
    close(out.advantages, [1.2625489915, 0.0971191532, -1.1654298383, -0.1942383064,
                           0.8659004218, 0.8659004218, -0.8659004218, -0.8659004218, 0, 0, 0, 0,
                           0.4995004995, 0.4995004995, 0.4995004995, -1.4985014985], atol=1e-4)
    assert out.exceptions == 0 and out.errors == ()
    metrics = out.metrics()
    expected = {
        "completion_length": 5275 / 16,                   # (1430 + 2113 + 400 + 1332) / 16
        "rewards/accuracy_reward": (2 + 2 + 4 + 4 / 3) / 16,
        "rewards/format_reward": 10 / 16,
        "all_wrong": 0.25,                                # P3: every total <= 1
        "all_correct": 0.25,                              # P2: every total >= 2
        "temporal_rewards": 0.5,                          # (1 + 0.5 + 0.5 + 0) / 4
        # video groups P0 and P3. P0 without the bonus: totals 2.2, 1, 0, 1 (std 0.9), advantages 1.2776,
        # -0.0555, -1.1665, -0.0555: |delta| 0.01509 + 0.15267 + 0.00111 + 0.13869 over 8 completions (P3: 0)
        "temporal_adv_delta": 0.3075615 / 8,
        "temporal_adv_changed": 0.5,                      # P0 moved (its format differs), P3's bonus did not fire
        "reward": 21.1333333333 / 16,                     # (4.8 + 6.4 + 8 + 1.9333333) / 16
        "reward_std": 0.4555958343,
        "reward_exceptions": 0.0,
    }
    assert metrics.keys() == expected.keys()
    for key, value in expected.items():
        assert metrics[key] == pytest.approx(value, abs=1e-5), key


def test_score_batch_counts_exceptions():
    completions = [think("12"), think("abc"), think("10"), "nothing"]
    out = score_batch(completions, [400] * 4, ["<answer>10</answer>"], ["regression"],
                      [[think("x"), think("10")]])
    # "abc", "nothing" (-> "") and the shuffled "x" raise; each scores 0
    assert out.exceptions == 3
    assert len(out.errors) == 3 and all(e.startswith("regression: ") for e in out.errors)
    close(out.accuracy, [0.8, 0.0, 1.0, 0.0], atol=1e-6)
    assert out.metrics()["reward_exceptions"] == 3.0


def test_score_batch_temporal_off_omits_the_metric():
    cfg = cfg_with(temporal=False, reward_funcs=("accuracy",))
    out = score_batch([think("A"), think("B")], [10, 10], ["<answer>A</answer>"], ["multiple choice"],
                      [[think("A")]], cfg)
    close(out.temporal, [0.5])
    close(out.total, [1.0, 0.0])
    assert "temporal_rewards" not in out.metrics() and "rewards/format_reward" not in out.metrics()


def test_score_batch_rejects_ragged_input():
    with pytest.raises(ValueError, match="whole groups"):
        score_batch(["a", "b", "c"], [1, 1, 1], ["<answer>A</answer>"] * 2, ["OCR"] * 2)
    with pytest.raises(ValueError, match="lengths"):
        score_batch(["a", "b"], [1], ["<answer>A</answer>"], ["OCR"])
