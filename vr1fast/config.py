"""One dataclass tree for every knob of vr1fast; presets are functions.

Each stage gets only its own section (``cfg.video`` for frame sampling, ``cfg.reward`` for T-GRPO rewards, ...):
no stage reads another stage's config. Every Video-R1 constant lives here, with the value of Video-R1's code as
the default, so ``Config()`` *is* the Video-R1 setting and presets only change what they name.

``vr1fast.cli`` applies a YAML file and ``--section.key=value`` arguments to a preset and prints ``--help`` from this
file: a field's comment (on its line, continued on the comment lines right below it) is its help text.
:func:`validate` holds the checks a type cannot express.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

from vr1fast.errors import ConfigError


@dataclass
class VideoConfig:
    """Frame sampling and per-frame resize (qwen-vl-utils as vendored by Video-R1, training settings)."""

    fps: float = 2.0                      # sampling rate when no explicit frame count is given
    min_frames: int = 4                   # FPS_MIN_FRAMES
    max_frames: int = 16                  # FPS_MAX_FRAMES (eval: 16/32/64)
    frame_factor: int = 2                 # frame count floored to a multiple of this (temporal patch)
    nframes: Optional[int] = None         # fixed frame count (rounded to frame_factor); overrides fps
    min_pixels: int = 128 * 28 * 28       # VIDEO_MIN_PIXELS
    max_pixels: int = 128 * 28 * 28       # VIDEO_MAX_PIXELS (eval: 256*28*28)
    total_pixels: int = int(128000 * 28 * 28 * 0.9)  # VIDEO_TOTAL_PIXELS
    image_min_pixels: int = 4 * 28 * 28   # MIN_PIXELS for images
    image_max_pixels: int = 256 * 28 * 28  # MAX_PIXELS for images
    max_ratio: float = 200.0              # smart_resize rejects more extreme aspect ratios
    backend: Literal["auto", "dali", "decord", "pyav"] = "auto"  # auto = decord if importable else PyAV (CPU);
    # dali = NVIDIA DALI (vr1fast.data.dali: NVDEC on a GPU; on CPU only VP8/VP9/MJPEG, the rest through PyAV)
    decode_timeout_s: float = 120.0       # a decode that takes longer is a MediaError, never a hang


@dataclass
class DataConfig:
    """Where the records and media are, and what to do with bad ones."""

    path: Optional[str] = None            # JSON list or JSONL in the Video-R1 schema; None = synthetic set
    media_root: Optional[str] = None      # record paths ("./CLEVRER/...") are relative to this; None = file's dir
    skip_bad: bool = False                # True: malformed records / broken media are counted and skipped
    shuffle: bool = True                  # random sampler, as HF Trainer's default
    frame_shuffle: Literal["frame", "pair"] = "frame"  # Video-R1 permutes single frames; "pair" keeps 2-frame groups
    shuffle_allow_identity: bool = False  # Video-R1's randperm can return the identity (1/T!); we re-draw
    second_per_grid_ts: float = 1.0       # M-RoPE seconds per temporal patch; Video-R1 training never passes fps
    synthetic_dir: str = "runs/synthetic"  # where the embedded default set is generated
    synthetic_size: int = 24              # records in the synthetic set
    synthetic_seed: int = 0               # seed of the synthetic set
    eval_mode: bool = False               # eval prompt variant
    frame_cache: Optional[str] = None     # directory caching sampled, resized frames (vr1fast.data.frame_cache)
    frame_cache_gb: float = 100.0         # its size cap: least recently used entries are deleted past it
    prefetch_workers: int = 0             # threads decoding (T-GRPO: and processing) the next micro-batches; 0 = off
    prefetch_depth: int = 2               # micro-batches decoded ahead of the one being consumed


@dataclass
class LoraConfig:
    """LoRA adapters through peft (``vr1fast.model.lora``), with TRL's ``use_peft`` / ``lora_*`` defaults.

    The frozen reference is the base model with the adapters disabled (no second copy of the weights)."""

    enabled: bool = False                 # TRL's use_peft
    rank: int = 16                        # TRL's lora_r
    alpha: int = 32                       # TRL's lora_alpha
    dropout: float = 0.05                 # TRL's lora_dropout
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    # linear layers of the language model that get adapters (module names)
    vision: Literal["frozen", "lora"] = "frozen"  # frozen: no adapter and no gradient in the vision tower; lora:
    # adapters on the vision blocks' linear layers too


@dataclass
class ModelConfig:
    """The policy (and frozen reference) weights and how they run."""

    path: Optional[str] = None            # local HF checkpoint dir; None = the tiny random Qwen2.5-VL
    dtype: Literal["auto", "bfloat16", "float32", "float16"] = "auto"  # auto: training builds policy and reference
    # in the precision plan's dtype (precision.precision_plan); model.load_model: bf16 on GPU, fp32 on CPU
    attn_implementation: Literal["auto", "sdpa", "eager", "flash_attention_2"] = "auto"  # auto: flash-attn on CUDA
    # where importable, else sdpa (model.load.resolve_attn)
    gradient_checkpointing: bool = True   # recompute the decoder activations in the backward
    share_prompt: bool = True             # policy and reference forwards lay each group out once, prompt ‖
    # completion_1 ‖ … ‖ completion_G (vr1fast.model.shared: ~3x fewer decoder tokens at Video-R1's shape);
    # false = the prompt repeated per completion (Video-R1's layout). Needs attention sdpa or flash, not eager
    freeze_vision: bool = False           # no gradient into the vision tower
    tiny_seed: int = 0                    # init seed of the tiny model
    rope_positions: Literal["videor1", "transformers"] = "videor1"  # M-RoPE: Video-R1's transformers 4.x rule
    # (text after a video resumes at max(t, h, w) + 1) or the installed 5.x one; see vr1fast.model.rope
    warmstart_steps: int = 0              # demo only (Video-R1 starts from an SFT checkpoint): steps of vr1fast.sft
    # on the synthetic SFT set that warm-start the tiny model before RL, cached (vr1fast.warmstart); 0 = off
    warmstart_lr: float = 3e-3            # AdamW learning rate of the warm start (cosine to 0, clip 1)
    warmstart_batch_size: int = 4         # SFT examples per warm-start step
    lora: LoraConfig = field(default_factory=LoraConfig)  # LoRA adapters (model.lora.*)


@dataclass
class RolloutConfig:
    """Sampling G completions per prompt on the ordered and the shuffled video."""

    engine: Literal["auto", "hf", "paged"] = "auto"  # auto = paged on a GPU, hf on CPU; hf = HF generate as
    # Video-R1 calls it (the baseline); paged = prompts prefilled once, KV pages shared by their samples
    num_generations: int = 8              # G ordered completions per prompt
    num_shuffled: Optional[int] = None    # completions on the shuffled video; None = G // 2 (Video-R1); 0 disables
    temperature: float = 1.0              # sampling temperature; the loss log-probs use the same T (TRL)
    top_p: float = 0.95                   # nucleus sampling mass
    top_k: int = 50                       # Video-R1's GenerationConfig left transformers 4.x's default 50; 0 = off
    max_new_tokens: int = 768             # completion length cap
    max_prompt_length: int = 16384        # a longer prompt is an error naming its record (Video-R1 truncates)
    kv_cache_fraction: float = 0.8        # paged: share of the device's free memory the KV pool may take per rollout
    kv_page_size: int = 16                # paged: tokens per KV page
    cuda_graphs: bool = True              # paged on CUDA: decode steps replayed from CUDA graphs captured once per
    # rollout and batch size (rollout.graphs); false = every step eager (vLLM's enforce_eager)

    def shuffled_samples(self) -> int:
        """Completions per shuffled prompt: ``num_shuffled``, or G // 2 as Video-R1 when it is None."""
        return self.num_generations // 2 if self.num_shuffled is None else self.num_shuffled


