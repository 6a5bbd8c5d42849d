"""vr1fast.cli: the command-line grammar of every README command and test parses to the Config the parser before
cli.py gave (values recorded with it), the same one-line errors, ``--help``, and run_main's exit codes."""
import dataclasses
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from vr1fast.cli import field_docs, help_text, parse, run_main, to_yaml
from vr1fast.config import PRESETS, Config, ModelConfig, RewardConfig, demo
from vr1fast.errors import ConfigError, MediaError, NonFiniteLossError

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--data.synthetic_dir=/s", "--data.synthetic_size=8", "--train.output_dir=/o", "--train.prompts_per_rank=1",
         "--rollout.num_generations=2", "--rollout.num_shuffled=2", "--rollout.max_new_tokens=8",
         "--metrics.progress_bar=false", "--optim.lr=1e-3", "--optim.weight_decay=0.5", "--model.warmstart_steps=0"]
SMALL_DIFF = {"model.warmstart_steps": 0, "data.synthetic_dir": "/s", "data.synthetic_size": 8,
              "rollout.num_generations": 2, "rollout.max_new_tokens": 8, "optim.lr": 0.001, "optim.weight_decay": 0.5,
              "train.prompts_per_rank": 1, "train.output_dir": "/o", "metrics.progress_bar": False}
YAML_7B = {"model.path": "/path/to/Qwen2.5-VL-7B-COT-SFT", "data.path": "/path/to/Video-R1-260k.json",
           "data.media_root": "/path/to/Video-R1-data", "train.output_dir": "runs/videor1_7b",
           "dist.strategy": "deepspeed", "dist.deepspeed_config": "configs/zero3.json"}
