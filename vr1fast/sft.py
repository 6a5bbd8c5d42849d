"""Supervised fine-tuning, Video-R1's SFT cold start: ``torchrun --nproc_per_node=N -m vr1fast.sft [--preset
videor1_sft] [--config FILE] [--section.key=value ...]``. With no argument it runs the ``sft_demo`` preset (the
tiny model on the synthetic set's SFT records, CPU is enough).

Records are COT-165k-schema (``data.path``: the RL fields plus ``process``; unset = the synthetic ``sft.json``).
Each example is Video-R1's conversation (``data.prompts.build_sft_messages``: system "You are a helpful
assistant", the user turn with the media first, the assistant target ``process + "\\n" + solution``) rendered by
the chat template whole, as ``sft_video.py`` does, with each media pad expanded (``data.processor``). Labels
(``sft.labels``):

* ``completion`` (default): the assistant target and its ``<|im_end|>`` only; every prompt token, the ``"\\n"``
  after ``<|im_end|>`` and the padding are -100;
* ``videor1``: Video-R1's labels: every token except the padding, ``pad_token_id`` and ``<|image_pad|>``; the
  system and user text, ``<|vision_start|>``, ``<|vision_end|>`` and the ``<|video_pad|>`` tokens stay in the loss
  (its masking branch tests ``isinstance(processor, Qwen2VLProcessor)``, false for Qwen2.5-VL). A row's first
  token is -100 too: it is never predicted at batch 1 (HF's shift), and in a left-padded batch only a pad
  position precedes it.

Loss: position t predicts label t+1 (HF's shift). Only the hidden states of positions whose next label is kept go
through the LM head, through the repo's head kernels (``kernels.linear_logprobs``: no [N, V] logits for the
batch; ``loss.impl`` / ``loss.head`` pick the implementation): NLL = -log p(label). ``sft.loss_norm``:
``example`` (default) = each example's mean NLL over its labelled tokens (HF's causal-LM loss of that example
alone), averaged over the step's ``train.prompts_per_rank x train.grad_accum`` examples: at Video-R1's batch 1 x 2
accumulation steps HF Trainer averages the two micro-batch means, as long as the loss is not normalised by
``num_items_in_batch`` (not checked against Video-R1's transformers build); ``token`` = the mean over all
labelled tokens of the step (that normalisation). Both are computed as per-token weights known before the first forward
(every micro-batch of a step is collated first), so a step's value does not depend on how its examples are split
into micro-batches, and no micro-batch loss is divided by ``grad_accum`` again. The ranks' gradients are averaged
(DDP / FSDP2 / DeepSpeed), so the step's objective is the mean of the ranks' losses.

Precision is training's plan (``precision.precision_plan``): DeepSpeed (Video-R1 used ZeRO-2) and FSDP2 compute in
bf16, ``none`` / DDP under bf16 autocast over fp32 weights. The head on labelled positions only gives the values of
Video-R1's full logits (``tests/test_sft.py``: HF's cross-entropy to 1e-10 in float64).

Deviations from Video-R1 (``sft_video.py``, TRL ``SFTTrainer``): batches of several examples (its collator keeps
one example's media); prompt tokens out of the loss by default (``sft.labels=videor1`` restores its labels); the
data order is vr1fast's seeded sampler (``data.dataset.Sampler``), and the last step of an epoch is filled from
the next epoch's order; a broken record or video is an error naming it (or a counted skip, ``data.skip_bad``).
"""
from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
import transformers

from vr1fast import ckpt, cli, dist, kernels, loop, optim
from vr1fast.cli import to_yaml
from vr1fast.config import Config, DataConfig, LossConfig
from vr1fast.data.dataset import Records, Sample, Sampler, load_records
from vr1fast.data.loader import synthetic_set
from vr1fast.data.prefetch import PromptStream
from vr1fast.data.processor import build_prompt_batch
from vr1fast.data.prompts import build_sft_messages
from vr1fast.errors import ConfigError
from vr1fast.metrics import Metrics, StageTimer
from vr1fast.model.load import build_models, resolve_attn, text_hidden_size
from vr1fast.model.qwen import IMAGE_PAD, TEXT
from vr1fast.model.tokenizer import token_ids
from vr1fast.precision import precision_plan

IGNORE = -100  # label of a position outside the loss
PLOT_PANELS = (  # metrics.png of an SFT run
    ("loss (mean NLL of the labelled tokens)", ("loss",)),
    ("learning rate", ("learning_rate",)),
    ("gradient norm (before clipping)", ("grad_norm",)),
    ("labelled tokens per step", ("labelled_tokens",)),
)


