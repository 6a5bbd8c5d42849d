"""T-GRPO reward assembly and group-normalised advantages (Video-R1 ``grpo_trainer.py::compute_loss``).

For one prompt with G ordered completions (accuracy ``a``, format ``f``, token length ``n``) and, for a video,
S shuffled completions (accuracy ``ã``); ``c_i = a_i > correct_threshold`` (0.1):

* temporal bonus ``t_i`` (video prompts, ``cfg.temporal``), with p = mean(a), p̃ = mean(ã) in float32:
    - ``code``   (Video-R1's code): ``t_i = α·c_i`` if p >= μ·p̃ (μ = 0.8, α = 0.3)
    - ``strict`` (the paper):       ``t_i = α·c_i`` if p > p̃ (μ is not used)
    - ``diff``:                     ``t_i = α·(p − p̃)·c_i`` if p > p̃ (μ is not used)
    - ``advantage`` (not Video-R1): ``t_i = α·c_i`` if p > p̃, added to the *advantage* after the group normalisation
      below, not to the reward. The three rules above put it in the reward, where, with 0/1 accuracy and equal
      format and length scores, it scales the group's spread by (1 + α) and the normalisation divides that out
      (Video-R1 issue #51): it changes no advantage. Added afterwards it survives, and it acts in groups whose
      rewards are all equal (all correct), where GRPO has no signal at all.
  The logged flag is 1.0 when the condition held, 0.0 when not, 0.5 for prompts without a shuffled group.
  Logged next to it (:meth:`BatchRewards.metrics`): ``temporal_adv_delta``, the mean |A_with − A_without| over the
  completions of the video groups (A_without: the same group with no bonus), and ``temporal_adv_changed``, the
  fraction of video groups where some advantage moved by more than ``ADV_CHANGED`` (1e-3).
* length bonus ``l_i = ω·c_i·[l_min <= n_i <= l_max]`` (ω = 0.2, 320..512 inclusive), only when at least
  ``len_min_correct`` (2) completions of the group are correct. ``c_i`` uses the raw accuracy, never ``a + t``.
  ``n_i`` counts tokens up to and including the first EOS (``vr1fast.rollout.completion_lengths``); no EOS means the full length.
* total ``r_i = (a_i + t_i) + f_i + l_i``, summed in float32 in that order, as Video-R1 does; then ``+ u_i`` for
  each of the user's ``module:function`` rewards in ``reward_funcs``, in their order (``rl.rewards.custom_reward``;
  one that raises scores 0.0 and is counted in ``reward_exceptions``, like the accuracy reward).
* advantage ``A_i = (r_i − mean_G r) / (std_G r + eps)``, unbiased std, eps = 1e-4 (``+ t_i`` for ``advantage``).

Beyond Video-R1 (which runs one prompt per rank): :func:`score_batch` scores several prompts, images and videos
mixed, each group on its own, with the same numbers as Video-R1 would give each prompt alone.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch

from vr1fast.config import RewardConfig
from vr1fast.rl.rewards import custom_reward, format_reward, try_accuracy_reward, try_custom_reward

NO_SHUFFLE_FLAG = 0.5  # Video-R1 logs temporal_rewards = 0.5 for prompts without a shuffled group
MAX_KEPT_ERRORS = 5
REWARD_RULES = ("code", "strict", "diff")  # temporal rules whose bonus enters the reward (the rest: the advantage)
ADV_CHANGED = 1e-3    # temporal_adv_changed counts groups where the bonus moved some advantage by more than this


def temporal_bonus(accuracy: torch.Tensor, shuffled_accuracy: Optional[torch.Tensor],
                   cfg: RewardConfig) -> tuple[torch.Tensor, float]:
    """(float32 [G] bonus added to the accuracy, logged flag 1.0 / 0.0 / 0.5), per the module docstring."""
    acc = accuracy.to(torch.float32)
    if shuffled_accuracy is None or not cfg.temporal:
        return torch.zeros_like(acc), NO_SHUFFLE_FLAG
    if shuffled_accuracy.numel() == 0:
        raise ValueError("shuffled_accuracy is empty; pass None for prompts without shuffled completions")
    p = acc.mean()
    p_shuffled = shuffled_accuracy.to(torch.float32).mean()
    if cfg.temporal_rule == "code":
        fired, amount = bool(p >= cfg.temporal_mu * p_shuffled), torch.tensor(cfg.temporal_alpha)
    elif cfg.temporal_rule in ("strict", "advantage"):
        fired, amount = bool(p > p_shuffled), torch.tensor(cfg.temporal_alpha)
    elif cfg.temporal_rule == "diff":
        fired, amount = bool(p > p_shuffled), cfg.temporal_alpha * (p - p_shuffled)
    else:
        raise ValueError(f"reward.temporal_rule: unknown rule {cfg.temporal_rule!r} (code | strict | diff | "
                         f"advantage)")
    if not fired:
        return torch.zeros_like(acc), 0.0
    correct = acc > cfg.correct_threshold
    return torch.where(correct, amount.to(acc), torch.zeros_like(acc)), 1.0


def length_bonus(accuracy: torch.Tensor, lengths: torch.Tensor, cfg: RewardConfig) -> torch.Tensor:
    """float32 [G]: ω for correct completions with l_min <= length <= l_max, if >= len_min_correct are correct."""
    acc = accuracy.to(torch.float32)
    correct = acc > cfg.correct_threshold
    if not cfg.len_control or int(correct.sum()) < cfg.len_min_correct:
        return torch.zeros_like(acc)
    lengths = lengths.to(acc.device)
    in_range = (lengths >= cfg.len_min) & (lengths <= cfg.len_max)
    return torch.where(correct & in_range, torch.tensor(cfg.len_bonus).to(acc), torch.zeros_like(acc))


def _group_total(accuracy, format, lengths, shuffled_accuracy, cfg) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(total reward, the temporal bonus ``t`` — in the total for ``REWARD_RULES`` only —, the logged flag)."""
    if "accuracy" not in cfg.reward_funcs:
        raise ValueError("reward.reward_funcs must contain 'accuracy' (the temporal and length rules read it)")
    if not (accuracy.dim() == 1 and accuracy.shape == format.shape == lengths.shape):
        raise ValueError(f"accuracy, format and lengths must be 1-D of one length, got "
                         f"{tuple(accuracy.shape)}, {tuple(format.shape)}, {tuple(lengths.shape)}")
    acc = accuracy.to(torch.float32)
    bonus, flag = temporal_bonus(acc, shuffled_accuracy, cfg)
    total = acc + bonus if cfg.temporal_rule in REWARD_RULES else acc
    if "format" in cfg.reward_funcs:
        total = total + format.to(total)
    return total + length_bonus(acc, lengths, cfg), bonus, flag