SAME_CONFIG = [  # (argv, the fields that differ from the preset it names), recorded with the parser before cli.py
    ([], {}),
    (SMALL, SMALL_DIFF),
    ([*SMALL, "--train.max_steps=3", "--optim.warmup_steps=1", "--train.save_every=2"],
     {**SMALL_DIFF, "optim.warmup_steps": 1, "train.max_steps": 3, "train.save_every": 2}),
    ([*SMALL, "--rollout.max_new_tokens=6", "--metrics.tensorboard=false", "--metrics.plot=false",
      "--optim.warmup_steps=0", "--train.resume=auto"],
     {**SMALL_DIFF, "rollout.max_new_tokens": 6, "optim.warmup_steps": 0, "train.resume": "auto",
      "metrics.tensorboard": False, "metrics.plot": False}),
    (["--data.synthetic_dir=/s", "--data.synthetic_size=8", "--train.output_dir=/o", "--train.max_steps=2",
      "--train.save_every=2", "--rollout.num_generations=2", "--rollout.num_shuffled=2", "--rollout.max_new_tokens=6",
      "--metrics.progress_bar=false", "--optim.lr=1e-2", "--optim.weight_decay=0.5", "--optim.warmup_steps=0",
      "--model.warmstart_steps=0", "--train.bf16=true", "--dist.strategy=deepspeed",
      "--dist.deepspeed_config=/r/configs/zero3.json", "--train.prompts_per_rank=1", "--model.path=/t"],
     {"model.path": "/t", "model.warmstart_steps": 0, "data.synthetic_dir": "/s", "data.synthetic_size": 8,
      "rollout.num_generations": 2, "rollout.max_new_tokens": 6, "optim.lr": 0.01, "optim.weight_decay": 0.5,
      "optim.warmup_steps": 0, "train.max_steps": 2, "train.prompts_per_rank": 1, "train.output_dir": "/o",
      "train.bf16": True, "train.save_every": 2, "dist.strategy": "deepspeed",
      "dist.deepspeed_config": "/r/configs/zero3.json", "metrics.progress_bar": False}),
    (["--preset", "videor1"], {}),
    (["--preset=videor1", "--rollout.num_generations=16"], {"rollout.num_generations": 16}),
    (["--train.max_steps=7", "--optim.lr", "3e-5", "--optim.betas=[0.8, 0.9]", "--loss.delta=null",
      "--loss.kl_clamp=null", "--data.skip_bad=true", "--reward.reward_funcs=[accuracy]", "--dist.strategy=fsdp2"],
     {"data.skip_bad": True, "reward.reward_funcs": ["accuracy"], "loss.kl_clamp": None, "optim.lr": 3e-05,
      "optim.betas": [0.8, 0.9], "train.max_steps": 7, "dist.strategy": "fsdp2"}),
    (["--train.max_steps=4", "--optim.betas=[0.5, 0.6]", "--loss.delta=1.5"],
     {"loss.delta": 1.5, "optim.betas": [0.5, 0.6], "train.max_steps": 4}),
    (["--train.bf16=null"], {}),
    (["--train.bf16=True"], {"train.bf16": True}),
    (["--train.bf16=False"], {"train.bf16": False}),
    (["--train.bf16", "false"], {"train.bf16": False}),
    (["--data.skip_bad=yes", "--data.shuffle=off"], {"data.skip_bad": True, "data.shuffle": False}),
    (["--video.nframes=~", "--loss.kl_clamp=NULL", "--rollout.num_shuffled=Null"],
     {"rollout.num_shuffled": None, "loss.kl_clamp": None}),
    (["--train.max_steps=3.0", "--loss.epsilon_high=1", "--data.path=123", "--train.output_dir="],
     {"data.path": "123", "loss.epsilon_high": 1.0, "train.max_steps": 3, "train.output_dir": ""}),
    (["--train.max_steps=7", "--train.max_steps=9", "--model.path", "/x y/model", "--model.warmstart_steps", "0"],
     {"model.path": "/x y/model", "model.warmstart_steps": 0, "train.max_steps": 9}),
    (["--optim.betas", "[0.8, 0.95]", "--reward.reward_funcs=[format]", "--video.fps=1e1", "--optim.lr=3e-5"],
     {"video.fps": 10.0, "reward.reward_funcs": ["format"], "optim.lr": 3e-05, "optim.betas": [0.8, 0.95]}),
    (["--preset", "demo", "--model.path=/m", "--model.warmstart_steps=0", "--rollout.engine=hf"],
     {"model.path": "/m", "model.warmstart_steps": 0, "rollout.engine": "hf"}),
    (["--config", "configs/videor1_7b.yaml"], YAML_7B),
    (["--config", "configs/videor1_7b.yaml", "--train.max_steps=50", "--rollout.num_generations=4"],
     {**YAML_7B, "rollout.num_generations": 4, "train.max_steps": 50}),
    (["--config", "configs/videor1_7b.yaml", "--model.path=/models/Qwen2.5-VL-7B-COT-SFT",
      "--data.path=/data/Video-R1-260k.json", "--data.media_root=/data/Video-R1-data"],
     {**YAML_7B, "model.path": "/models/Qwen2.5-VL-7B-COT-SFT", "data.path": "/data/Video-R1-260k.json",
      "data.media_root": "/data/Video-R1-data"}),
    (["--config", "configs/videor1_7b.yaml", "--model.path=$SFT/model", "--data.path=/data/Video-R1-260k.json",
      "--data.media_root=/data/Video-R1-data", "--train.output_dir=runs/videor1_7b", "--train.max_steps=1200",
      "--optim.scheduler=constant"],  # the README's pipeline, step 2 (added after cli.py)
     {**YAML_7B, "model.path": "$SFT/model", "data.path": "/data/Video-R1-260k.json",
      "data.media_root": "/data/Video-R1-data", "optim.scheduler": "constant", "train.max_steps": 1200}),
    # The one change: a string field takes text that is not YAML (the old parser refused the README's "...").
    (["--config", "configs/videor1_7b.yaml", "--model.path=...", "--data.path=...", "--data.media_root=..."],
     {**YAML_7B, "model.path": "...", "data.path": "...", "data.media_root": "..."}),
]
SAME_ERROR = [  # (argv, the ConfigError message), recorded with the parser before cli.py
    (["--train.max_step=3"], "unknown config key 'train.max_step' (known here: bf16, grad_accum, log_every, max_steps, "
                             "output_dir, prompts_per_rank, resume, save_every, save_total_limit, seed)"),
    (["--trian.max_steps=3"], "unknown config key 'trian' (known here: data, dist, eval, loss, metrics, model, "
                              "optim, preset, reward, rollout, sft, train, video)"),
    (["--train.max_steps=three"], "train.max_steps: expected an integer, got 'three'"),
    (["--train.bf16=maybe"], "train.bf16: expected true/false, got 'maybe'"),
    (["--optim.lr=fast"], "optim.lr: expected a number, got 'fast'"),
    (["--loss.loss_type=ppo"], "loss.loss_type: 'ppo' is not one of ['grpo', 'bnpo', 'dr_grpo', 'dapo']"),
    (["--optim.betas=[0.9]"], "optim.betas: expected 2 values, got [0.9]"),
    (["--train=3"], "'train' is a section; set its keys, e.g. --train.<key>=..."),
    (["--rollout.num_generations=1"], "rollout.num_generations must be >= 2 (group std needs two samples)"),
    (["--reward.reward_funcs=[accuracy, speed]"], "reward.reward_funcs: unknown reward function(s) ['speed']"),
    (["--preset=huge"], "unknown preset 'huge' (known: demo, videor1, videor1_sft, sft_demo, videor1_eval)"),
    (["train.max_steps=3"], "unexpected argument 'train.max_steps=3'; use --section.key=value"),
    (["--train.max_steps"], "--train.max_steps needs a value (--train.max_steps=VALUE)"),
    (["--loss.num_iteration=2"], "unknown config key 'loss.num_iteration' (known here: beta, delta, epsilon_high, "
                                 "epsilon_low, head, impl, importance_sampling_level, kl_clamp, loss_type, "
                                 "num_iterations)"),
    (["--loss.num_iterations=0"], "loss.num_iterations must be >= 1"),
    (["--rollout.engine=fast"], "rollout.engine: 'fast' is not one of ['auto', 'hf', 'paged']"),
    (["--train.bf16=None"], "train.bf16: expected true/false, got 'None'"),
    (["--loss.delta=None"], "loss.delta: expected a number, got 'None'"),
    (["--optim.betas=0.9"], "optim.betas: expected a list, got 0.9"),
    (["--train.output_dir=null"], "train.output_dir: expected a string, got None"),
    (["--train.max_steps=[1]"], "train.max_steps: expected an integer, got [1]"),
    (["--model.path=/m"], "model.warmstart_steps=300 warm-starts the tiny model only; with model.path pass "
                          "--model.warmstart_steps=0"),
    (["--optim.lr", "--train.max_steps=3"], "--optim.lr needs a value (--optim.lr=VALUE)"),
    (["--dist.zero_stage=1"], "dist.zero_stage must be 2 or 3"),
    (["--video.fps=1e1e"], "video.fps: expected a number, got '1e1e'"),
    (["--data.skip_bad=1"], "data.skip_bad: expected true/false, got 1"),
    (["--train.max_steps=1.5"], "train.max_steps: expected an integer, got 1.5"),
    (["--train.max_steps.x=1"], "'train.max_steps' is a value, not a section"),
    (["--preset"], "--preset needs a value (--preset=VALUE)"),
    (["--config"], "--config needs a value (--config=VALUE)"),
    # The one change: the old message of a value that is not YAML spanned 7 lines.
    (["--optim.lr=[1"], "optim.lr: cannot parse '[1': expected ',' or ']', but got '<stream end>'"),
]


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def _diff(cfg: Config) -> dict:
    base = _flat(json.loads(json.dumps(PRESETS[cfg.preset]().to_dict())))
    return {k: v for k, v in _flat(json.loads(json.dumps(cfg.to_dict()))).items() if base[k] != v}


