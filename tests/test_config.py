"""Config tree: presets, YAML files, --section.key=value overrides, and one-line errors naming the field."""
import pytest

from vr1fast.cli import parse as parse_args
from vr1fast.cli import to_yaml
from vr1fast.config import Config, demo, videor1
from vr1fast.errors import ConfigError


def _error(argv, tmp_path=None) -> str:
    with pytest.raises(ConfigError) as e:
        parse_args(argv)
    message = str(e.value)
    assert "\n" not in message
    return message


def test_no_argument_is_the_demo_preset():
    cfg = parse_args([])
    assert cfg.preset == "demo"
    assert cfg.to_dict() == demo().to_dict()
    assert cfg.model.path is None and cfg.data.path is None  # tiny model, synthetic data


def test_videor1_preset_has_the_video_r1_constants():
    """Values copied from Video-R1's run_grpo_video.sh / grpo_trainer.py (docs/video-r1.md §0, §7)."""
    cfg = parse_args(["--preset", "videor1"])
    assert (cfg.rollout.num_generations, cfg.rollout.shuffled_samples()) == (8, 4)
    assert (cfg.rollout.temperature, cfg.rollout.top_p) == (1.0, 0.95)
    assert (cfg.rollout.max_new_tokens, cfg.rollout.max_prompt_length) == (768, 16384)
    assert (cfg.optim.lr, cfg.optim.scheduler, cfg.optim.weight_decay) == (1e-6, "cosine", 0.01)
    assert (cfg.optim.max_grad_norm, cfg.optim.warmup_steps) == (5.0, 0)
    assert (cfg.loss.beta, cfg.loss.kl_clamp, cfg.loss.loss_type) == (0.04, 10.0, "grpo")
    assert (cfg.reward.temporal_mu, cfg.reward.temporal_alpha, cfg.reward.correct_threshold) == (0.8, 0.3, 0.1)
    assert (cfg.reward.len_min, cfg.reward.len_max, cfg.reward.len_bonus) == (320, 512, 0.2)
    assert (cfg.video.max_frames, cfg.video.min_frames, cfg.video.fps) == (16, 4, 2.0)
    assert cfg.video.min_pixels == cfg.video.max_pixels == 100352
    assert (cfg.train.prompts_per_rank, cfg.train.grad_accum, cfg.train.bf16) == (1, 1, None)  # None: bf16 on CUDA
    assert cfg.model.gradient_checkpointing is True
    assert cfg.to_dict() == videor1().to_dict() == {**Config().to_dict(), "preset": "videor1"}


def test_overrides_parse_to_the_field_type():
    cfg = parse_args(["--train.max_steps=7", "--optim.lr", "3e-5", "--optim.betas=[0.8, 0.9]",
                      "--loss.delta=null", "--loss.kl_clamp=null", "--data.skip_bad=true",
                      "--reward.reward_funcs=[accuracy]", "--dist.strategy=fsdp2"])
    assert cfg.train.max_steps == 7 and isinstance(cfg.train.max_steps, int)
    assert cfg.optim.lr == 3e-5 and isinstance(cfg.optim.lr, float)
    assert cfg.optim.betas == (0.8, 0.9)
    assert cfg.loss.kl_clamp is None and cfg.data.skip_bad is True
    assert cfg.reward.reward_funcs == ("accuracy",)
    assert cfg.dist.strategy == "fsdp2"


@pytest.mark.parametrize("text, value", [("null", None), ("true", True), ("false", False)])
def test_train_bf16_is_null_true_or_false(text, value):
    assert parse_args([f"--train.bf16={text}"]).train.bf16 is value


@pytest.mark.parametrize("argv, names", [
    (["--train.max_step=3"], ["train.max_step"]),
    (["--trian.max_steps=3"], ["trian"]),
    (["--train.max_steps=three"], ["train.max_steps", "integer"]),
    (["--train.bf16=maybe"], ["train.bf16"]),
    (["--optim.lr=fast"], ["optim.lr"]),
    (["--loss.loss_type=ppo"], ["loss.loss_type", "ppo"]),
    (["--optim.betas=[0.9]"], ["optim.betas"]),
    (["--train=3"], ["train", "section"]),
    (["--rollout.num_generations=1"], ["rollout.num_generations"]),
    (["--reward.reward_funcs=[accuracy, speed]"], ["reward.reward_funcs", "speed"]),
    (["--preset=huge"], ["huge"]),
    (["train.max_steps=3"], ["train.max_steps=3"]),
    (["--train.max_steps"], ["--train.max_steps"]),
])
def test_bad_config_is_one_line_naming_the_field(argv, names):
    message = _error(argv)
    for name in names:
        assert name in message


def test_yaml_file_then_cli_override(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("preset: videor1\ntrain:\n  max_steps: 5\n  output_dir: /tmp/x\nrollout:\n  top_p: 0.5\n")
    cfg = parse_args(["--config", str(path), "--train.max_steps=9"])
    assert cfg.preset == "videor1"
    assert cfg.rollout.num_generations == 8           # from the preset named in the file
    assert cfg.rollout.top_p == 0.5                   # from the file
    assert cfg.train.output_dir == "/tmp/x"
    assert cfg.train.max_steps == 9                   # CLI wins over the file


def test_yaml_unknown_key_and_missing_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("rollout:\n  groupsize: 8\n")
    assert "rollout.groupsize" in _error(["--config", str(path)])
    assert "nope.yaml" in _error(["--config", str(tmp_path / "nope.yaml")])
    path.write_text("rollout: [1, 2\n")
    assert str(path) in _error(["--config", str(path)])


def test_resolved_yaml_round_trips(tmp_path):
    cfg = parse_args(["--train.max_steps=4", "--optim.betas=[0.5, 0.6]", "--loss.delta=1.5"])
    path = tmp_path / "resolved.yaml"
    path.write_text(to_yaml(cfg))
    again = parse_args(["--config", str(path)])
    assert again.to_dict() == cfg.to_dict()


def test_shuffled_count_defaults_to_half_the_group_and_one_update_per_rollout():
    assert parse_args(["--preset=videor1", "--rollout.num_generations=16"]).rollout.shuffled_samples() == 8
    assert parse_args(["--rollout.num_shuffled=0"]).rollout.shuffled_samples() == 0
    assert parse_args([]).loss.num_iterations == 1  # one update per rollout, Video-R1's
    assert parse_args(["--preset=videor1"]).loss.num_iterations == 1
    assert parse_args(["--loss.num_iterations=3"]).loss.num_iterations == 3
    with pytest.raises(ConfigError, match="loss.num_iterations must be >= 1"):
        parse_args(["--loss.num_iterations=0"])


def test_config_holds_only_what_works():
    """The engines the config accepts are exactly those ``rollout.generate`` runs, and LossConfig's defaults are the
    kernels' (``kernels.reference.DEFAULTS``), so a default run and a direct kernel call compute the same loss."""
    import typing

    from vr1fast.config import LossConfig, RolloutConfig
    from vr1fast.kernels.reference import DEFAULTS
    from vr1fast.rollout import ENGINES

    assert typing.get_args(typing.get_type_hints(RolloutConfig)["engine"]) == ("auto", *ENGINES)
    assert {k: DEFAULTS[k] for k in LossConfig().kernel_kwargs()} == LossConfig().kernel_kwargs()
    with pytest.raises(ConfigError, match="rollout.engine"):
        parse_args(["--rollout.engine=fast"])