def total_rewards(accuracy: torch.Tensor, format: torch.Tensor, lengths: torch.Tensor,
                  shuffled_accuracy: Optional[torch.Tensor] = None,
                  cfg: Optional[RewardConfig] = None) -> torch.Tensor:
    """float32 [G] total rewards of one group: (accuracy + temporal) + format + length (module docstring).

    ``accuracy``/``format``/``lengths`` are [G]; ``shuffled_accuracy`` is [S] for a video prompt, None for an image
    prompt (no temporal bonus). ``cfg`` None = Video-R1's defaults. With ``temporal_rule="advantage"`` the bonus is
    not part of the reward (it goes to the advantage).
    """
    return _group_total(accuracy, format, lengths, shuffled_accuracy, cfg or RewardConfig())[0]


def group_advantages(rewards: torch.Tensor, group_size: int, eps: float = 1e-4) -> torch.Tensor:
    """[B*G] prompt-major rewards → [B*G] advantages (r − mean_G) / (std_G + eps), unbiased std per group."""
    if rewards.dim() != 1 or group_size < 2 or rewards.numel() % group_size:
        raise ValueError(f"rewards must be 1-D with a multiple of group_size >= 2 elements, got shape "
                         f"{tuple(rewards.shape)} and group_size {group_size}")
    grouped = rewards.view(-1, group_size)
    mean = grouped.mean(dim=1, keepdim=True)
    std = grouped.std(dim=1, keepdim=True)
    return ((grouped - mean) / (std + eps)).reshape(-1)