@dataclass
class Run:
    """Everything the step needs, built once by :func:`build`."""

    cfg: Config
    info: dist.DistInfo                              # backend None: no collective runs (one process)
    tokenizer: Any
    policy: dist.Wrapped
    records: Records
    sampler: Sampler
    prompts: PromptStream                            # the sampler's examples and media (data.prefetch_* workers)
    metrics: Metrics
    total_steps: int
    last_checkpoint: Optional[Path] = None
    resumed_from: Optional[Path] = None              # never deleted by train.save_total_limit


# ---------------------------------------------------------------- examples and labels


def sft_records(cfg: DataConfig, once=lambda make: make()) -> Records:
    """The SFT records: ``cfg.path`` or the synthetic set's ``sft.json`` (made through ``once``); each needs
    ``process``."""
    path = cfg.path if cfg.path is not None else once(lambda: synthetic_set(cfg)).sft_json
    return load_records(path, cfg, require_process=True)


def _tail(tokenizer, sample: Sample) -> tuple[list[int], int]:
    """The conversation's tokens after the generation prompt (the chat template's rendering of the assistant turn)
    and how many of them are the target up to and including ``<|im_end|>``."""
    messages = build_sft_messages(sample)
    whole = tokenizer.apply_chat_template(messages, tokenize=False)
    prompt = tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
    if not whole.startswith(prompt):
        raise ConfigError("the tokenizer's chat template does not render a conversation as its generation prompt "
                          "followed by the assistant turn; vr1fast.sft needs that (Qwen2.5-VL's template does)")
    tail = tokenizer(whole[len(prompt):], add_special_tokens=False)["input_ids"]
    eos = token_ids(tokenizer).eos
    if eos not in tail:
        raise ConfigError(f"the chat template ends the assistant turn without <|im_end|> (id {eos})")
    return tail, tail.index(eos) + 1


def sft_batch(tokenizer, samples: list[Sample], media: list, *, labels: str = "completion",
              second_per_grid_ts: float = 1.0) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """(model inputs, labels [B, T]) of B conversations, left-padded to the longest (``sft.labels``: see the
    module docstring). Row b = the chat template's rendering of ``build_sft_messages(samples[b])``."""
    prompts = build_prompt_batch(tokenizer, [build_sft_messages(s)[:-1] for s in samples], media,
                                 second_per_grid_ts=second_per_grid_ts)
    tails = [_tail(tokenizer, s) for s in samples]
    keep = prompts.attention_mask.bool()
    rows = [prompts.input_ids[b, keep[b]].tolist() + tail for b, (tail, _) in enumerate(tails)]
    width, pad = max(len(r) for r in rows), tokenizer.pad_token_id
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask, types, target = torch.zeros_like(ids), torch.full_like(ids, TEXT), torch.full_like(ids, IGNORE)
    for b, (row, (tail, n_target)) in enumerate(zip(rows, tails)):
        start, n_prompt = width - len(row), len(row) - len(tail)
        ids[b, start:], mask[b, start:] = torch.tensor(row), 1
        types[b, start:start + n_prompt] = prompts.mm_token_type_ids[b, keep[b]]
        target[b, start + n_prompt:start + n_prompt + n_target] = torch.tensor(tail[:n_target])
    if labels == "videor1":  # a row's first token has nothing before it to predict it from (not the pad before)
        first = (mask.cumsum(1) == 1) & (mask == 1)
        dropped = (mask == 0) | first | (ids == pad) | (ids == tokenizer.convert_tokens_to_ids(IMAGE_PAD))
        target = ids.masked_fill(dropped, IGNORE)
    batch = dataclasses.replace(prompts, input_ids=ids, attention_mask=mask, mm_token_type_ids=types)
    return batch.model_inputs(), target


def token_weights(labels: list[torch.Tensor], norm: str) -> list[torch.Tensor]:
    """Per micro-batch, the weight of each loss token (row-major order of ``labels[:, 1:] != IGNORE``) so that
    their weighted NLL summed over the step is ``sft.loss_norm``'s mean: 1 / (n_e · E) for a token of example e
    with n_e labelled tokens among the step's E examples (``example``), 1 / N for all N tokens (``token``)."""
    counts = [(lab[:, 1:] != IGNORE).sum(1) for lab in labels]
    if any(bool((c == 0).any()) for c in counts):
        raise ConfigError("an SFT example has no labelled token (an empty assistant target?)")
    examples, tokens = sum(len(c) for c in counts), int(sum(c.sum() for c in counts))
    if norm == "token":
        return [torch.full((int(c.sum()),), 1.0 / tokens, dtype=torch.float64) for c in counts]
    return [(1.0 / (c.double() * examples)).repeat_interleave(c) for c in counts]