@dataclass
class SFTConfig:
    """Supervised fine-tuning (``python -m vr1fast.sft``): Video-R1's cold start on COT-165k-schema records."""

    labels: Literal["completion", "videor1"] = "completion"  # completion: the loss covers the assistant target
    # only; videor1: Video-R1's labels (every token but the padding, system/user text and video pads included)
    loss_norm: Literal["example", "token"] = "example"  # example: the mean over the step's examples on the rank
    # of each one's mean NLL over its labelled tokens (Video-R1 at batch 1); token: the mean over all labelled tokens
    # of the step on the rank (HF's num_items_in_batch). Ranks are averaged; batching does not change the value


@dataclass
class EvalConfig:
    """Benchmark evaluation (``python -m vr1fast.eval``) and the held-out evaluation during training."""

    benchmarks: tuple[str, ...] = ()      # eval JSON files in Video-R1's eval schema; empty = the synthetic
    # held-out set
    output_dir: str = "runs/eval"         # per benchmark: <name>.jsonl (items, resumable) and <name>.summary.json
    sampling: Literal["greedy", "videor1"] = "videor1"  # videor1: eval.temperature, eval.top_p, no top-k (Video-R1)
    temperature: float = 0.1              # sampling=videor1's temperature
    top_p: float = 0.001                  # sampling=videor1's nucleus mass
    max_new_tokens: int = 1024            # Video-R1's eval cap
    batch_size: int = 8                   # prompts per generate call on each rank
    shuffled: bool = False                # also answer every video item on shuffled frames: ordered accuracy,
    # shuffled accuracy and their gap per benchmark
    rules: Literal["videor1_eval", "train"] = "videor1_eval"  # OCR / free-form: 0 (Video-R1's eval) or training's
    # WER / ROUGE rewards
    resume: bool = True                   # continue an existing <name>.jsonl (the summary scores every item)
    real_fps: bool = True                 # M-RoPE time 2 / sampled fps (Video-R1's eval); false: data's spg
    every: int = 0                        # training: held-out eval/accuracy, ordered, shuffled, gap every N steps
    final: bool = False                   # training: at the end, the start model and last checkpoint side by side
    heldout_size: int = 16                # records of the synthetic held-out set (<data.synthetic_dir>-heldout)
    heldout_seed: int = 1000              # its seed; must differ from data.synthetic_seed (other records)