@dataclass(frozen=True)
class BatchRewards:
    """Rewards of B prompts × G ordered completions (prompt-major, flat [B*G]); all tensors float32 but lengths."""

    accuracy: torch.Tensor     # [B*G] raw accuracy reward (no temporal bonus)
    format: torch.Tensor       # [B*G] format reward
    lengths: torch.Tensor      # [B*G] int64, tokens up to and including the first EOS
    total: torch.Tensor        # [B*G] (accuracy + temporal) + format + length; rule "advantage": no temporal here
    advantages: torch.Tensor   # [B*G] group-normalised total (rule "advantage": + the temporal bonus)
    temporal: torch.Tensor     # [B] 1.0 bonus fired / 0.0 not / 0.5 no shuffled group (image, or temporal off)
    group_std: torch.Tensor    # [B] unbiased std of each group's total
    group_size: int
    exceptions: int            # accuracy rewards that raised (scored 0.0), ordered and shuffled completions
    errors: tuple[str, ...]    # the first few of those exceptions, "problem_type: ErrorType: message"
    log_temporal: bool         # Video-R1 logs temporal_rewards only when temporal is on
    log_format: bool           # "format" in reward_funcs
    shuffled_accuracy: tuple[Optional[torch.Tensor], ...] = ()  # [B]: each prompt's shuffled accuracies or None
    custom: tuple[tuple[str, torch.Tensor], ...] = ()  # (function name, [B*G] float32) per user reward function
    plain_advantages: Optional[torch.Tensor] = None  # [B*G] the advantages without the temporal bonus (temporal on)

    def metrics(self) -> dict[str, float]:
        """Video-R1's logged names: means over the batch; all_wrong/all_correct are fractions of groups."""
        grouped = self.total.view(-1, self.group_size)
        out = {
            "completion_length": self.lengths.float().mean().item(),
            "rewards/accuracy_reward": self.accuracy.mean().item(),
        }
        if self.log_format:
            out["rewards/format_reward"] = self.format.mean().item()
        for name, values in self.custom:
            out[f"rewards/{name}"] = values.mean().item()
        out["all_wrong"] = (grouped <= 1).all(dim=1).float().mean().item()
        out["all_correct"] = (grouped >= 2).all(dim=1).float().mean().item()
        if self.log_temporal:
            out["temporal_rewards"] = self.temporal.mean().item()
            out.update(self.bonus_effect())
        out["reward"] = self.total.mean().item()
        out["reward_std"] = self.group_std.mean().item()
        out["reward_exceptions"] = float(self.exceptions)
        return out

    def bonus_effect(self) -> dict[str, float]:
        """``temporal_adv_delta``: mean |A_with − A_without| over the video groups' completions;
        ``temporal_adv_changed``: the fraction of video groups where one moved by more than ``ADV_CHANGED``. Both
        0.0 when the batch has no video group (nothing could change)."""
        video = torch.tensor([a is not None for a in self.shuffled_accuracy], dtype=torch.bool)
        if self.plain_advantages is None or not bool(video.any()):
            return {"temporal_adv_delta": 0.0, "temporal_adv_changed": 0.0}
        delta = (self.advantages - self.plain_advantages).abs().view(-1, self.group_size)[video]
        return {"temporal_adv_delta": delta.mean().item(),
                "temporal_adv_changed": (delta.amax(dim=1) > ADV_CHANGED).float().mean().item()}


def _accuracies(completions, solution, problem_type, errors: list[str]) -> torch.Tensor:
    values = []
    for completion in completions:
        value, error = try_accuracy_reward(completion, solution, problem_type)
        values.append(value)
        if error is not None:
            errors.append(error)
    return torch.tensor(values, dtype=torch.float32)