def sft_loss(model, inputs: dict[str, torch.Tensor], labels: torch.Tensor, weights: torch.Tensor,
             cfg: LossConfig) -> torch.Tensor:
    """Runs as the wrapped forward: Σ weights · (−log p(label)) over the labelled positions, the head applied to
    those positions' final hidden states only (``loss.impl`` / ``loss.head``'s ``linear_logprobs``)."""
    hidden = model.model(**inputs, use_cache=False).last_hidden_state       # [B, T, H]
    keep = labels[:, 1:] != IGNORE
    rows, index = hidden[:, :-1][keep], labels[:, 1:][keep]                  # [N, H], [N]
    head = kernels.implementation("linear_logprobs", None if cfg.impl == "auto" else cfg.impl, rows.device.type,
                                  head=cfg.head)
    logp = head(rows, model.lm_head.weight, index)                           # fp32 (fp64 for fp64 inputs)
    return -(logp * weights.to(logp.dtype)).sum()


# ---------------------------------------------------------------- the step


def _collective(run: Run) -> bool:
    return run.info.backend is not None


def _micro_batches(run: Run, state: loop.State, timer: StageTimer) -> tuple[list, int]:
    """The step's ``train.grad_accum`` collated micro-batches of ``train.prompts_per_rank`` examples each, and
    the broken media files skipped (``data.skip_bad``); advances ``state.position``."""
    cfg, batches, skipped = run.cfg, [], 0
    for micro in range(cfg.train.grad_accum):
        with timer("data"):
            samples, media, bad, state.position = run.prompts.next_prompts(
                state.position, dist.step_seed(cfg.train.seed, state.step, run.info.rank, micro))
        with timer("processor"):
            batches.append(sft_batch(run.tokenizer, samples, media, labels=cfg.sft.labels,
                                     second_per_grid_ts=cfg.data.second_per_grid_ts))
        skipped += bad
    return batches, skipped


def sft_step(run: Run, state: loop.State, timed: bool = True) -> dict[str, float]:
    """One optimizer step over ``train.grad_accum`` micro-batches; returns the step's metrics (``loss``: the
    ``sft.loss_norm`` mean, ``labelled_tokens``, ``tokens`` (sequence tokens), ``grad_norm``, ``learning_rate``,
    ``skipped_media``; ``time/*`` and ``tokens_per_s`` on timed steps), averaged over ranks (counts summed)."""
    cfg, timer, device = run.cfg, StageTimer(run.info.device, timed), run.info.device
    batches, skipped = _micro_batches(run, state, timer)
    weights = token_weights([labels for _, labels in batches], cfg.sft.loss_norm)
    losses, last = [], len(batches) - 1
    for micro, ((inputs, labels), w) in enumerate(zip(batches, weights)):
        with timer("fwd_bwd"), dist.grad_sync(run.policy, micro == last):
            with dist.autocast(run.policy, device):
                loss = run.policy.runner(sft_loss, {k: v.to(device) for k, v in inputs.items()}, labels.to(device),
                                         w.to(device), cfg.loss)
            dist.backward(run.policy, loss, micro == last)
        losses.append(loss.detach())
    with timer("optimizer"):
        grad_norm = dist.clip_grad_norm(run.policy, cfg.optim.max_grad_norm)
        loss = torch.stack(losses).sum()
        loop.check_finite(run, state, {"loss": loss} if grad_norm is None else {"loss": loss, "grad norm": grad_norm},
                          collective=_collective(run))
        lr = run.policy.scheduler.get_last_lr()[0]
        engine_norm = dist.optimizer_step(run.policy)
    state.step += 1
    norm = engine_norm if engine_norm is not None else grad_norm
    out = {"loss": float(loss), "grad_norm": float("nan") if norm is None else float(norm), "learning_rate": lr,
           "labelled_tokens": float(sum(int((lab[:, 1:] != IGNORE).sum()) for _, lab in batches)),
           "tokens": float(sum(int(inputs["attention_mask"].sum()) for inputs, _ in batches)),
           "skipped_media": float(skipped)}
    if timer.seconds:
        total = sum(timer.seconds.values())
        out.update({f"time/{k}_s": v for k, v in timer.seconds.items()})
        out.update({"time/step_s": total, "tokens_per_s": out["tokens"] / max(total, 1e-9)})
    counts = ("labelled_tokens", "tokens", "skipped_media")
    return dist.reduce_metrics(out, counts) if _collective(run) else out


# ---------------------------------------------------------------- the loop


def train(run: Run, state: loop.State) -> loop.State:
    """Steps until ``run.total_steps`` (``loop.run_steps``: checkpoints every ``train.save_every`` steps and at the
    end, an early return after a SIGTERM save); the prefetching workers stop on return and on an exception."""
    with run.prompts:
        return loop.run_steps(run, state, sft_step)