@dataclass
class RewardConfig:
    """T-GRPO rewards: accuracy (+temporal bonus) + format + length."""

    reward_funcs: tuple[str, ...] = ("accuracy", "format")  # accuracy, format, or "module:function" of your own
    # with the signature of vr1fast.rl.rewards.accuracy_reward
    correct_threshold: float = 0.1        # accuracy > this counts as correct (temporal and length rules)
    temporal: bool = True                 # T-GRPO's temporal bonus on video prompts
    temporal_rule: Literal["code", "strict", "diff", "advantage"] = "code"  # how the temporal bonus compares p, p~:
    # code: p >= mu * p~ -> +alpha (Video-R1's code); strict: p > p~ (paper, mu = 1.0); diff: +alpha*(p - p~) if p > p~.
    # These add it to the reward, where the group normalisation cancels it for 0/1 accuracy and equal other parts
    # (Video-R1 #51); advantage: if p > p~, +alpha on each correct completion's advantage after the normalisation
    temporal_mu: float = 0.8              # mu of the "code" rule
    temporal_alpha: float = 0.3           # alpha, the temporal bonus (rule advantage: in advantage units)
    len_control: bool = True              # the length bonus
    len_bonus: float = 0.2                # omega
    len_min: int = 320                    # a correct completion of len_min..len_max tokens gets the length bonus
    len_max: int = 512                    # inclusive, like len_min
    len_min_correct: int = 2              # the bonus needs at least this many correct completions in the group
    adv_eps: float = 1e-4                 # advantage = (r - mean) / (std + adv_eps) per group