def _readme_commands() -> list[tuple[list[str], str]]:
    """Each ``vr1fast.train`` command in README.md's bash blocks: its arguments and the comment line after it."""
    out = []
    for block in re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S):
        lines = block.replace("\\\n", " ").splitlines()
        for i, line in enumerate(lines):
            words = shlex.split(line, comments=True)
            if "vr1fast.train" in words:
                after = lines[i + 1] if i + 1 < len(lines) and lines[i + 1].startswith("#") else ""
                out.append((words[words.index("vr1fast.train") + 1:], after.lstrip("# ")))
    return out


@pytest.mark.parametrize("argv, diff", SAME_CONFIG)
def test_same_config_as_the_parser_before(argv, diff, monkeypatch):
    monkeypatch.chdir(ROOT)
    assert _diff(parse(argv)) == diff


@pytest.mark.parametrize("argv, message", SAME_ERROR)
def test_same_one_line_error_as_the_parser_before(argv, message):
    with pytest.raises(ConfigError) as e:
        parse(argv)
    assert str(e.value) == message


def test_every_readme_command_parses_or_fails_as_the_readme_says(monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    commands = _readme_commands()
    recorded = {tuple(argv): diff for argv, diff in SAME_CONFIG}
    assert len(commands) >= 5 and [] in [argv for argv, _ in commands]
    for argv, comment in commands:
        if argv == ["--help"]:
            with pytest.raises(SystemExit) as e:
                parse(argv, "vr1fast.train")
            assert e.value.code == 0 and "--train.max_steps" in capsys.readouterr().out
        elif comment.startswith("vr1fast.train: error:"):
            with pytest.raises(SystemExit) as e:
                run_main(lambda cfg: None, argv, "vr1fast.train")
            assert e.value.code == 2
            assert capsys.readouterr().err.startswith(comment.removesuffix("...)").removesuffix("..."))
        else:
            assert _diff(parse(argv)) == recorded[tuple(argv)], argv


def test_resolved_yaml_gives_the_same_config(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    for argv, _ in SAME_CONFIG:
        cfg = parse(argv)
        path = tmp_path / "resolved.yaml"
        path.write_text(to_yaml(cfg))
        assert parse(["--config", str(path)]).to_dict() == cfg.to_dict(), argv


def test_help_lists_every_section_key_and_preset():
    proc = subprocess.run([sys.executable, "-m", "vr1fast.train", "--help"], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    def check(name, node):  # a section, its documented keys, then its subsections (model.lora) the same way
        assert f"\n{name}: " in proc.stdout
        assert set(field_docs(type(node))) == {key.name for key in dataclasses.fields(node)}  # each documented
        for key in dataclasses.fields(node):
            child = getattr(node, key.name)
            check(f"{name}.{key.name}", child) if dataclasses.is_dataclass(child) else \
                assert_in(f"  --{name}.{key.name} ")

    def assert_in(text):
        assert text in proc.stdout

    cfg = demo()
    for section in dataclasses.fields(cfg):
        if dataclasses.is_dataclass(node := getattr(cfg, section.name)):
            check(section.name, node)
    assert "\nmodel.lora: " in proc.stdout
    for name, preset in PRESETS.items():
        assert f"  {name} " in proc.stdout and preset.__doc__.splitlines()[0] in proc.stdout
    assert "--model.path TEXT|null\n      (default: null) local HF checkpoint dir" in proc.stdout
    assert "--optim.betas [FLOAT, FLOAT]\n      (default: [0.9, 0.999])" in proc.stdout
    assert "--train.max_steps INT\n      (default: 12) 0 = one epoch" in proc.stdout  # the demo preset's value


def test_short_help_after_a_preset_shows_its_values(capsys):
    with pytest.raises(SystemExit) as e:
        parse(["--preset=videor1", "-h"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "--train.max_steps INT\n      (default: 0)" in out
    assert out == help_text(PRESETS["videor1"](), "vr1fast") + "\n"


@dataclasses.dataclass
class _Commented:
    a: int = 1  # on a's line
    # below a's line
    b: int = 2

    # after a blank line: nobody's
    c: int = 3  # on c's line

    def method(self) -> int:
        return self.c  # inside a method: nobody's


def test_field_docs_follow_the_comment_to_its_field():
    """A comment on a field's line and the comment-only lines below it belong to that field, not the next one."""
    assert field_docs(_Commented) == {"a": "on a's line below a's line", "c": "on c's line"}
    docs = field_docs(ModelConfig)
    assert docs["dtype"].startswith("auto: training builds") and "fp32 on CPU" in docs["dtype"]
    assert "fp32 on CPU" not in docs["attn_implementation"] and docs["tiny_seed"] == "init seed of the tiny model"
    reward = field_docs(RewardConfig)
    assert "mu = 1.0" in reward["temporal_rule"] and "mu = 1.0" not in reward["temporal_mu"]


@pytest.mark.parametrize("argv, field", [
    (["--train.max_step=3"], "train.max_step"),           # unknown key
    (["--train.max_steps=three"], "train.max_steps"),      # bad value
    (["--loss.loss_type=ppo"], "loss.loss_type"),          # bad literal
    (["--data.skip_bad=maybe"], "data.skip_bad"),          # bad bool
])
def test_run_main_config_error_is_one_line_and_exit_2(argv, field, capsys):
    with pytest.raises(SystemExit) as e:
        run_main(lambda cfg: pytest.fail("fn called"), argv, "vr1fast.train")
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("vr1fast.train: error: ") and err.count("\n") == 1 and field in err


def test_run_main_calls_fn_and_passes_its_exit_code():
    seen = []
    assert run_main(lambda cfg: seen.append(cfg.train.max_steps), ["--train.max_steps=5"], "p") is None
    assert seen == [5]
    with pytest.raises(SystemExit) as e:
        run_main(lambda cfg: 3, [], "p")
    assert e.value.code == 3


@pytest.mark.parametrize("error", [MediaError("/v.mp4", "empty file"), NonFiniteLossError("non-finite loss"),
                                   FileNotFoundError("no such file: /x")])
def test_run_main_other_expected_errors_exit_1_on_every_rank(error, capsys, monkeypatch):
    def fail(cfg):
        raise error
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SystemExit) as e:
        run_main(fail, [], "p")
    assert e.value.code == 1 and capsys.readouterr().err == f"p: error (rank 1): {error}\n"
    with pytest.raises(SystemExit) as e:
        run_main(fail, ["--train.max_step=1"], "p")  # a config error: the same on every rank, printed by rank 0 only
    assert e.value.code == 2 and capsys.readouterr().err == ""


def test_an_unexpected_error_keeps_its_traceback():
    def fail(cfg):
        raise KeyError("bug")
    with pytest.raises(KeyError):
        run_main(fail, [], "p")