# ---------------------------------------------------------------- building


def _info(cfg: Config, local: bool) -> dist.DistInfo:
    """The process group (``dist.init``), or with ``local`` this process alone on the CPU with no collective (the
    warm start runs on rank 0 only while the other ranks wait)."""
    return dist.DistInfo(0, 1, 0, torch.device("cpu"), None, "none") if local else dist.init(cfg.dist)


def build(cfg: Config, *, local: bool = False) -> tuple[Run, loop.State]:
    """Process group, records, the policy (``model.load.build_models`` with β = 0: no reference), wrapping,
    optimizer and schedule (``optim``), resume and metrics for ``cfg``. ``local``: one process, no collective, no
    resume and no metric sinks (:func:`vr1fast.warmstart.configured_warm_start`)."""
    if cfg.model.warmstart_steps:
        raise ConfigError(f"model.warmstart_steps={cfg.model.warmstart_steps} is the RL demo's warm start (a short "
                          f"run of vr1fast.sft itself); pass --model.warmstart_steps=0 or --preset=sft_demo")
    info = _info(cfg, local)
    dist.seed_everything(cfg.train.seed, info.rank)
    records = sft_records(cfg.data, once=(lambda make: make()) if local else dist.once)
    per_step = cfg.train.prompts_per_rank * info.world_size * cfg.train.grad_accum
    total = cfg.train.max_steps or math.ceil(len(records) / per_step)
    resume = None if local else ckpt.resolve(cfg.train.resume, cfg.train.output_dir, info)
    bf16 = info.device.type == "cuda" if cfg.train.bf16 is None else cfg.train.bf16
    precision = precision_plan(info.strategy, bf16)
    plan = dist.prepare(cfg, info, precision, {r.data_type for r in records}, text_hidden_size(cfg.model))
    master = str(precision.master).removeprefix("torch.") if cfg.model.dtype == "auto" else cfg.model.dtype
    model, _, tokenizer = build_models(cfg.model, beta=0.0, dtype=master, init=resume / "model" if resume else None,
                                       attn=resolve_attn(cfg.model.attn_implementation, info.device))
    policy = dist.wrap_policy(model, info, cfg.dist, precision=precision, plan=plan,
                              make_optimizer=optim.optimizer_factory(cfg.optim),
                              make_scheduler=optim.scheduler_factory(cfg.optim, total))
    state = loop.restore(resume, policy, info)
    resolved = {"precision": precision.describe("model"), "attention": model.config._attn_implementation}
    metrics = Metrics(cfg.metrics, cfg.train.output_dir, total_steps=total, start_step=state.step,
                      enabled=info.is_main and not local, run_config={**cfg.to_dict(), "resolved": resolved},
                      panels=PLOT_PANELS)
    if info.is_main and not local:
        dist.print0(f"vr1fast.sft: {resolved['precision']}; attention {resolved['attention']}")
        Path(cfg.train.output_dir, "config.yaml").write_text(to_yaml(cfg))
    sampler = Sampler(len(records), cfg.train.seed, cfg.data.shuffle)
    prompts = PromptStream(records, sampler, cfg, rank=info.rank, world_size=info.world_size)
    return Run(cfg, info, tokenizer, policy, records, sampler, prompts, metrics, total, resume, resume), state


def close(run: Run) -> Optional[Path]:
    """Close the metric sinks (the plot on rank 0) and tear the process group down (nothing to tear down for a
    ``local`` run)."""
    plot = run.metrics.close()
    if _collective(run):
        dist.close(run.info, run.policy)
    return plot


def run(cfg: Config) -> int:
    """Build, train, close; 143 when stopped by SIGTERM (after saving), else 0."""
    started = time.perf_counter()
    transformers.utils.logging.disable_progress_bar()
    run, state = build(cfg)
    dist.print0(f"vr1fast.sft: preset {cfg.preset}, {run.info.strategy} on {run.info.world_size} × "
                f"{run.info.device.type}, {len(run.records)} records, labels {cfg.sft.labels}, steps "
                f"{state.step + 1}..{run.total_steps}, output {cfg.train.output_dir}")
    train(run, state)
    return loop.finish(run, state, "vr1fast.sft", "SFT steps", started, close(run))


def main(argv: Optional[list[str]] = None) -> None:
    """``python -m vr1fast.sft [ARGS]``: the ``sft_demo`` preset unless ``--preset`` or the ``--config`` file names one;
    expected failures print one line naming the cause and exit non-zero (``cli.run_main``); ``--help`` lists
    every key."""
    cli.run_main(run, argv, "vr1fast.sft", default_preset="sft_demo")


if __name__ == "__main__":
    main()