@dataclass
class LossConfig:
    """Keyword arguments of ``kernels.grpo_loss`` / ``linear_grpo_loss`` (TRL names)."""

    beta: float = 0.04                    # KL coefficient (k3 to the frozen reference); 0 = no reference
    loss_type: Literal["grpo", "bnpo", "dr_grpo", "dapo"] = "grpo"  # token-loss normalisation, as TRL's
    epsilon_low: float = 0.2              # the ratio is clipped to [1 - epsilon_low, 1 + epsilon_high]
    epsilon_high: float = 0.2             # DAPO raises it above epsilon_low
    delta: Optional[float] = None         # two-sided clip of the ratio (TRL's delta), None = off
    num_iterations: int = 1               # mu: optimizer updates per rollout (TRL's num_iterations, verl's
    # ppo_epochs). 1 = Video-R1 (on-policy, ratio 1); > 1: the old policy's log-probs are computed once after the
    # rollout (a no-grad policy forward), then mu updates over the same completions, each clipped to
    # [1 - epsilon_low, 1 + epsilon_high]. One train step = one rollout = mu optimizer updates (the LR schedule
    # counts updates)
    importance_sampling_level: Literal["token", "sequence"] = "token"  # sequence: GSPO's ratio
    kl_clamp: Optional[float] = 10.0      # clamp of (ref - logp) inside k3; None = no clamp
    impl: Literal["auto", "reference", "triton"] = "auto"  # auto: $VR1FAST_IMPL, else Triton on CUDA, else reference
    head: Literal["chunked", "fused"] = "chunked"  # Triton LM head design (kernels.linear_*): "chunked" = cuBLAS
    # logits per chunk of rows + the Triton loss / log-prob kernels writing the logit gradient in place + cuBLAS
    # dX, dW (6NHV); "fused" = the split-vocab Triton GEMM kernels that never hold a logits chunk (8NHV,
    # recompute). Chunked is the default until a GPU measurement decides (benchmarks/).

    def kernel_kwargs(self) -> dict[str, Any]:
        return dict(beta=self.beta, loss_type=self.loss_type, epsilon_low=self.epsilon_low,
                    epsilon_high=self.epsilon_high, delta=self.delta,
                    importance_sampling_level=self.importance_sampling_level, kl_clamp=self.kl_clamp)


@dataclass
class OptimConfig:
    """AdamW and its learning-rate schedule."""

    lr: float = 1e-6                      # peak learning rate
    weight_decay: float = 0.01            # AdamW (decoupled) weight decay
    betas: tuple[float, float] = (0.9, 0.999)  # AdamW betas
    eps: float = 1e-8                     # AdamW eps
    scheduler: Literal["cosine", "linear", "constant"] = "cosine"  # after the warmup: decay to 0 by the end
    warmup_steps: int = 0                 # linear warmup from 0
    max_grad_norm: float = 5.0            # clip of the global gradient norm


@dataclass
class TrainConfig:
    """Steps, batch, precision, output and checkpoints."""

    max_steps: int = 0                    # 0 = one epoch over the data
    prompts_per_rank: int = 1             # Video-R1 runs 1
    grad_accum: int = 1                   # micro-batches per optimizer step
    seed: int = 42                        # seeds the sampling, shuffles and data order
    output_dir: str = "runs/vr1fast"      # checkpoints, config.yaml and metrics
    bf16: Optional[bool] = None           # the bf16 precision plan (precision.precision_plan): None = where CUDA
    # exists; true = on any device (CPU: bf16 autocast); false = fp32
    resume: str = "none"                  # none | auto | <checkpoint dir>
    save_every: int = 100                 # checkpoint every N steps (and at the end)
    save_total_limit: int = 0             # keep the newest N complete checkpoints (0 = all); never the resumed one
    log_every: int = 1                    # metric rows every N steps (and at the end)


@dataclass
class DistConfig:
    """How the ranks share the model: DDP, FSDP2 or DeepSpeed ZeRO."""

    strategy: Literal["auto", "ddp", "fsdp2", "deepspeed"] = "auto"  # auto: DDP if world > 1
    deepspeed_config: Optional[str] = None  # a Video-R1-style zero2.json / zero3.json
    zero_stage: int = 3                     # used when deepspeed_config is None
    backend: Literal["auto", "nccl", "gloo"] = "auto"  # auto: nccl on CUDA, else gloo


@dataclass
class MetricsConfig:
    """Where the step metrics go."""

    jsonl: bool = True                    # <output_dir>/metrics.jsonl
    tensorboard: bool = True              # <output_dir>/tensorboard
    wandb: bool = False                   # needs the wandb package
    wandb_project: str = "vr1fast"        # W&B project name
    plot: bool = True                     # <output_dir>/metrics.png at the end (needs jsonl)
    progress_bar: bool = True             # a progress bar on the terminal
    samples_every: int = 50               # <output_dir>/samples.jsonl every N steps: each completion's text,
    # rewards and advantage (what Video-R1's DEBUG_MODE printed); 0 = off