def _custom_rewards(completions, solutions, problem_types, group: int, cfg: RewardConfig,
                    errors: list[str]) -> tuple[tuple[str, torch.Tensor], ...]:
    """(name, float32 [B*G]) for each ``module:function`` in ``cfg.reward_funcs``; exceptions appended to
    ``errors`` and scored 0.0."""
    out = []
    for name in (n for n in cfg.reward_funcs if ":" in n):
        fn, values = custom_reward(name), []
        for i, completion in enumerate(completions):
            value, error = try_custom_reward(fn, completion, solutions[i // group], problem_types[i // group])
            values.append(value)
            if error is not None:
                errors.append(error)
        out.append((name.partition(":")[2], torch.tensor(values, dtype=torch.float32)))
    return tuple(out)


def score_batch(completions: Sequence[str], lengths: Union[torch.Tensor, Sequence[int]],
                solutions: Sequence[str], problem_types: Sequence[str],
                shuffled: Optional[Sequence[Optional[Sequence[str]]]] = None,
                cfg: Optional[RewardConfig] = None) -> BatchRewards:
    """Score B groups: ``completions``/``lengths`` [B*G] prompt-major (decoded without special tokens),
    ``solutions``/``problem_types`` [B], ``shuffled[b]`` the decoded shuffled completions of prompt b or None
    (image prompt; ``shuffled=None`` means none at all). Returns per-completion rewards and advantages."""
    cfg = cfg or RewardConfig()
    num_prompts = len(solutions)
    if num_prompts == 0 or len(problem_types) != num_prompts or len(completions) % num_prompts:
        raise ValueError(f"{len(completions)} completions, {num_prompts} solutions and {len(problem_types)} "
                         f"problem types do not form whole groups")
    shuffled = list(shuffled) if shuffled is not None else [None] * num_prompts
    if len(shuffled) != num_prompts:
        raise ValueError(f"shuffled has {len(shuffled)} entries for {num_prompts} prompts")
    group = len(completions) // num_prompts
    lengths = torch.as_tensor(lengths, dtype=torch.int64).reshape(-1)
    if lengths.numel() != len(completions):
        raise ValueError(f"{lengths.numel()} lengths for {len(completions)} completions")
    errors: list[str] = []
    accuracy = torch.empty(len(completions), dtype=torch.float32)
    fmt = torch.tensor([format_reward(c) for c in completions], dtype=torch.float32)
    total, plain, post = torch.empty_like(accuracy), torch.empty_like(accuracy), torch.zeros_like(accuracy)
    flags = torch.empty(num_prompts, dtype=torch.float32)
    shuffled_accuracies = []
    for b in range(num_prompts):
        rows = slice(b * group, (b + 1) * group)
        accuracy[rows] = _accuracies(completions[rows], solutions[b], problem_types[b], errors)
        shuffled_acc = None
        if shuffled[b] is not None and cfg.temporal:
            shuffled_acc = _accuracies(shuffled[b], solutions[b], problem_types[b], errors)
        total[rows], post[rows], flags[b] = _group_total(accuracy[rows], fmt[rows], lengths[rows], shuffled_acc, cfg)
        plain[rows] = total[rows] if shuffled_acc is None else _group_total(
            accuracy[rows], fmt[rows], lengths[rows], None, cfg)[0]
        shuffled_accuracies.append(shuffled_acc)
    custom = _custom_rewards(completions, solutions, problem_types, group, cfg, errors)
    for _, values in custom:
        total += values
        plain += values
    advantages = group_advantages(total, group, cfg.adv_eps)
    if cfg.temporal_rule not in REWARD_RULES:
        advantages = advantages + post
    return BatchRewards(
        accuracy=accuracy, format=fmt, lengths=lengths, total=total, advantages=advantages,
        plain_advantages=group_advantages(plain, group, cfg.adv_eps) if cfg.temporal else None,
        temporal=flags, group_std=total.view(-1, group).std(dim=1), group_size=group,
        exceptions=len(errors), errors=tuple(errors[:MAX_KEPT_ERRORS]),
        log_temporal=cfg.temporal, log_format="format" in cfg.reward_funcs,
        shuffled_accuracy=tuple(shuffled_accuracies), custom=custom,
    )