@dataclass
class Config:
    preset: str = "videor1"              # the preset this config starts from
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    video: VideoConfig = field(default_factory=VideoConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------- presets


def videor1() -> Config:
    """Video-R1's RL settings (7B, 16 frames at 128*28*28, G=8+4, 768 tokens, lr 1e-6 cosine)."""
    return Config(preset="videor1")


def eval_video(frames: int = 32) -> VideoConfig:
    """Video-R1's evaluation frame settings: 256*28*28 max pixels per frame, 16/32/64 frames."""
    return VideoConfig(max_frames=frames, max_pixels=256 * 28 * 28)


def demo() -> Config:
    """The embedded default: synthetic temporal video-QA, the tiny model, a short CPU run."""
    cfg = Config(preset="demo")
    cfg.video = VideoConfig(max_frames=8, min_pixels=8 * 28 * 28, max_pixels=8 * 28 * 28)
    cfg.rollout = RolloutConfig(num_generations=4, num_shuffled=2, max_new_tokens=96)
    cfg.reward = RewardConfig(len_min=40, len_max=64)  # the synthetic SFT targets are 38..72 tokens with the EOS
    cfg.optim = OptimConfig(lr=1e-4, warmup_steps=2)
    cfg.train = TrainConfig(max_steps=12, prompts_per_rank=2, output_dir="runs/demo", save_every=6)
    cfg.model = ModelConfig(gradient_checkpointing=False, warmstart_steps=300)
    cfg.metrics = MetricsConfig(samples_every=6)
    cfg.eval = EvalConfig(sampling="greedy", max_new_tokens=96, batch_size=16, final=True, heldout_size=8)
    return cfg


def videor1_sft() -> Config:
    """Video-R1's SFT cold start (sft_video.py): lr 1e-6 linear, wd 0, clip 5, one epoch, 1 example x 2 accum.
    Also: no warmup, bf16 where CUDA is, gradient checkpointing, a checkpoint every 1000 steps;
    ``--dist.strategy=deepspeed`` is ZeRO-2 as its zero2.json. ``python -m vr1fast.sft --preset=videor1_sft``."""
    cfg = Config(preset="videor1_sft", dist=DistConfig(zero_stage=2), metrics=MetricsConfig(samples_every=0))
    cfg.optim = OptimConfig(weight_decay=0.0, scheduler="linear")  # lr 1e-6, no warmup, clip 5: the defaults
    cfg.train = TrainConfig(prompts_per_rank=1, grad_accum=2, output_dir="runs/sft", save_every=1000)
    return cfg


def sft_demo() -> Config:
    """vr1fast.sft's default: videor1_sft on the synthetic set, tiny model, lr 3e-3, 40 steps of 4 (CPU).
    The video settings are the demo's."""
    cfg = dataclasses.replace(videor1_sft(), preset="sft_demo", video=demo().video, model=ModelConfig(
        gradient_checkpointing=False), train=TrainConfig(max_steps=40, prompts_per_rank=4, output_dir="runs/sft_demo"))
    cfg.optim.lr = 3e-3
    return cfg


def videor1_eval() -> Config:
    """Video-R1's benchmark eval (eval_bench.py): eval prompt, 32 (16/64) frames at 256*28*28, T 0.1, top-p 0.001."""
    cfg = Config(preset="videor1_eval")
    cfg.video = eval_video(32)
    cfg.data.eval_mode = True
    return cfg


PRESETS = {"demo": demo, "videor1": videor1, "videor1_sft": videor1_sft, "sft_demo": sft_demo,
           "videor1_eval": videor1_eval}


def validate(cfg: Config) -> None:
    """Cross-field checks a type cannot express; raises ConfigError naming the field."""
    checks = [
        (cfg.rollout.num_generations >= 2, "rollout.num_generations must be >= 2 (group std needs two samples)"),
        (cfg.rollout.shuffled_samples() >= 0, "rollout.num_shuffled must be >= 0"),
        (0.0 < cfg.rollout.top_p <= 1.0, "rollout.top_p must be in (0, 1]"),
        (cfg.rollout.temperature > 0, "rollout.temperature must be > 0"),
        (cfg.rollout.top_k >= 0, "rollout.top_k must be >= 0 (0 = off)"),
        (cfg.rollout.max_new_tokens >= 1, "rollout.max_new_tokens must be >= 1"),
        (0.0 < cfg.rollout.kv_cache_fraction <= 1.0, "rollout.kv_cache_fraction must be in (0, 1]"),
        (cfg.rollout.kv_page_size >= 1, "rollout.kv_page_size must be >= 1"),
        (cfg.metrics.samples_every >= 0, "metrics.samples_every must be >= 0 (0 = off)"),
        (cfg.video.min_frames >= 1 and cfg.video.max_frames >= cfg.video.min_frames,
         "video.max_frames must be >= video.min_frames >= 1"),
        (cfg.video.min_pixels <= cfg.video.max_pixels, "video.min_pixels must be <= video.max_pixels"),
        (cfg.video.fps > 0, "video.fps must be > 0"),
        (0 < cfg.data.frame_cache_gb < float("inf"), "data.frame_cache_gb must be a positive, finite size in GB"),
        (cfg.data.prefetch_workers >= 0, "data.prefetch_workers must be >= 0 (0 = off)"),
        (cfg.data.prefetch_depth >= 1, "data.prefetch_depth must be >= 1"),
        (cfg.loss.beta >= 0, "loss.beta must be >= 0"),
        (cfg.loss.num_iterations >= 1, "loss.num_iterations must be >= 1"),
        (not (cfg.model.share_prompt and cfg.model.attn_implementation == "eager"),
         "model.share_prompt=true needs attention sdpa or flash_attention_2, not model.attn_implementation=eager; "
         "set one of them differently"),
        (cfg.model.lora.rank >= 1 and cfg.model.lora.alpha > 0 and 0.0 <= cfg.model.lora.dropout < 1.0,
         "model.lora.rank must be >= 1, model.lora.alpha > 0, model.lora.dropout in [0, 1)"),
        (not (cfg.model.lora.enabled and cfg.model.lora.vision == "lora" and cfg.model.freeze_vision),
         "model.lora.vision=lora adapts the vision tower that model.freeze_vision=true freezes; set one of them "
         "differently"),
        (cfg.optim.lr > 0, "optim.lr must be > 0"),
        (cfg.optim.max_grad_norm > 0, "optim.max_grad_norm must be > 0"),
        (cfg.train.prompts_per_rank >= 1, "train.prompts_per_rank must be >= 1"),
        (cfg.train.grad_accum >= 1, "train.grad_accum must be >= 1"),
        (cfg.train.max_steps >= 0, "train.max_steps must be >= 0"),
        (cfg.train.save_every >= 1, "train.save_every must be >= 1"),
        (cfg.train.save_total_limit >= 0, "train.save_total_limit must be >= 0 (0 = keep all)"),
        (cfg.dist.zero_stage in (2, 3), "dist.zero_stage must be 2 or 3"),
        (cfg.reward.len_min <= cfg.reward.len_max, "reward.len_min must be <= reward.len_max"),
        (cfg.model.warmstart_steps >= 0, "model.warmstart_steps must be >= 0 (0 = off)"),
        (cfg.model.warmstart_steps == 0 or cfg.model.path is None,
         f"model.warmstart_steps={cfg.model.warmstart_steps} warm-starts the tiny model only; with model.path "
         f"pass --model.warmstart_steps=0"),
        (cfg.model.warmstart_lr > 0 and cfg.model.warmstart_batch_size >= 1,
         "model.warmstart_lr must be > 0 and model.warmstart_batch_size >= 1"),
        (min(cfg.eval.max_new_tokens, cfg.eval.batch_size, cfg.eval.heldout_size, cfg.eval.every + 1) >= 1,
         "eval.max_new_tokens, eval.batch_size and eval.heldout_size must be >= 1, eval.every >= 0"),
        (cfg.eval.temperature > 0 and 0.0 < cfg.eval.top_p <= 1.0, "eval.temperature must be > 0, top_p in (0, 1]"),
        (cfg.eval.heldout_seed != cfg.data.synthetic_seed, "eval.heldout_seed must differ from data.synthetic_seed"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
    from vr1fast.rl.rewards import BUILTIN_REWARDS, custom_reward
    unknown = [name for name in cfg.reward.reward_funcs if name not in BUILTIN_REWARDS and ":" not in name]
    if unknown:
        raise ConfigError(f"reward.reward_funcs: unknown reward function(s) {sorted(unknown)}")
    for name in cfg.reward.reward_funcs:
        if ":" in name:
            custom_reward(name)
