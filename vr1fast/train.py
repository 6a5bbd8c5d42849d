"""T-GRPO training: ``torchrun --nproc_per_node=N -m vr1fast.train [--config FILE] [--section.key=value ...]``.

With no argument it runs the embedded demo (synthetic temporal video-QA, the tiny Qwen2.5-VL, CPU is enough).
``main()`` builds, ``train()`` loops, ``train_step()`` is the one place where the stages meet:

    data.dataset   Sampler.take            → Sample     (per rank; the global stream position is checkpointed)
    data.video     load_media              → Frames     uint8 [T, H, W, 3] / [H, W, 3], resized
    data.shuffle   build_shuffle_pair      → PromptBatch ordered (B prompts) + shuffled (video prompts only)
    rollout        rollout                 → completions [B·G, L] ordered, [B_video·S, L] shuffled
    rl.advantages  score_batch             → rewards, temporal bonus, length bonus, advantages [B·G]
    model.forward  completion_rows + rl.loss.completion_logprobs → frozen-reference log-probs [N] (real tokens);
                   with loss.num_iterations > 1 the old policy's too
    model.forward  completion_rows + rl.loss.policy_loss → loss (inside the wrapped forward, see dist.Runner)
    optimizer step → the next rollout sees the new weights at once; metrics; checkpoint
    eval.heldout   every ``eval.every`` steps: held-out accuracy, shuffled accuracy, gap; at the end (``eval.final``,
                   the demo) the start model and the last checkpoint evaluated side by side

Deviations from Video-R1 (``grpo_trainer.py``), all keeping its numbers: several prompts per rank (each group is
scored on its own); the LM head runs on completion positions only, the vision tower once per prompt and, with
``model.share_prompt``, the decoder over each prompt once per group (``model.forward``, ``model.shared``); a broken
record or video is an error naming the file, or a counted skip with ``data.skip_bad`` (Video-R1 silently
substitutes a fixed sample); a non-finite loss stops the run before the update.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
import transformers

from vr1fast import ckpt, cli, dist, loop, optim
from vr1fast.cli import to_yaml
from vr1fast.config import Config
from vr1fast.data.dataset import Records, Sampler
from vr1fast.data.loader import check_prompt_lengths, run_records
from vr1fast.data.prefetch import PromptStream
from vr1fast.data.prompts import build_messages
from vr1fast.data.shuffle import build_shuffle_pair
from vr1fast.eval.benchmarks import Benchmark, configured_benchmarks
from vr1fast.eval.heldout import compare_models, heldout_metrics
from vr1fast.metrics import Metrics, StageTimer, sample_rows, step_metrics, to_host
from vr1fast.model.forward import completion_rows
from vr1fast.model.load import build_models, resolve_attn, text_hidden_size
from vr1fast.precision import Precision, precision_plan
from vr1fast.rl.advantages import score_batch
from vr1fast.rl.loss import completion_logprobs, policy_loss
from vr1fast.rollout import rollout
from vr1fast.warmstart import configured_warm_start


@dataclass
class Run:
    """Everything the step needs, built once by :func:`build`."""

    cfg: Config
    info: dist.DistInfo
    tokenizer: Any
    policy: dist.Wrapped
    ref: Optional[dist.Wrapped]
    records: Records
    sampler: Sampler
    prompts: PromptStream                            # prompts, media and their pairs (data.prefetch_* workers)
    metrics: Metrics
    total_steps: int
    last_checkpoint: Optional[Path] = None
    resumed_from: Optional[Path] = None              # never deleted by train.save_total_limit
    start_model: Optional[str] = None                # the folder training started from (None: the tiny model)
    heldout: Optional[list[Benchmark]] = None        # eval.every: what the policy is evaluated on


# ---------------------------------------------------------------- the step


def _autocast(run: Run, wrapped: Optional[dist.Wrapped] = None):
    """The precision plan's autocast for a forward of ``wrapped`` (default: the policy)."""
    return dist.autocast(wrapped or run.policy, run.info.device)


def _rollout(run: Run, pair, inputs: dict, seed: int):
    """Video-R1's two generate calls (``rollout.rollout``: G per prompt on the ordered batch, then the shuffled
    video prompts; none when ``reward.temporal`` is off) in one ``dist.rollout_call``: sharded weights are
    gathered once per micro-batch, on every rank alike, whether or not it holds a video prompt."""
    cfg = run.cfg.rollout if run.cfg.reward.temporal else dataclasses.replace(run.cfg.rollout, num_shuffled=0)
    shuffled = None if pair.shuffled is None else pair.shuffled.to(run.info.device).model_inputs()
    with torch.no_grad(), _autocast(run):
        return dist.rollout_call(run.policy, rollout, inputs, shuffled, cfg, seed=seed, video_rows=pair.video_rows,
                                 permutations=pair.permutations)


def _texts(run: Run, completions) -> list[str]:
    ids = completions.ids.tolist()
    return run.tokenizer.batch_decode([row[:n] for row, n in zip(ids, completions.lengths.tolist())],
                                      skip_special_tokens=True)


def _shuffled_texts(run: Run, pair, completions, num_prompts: int) -> Optional[list[Optional[list[str]]]]:
    """Per prompt: its shuffled completions' texts (video prompts) or None (images, temporal off)."""
    if completions is None:
        return None
    texts, s = _texts(run, completions), run.cfg.rollout.shuffled_samples()
    out: list[Optional[list[str]]] = [None] * num_prompts
    for j, row in enumerate(pair.video_rows):
        out[row] = texts[j * s:(j + 1) * s]
    return out


def _policy_loss(model, inputs, completion_ids, lengths: list[int], advantages, ref_logprobs, cfg: Config,
                 sampled_logprobs: Optional[torch.Tensor] = None, old_logprobs: Optional[torch.Tensor] = None):
    """Runs as the wrapped forward: the packed completion tokens' hidden states → GRPO loss (``rl.loss``).
    ``lengths`` is a host list (a wrapper may move a tensor argument to the device). With ``sampled_logprobs``
    (the rollout engine's, packed [N]) the metrics also hold the mean and max |Δ| against the policy's own
    log-probs of the same tokens (one more no-grad pass of the LM head over the same hidden states): what verl and
    TRL users watch to catch a rollout engine that drifts from the trainer."""
    rows = completion_rows(model, inputs, completion_ids, lengths, num_samples=cfg.rollout.num_generations,
                           share_prompt=cfg.model.share_prompt)
    loss, metrics = policy_loss(rows, advantages, ref_logprobs, cfg.loss, old_logprobs=old_logprobs,
                                temperature=cfg.rollout.temperature, max_completion_length=cfg.rollout.max_new_tokens)
    if sampled_logprobs is not None:
        diff = (completion_logprobs(rows, cfg.loss, temperature=cfg.rollout.temperature) - sampled_logprobs).abs()
        metrics = {**metrics, "rollout/logprob_diff_mean": diff.mean(), "rollout/logprob_diff_max": diff.max()}
    return loss, metrics


def _logprobs(model, inputs, completion_ids, lengths: list[int], cfg: Config):
    """Runs as the reference model's forward (or the old policy's, ``loss.num_iterations > 1``): no-grad
    log-probs [N] of the packed completion tokens (``rl.loss``), through the same head implementation and layout
    as the policy loss."""
    with torch.no_grad():
        rows = completion_rows(model, inputs, completion_ids, lengths, num_samples=cfg.rollout.num_generations,
                               share_prompt=cfg.model.share_prompt)
        return completion_logprobs(rows, cfg.loss, temperature=cfg.rollout.temperature)


def _step_seed(cfg: Config, rank: int, step: int, micro: int) -> int:
    """The seed of micro-batch ``micro`` of ``step`` on ``rank``: replacement draws, frame shuffles, the rollout."""
    return dist.step_seed(cfg.train.seed, step, rank, micro)


def _prepare(cfg: Config, tokenizer, samples, media, seed: int):
    """The processor stage: the prompts' messages → the ordered and shuffled ``PromptBatch`` pair (frame shuffles
    from ``seed``), prompt lengths checked. Runs in the step, or in a prefetch worker with its own tokenizer."""
    messages = [build_messages(s, cfg.data.eval_mode) for s in samples]
    pair = build_shuffle_pair(tokenizer, messages, media, torch.Generator().manual_seed(seed),
                              mode=cfg.data.frame_shuffle, allow_identity=cfg.data.shuffle_allow_identity,
                              second_per_grid_ts=cfg.data.second_per_grid_ts)
    check_prompt_lengths(pair.ordered.attention_mask.sum(1).tolist(), samples, cfg.rollout.max_prompt_length)
    return pair


def _micro_batch(run: Run, state: loop.State, micro: int, timer: StageTimer, last: bool,
                 logs: Optional[list]) -> tuple[dict, dict, "Update"]:
    """One micro-batch: prompts → rollout → rewards → reference (→ old policy) → policy loss and backward.
    Returns its host and device metric rows and its :class:`Update`; appends its ``samples.jsonl`` rows to
    ``logs`` (a list on sample steps, else None)."""
    cfg, device, G = run.cfg, run.info.device, run.cfg.rollout.num_generations
    seed = _step_seed(cfg, run.info.rank, state.step, micro)
    with timer("data"):  # with prefetch workers: waiting for the micro-batch they decoded and prepared
        samples, media, skipped, state.position, pair = run.prompts.next_prepared(state.position, state.step, micro)
    with timer("processor"):
        if pair is None:  # no prefetch workers
            pair = _prepare(cfg, run.tokenizer, samples, media, seed)
        inputs = pair.ordered.to(device).model_inputs()
    with timer("rollout"):
        completions = _rollout(run, pair, inputs, seed)
        ordered, shuffled = completions.ordered, completions.shuffled
    with timer("reward"):
        texts, shuffled_texts = _texts(run, ordered), _shuffled_texts(run, pair, shuffled, len(samples))
        rewards = score_batch(texts, ordered.lengths, [s.solution for s in samples],
                              [s.problem_type for s in samples], shuffled_texts, cfg.reward)
    ids, lengths = ordered.ids, ordered.lengths.tolist()  # on the host already (the rewards read them)
    with timer("ref"), _autocast(run, run.ref):  # the reference runs under the policy's autocast
        ref_lp = None if run.ref is None else run.ref.runner(_logprobs, inputs, ids, lengths, cfg)
    update = Update(inputs, ids, lengths, rewards.advantages.to(device), ref_lp)
    if cfg.loss.num_iterations > 1:
        with timer("old_policy"), _autocast(run):
            update.old_lp = run.policy.runner(_logprobs, inputs, ids, lengths, cfg)
    # On logged steps, the engine's sampling log-probs (packed like the loss's rows) are checked against the policy's.
    sampled_lp = ordered.logprobs[ordered.mask.bool()].to(device) \
        if timer.timed and ordered.logprobs is not None else None
    loss, loss_metrics = _update(run, update, timer, last, sampled_lp)
    if logs is not None:
        logs.extend(sample_rows(samples, texts, shuffled_texts, rewards, run.info.rank))
    return ({**rewards.metrics(), "skipped_media": skipped},
            {"loss": loss.detach(), **loss_metrics,
             "tokens": ordered.lengths.sum() + int(pair.ordered.attention_mask.sum()) * G}, update)


@dataclass
class Update:
    """What one micro-batch's policy update needs, kept for the later updates of ``loss.num_iterations``."""

    inputs: dict
    ids: torch.Tensor
    lengths: list[int]
    advantages: torch.Tensor
    ref_lp: Optional[torch.Tensor]
    old_lp: Optional[torch.Tensor] = None


def _update(run: Run, update: Update, timer: StageTimer, last: bool, sampled_lp: Optional[torch.Tensor] = None):
    """The policy loss of one micro-batch and its backward; returns (loss, detached loss metrics)."""
    with timer("policy_fwd_bwd"), dist.grad_sync(run.policy, last):
        with _autocast(run):
            loss, metrics = run.policy.runner(_policy_loss, update.inputs, update.ids, update.lengths,
                                              update.advantages, update.ref_lp, run.cfg, sampled_lp, update.old_lp)
        dist.backward(run.policy, loss / run.cfg.train.grad_accum, last)
    return loss, metrics


def _optimizer_step(run: Run, state: loop.State, timer: StageTimer, losses: list[torch.Tensor]):
    """Clip, check (loss and norm finite on every rank, one host sync) and apply one update; (grad norm, lr)."""
    with timer("optimizer"):
        grad_norm = dist.clip_grad_norm(run.policy, run.cfg.optim.max_grad_norm)
        checks = {"loss": torch.stack(losses)}
        loop.check_finite(run, state, checks if grad_norm is None else {**checks, "grad norm": grad_norm})
        lr = run.policy.scheduler.get_last_lr()[0]
        engine_norm = dist.optimizer_step(run.policy)
    return (engine_norm if engine_norm is not None else grad_norm), lr


def train_step(run: Run, state: loop.State, timed: bool = True) -> dict[str, float]:
    """One rollout over ``train.grad_accum`` micro-batches of ``train.prompts_per_rank`` prompts, then
    ``loss.num_iterations`` optimizer updates over its completions (1: Video-R1's; with more, the loss metrics are
    their mean, ``grad_norm`` the last update's, the learning rate the first's). Loss and gradient norm are checked
    once per update, after the last backward (one host sync). ``timed`` (a logged step): stages timed with a CUDA
    sync at each edge (``metrics.StageTimer``), ``time/*`` / ``tokens_per_s`` in the metrics; otherwise no sync
    and no time keys (house rule 6). On ``metrics.samples_every`` steps rank 0 writes ``samples.jsonl``."""
    cfg, timer = run.cfg, StageTimer(run.info.device, timed)
    logs = [] if run.metrics.sample_step(state.step + 1) else None
    rows, device_rows, updates = [], [], []
    last = cfg.train.grad_accum - 1
    for micro in range(cfg.train.grad_accum):
        row, device_row, update = _micro_batch(run, state, micro, timer, micro == last, logs)
        rows.append(row)
        device_rows.append(device_row)
        updates.append(update)
    grad_norm, lr = _optimizer_step(run, state, timer, [r["loss"] for r in device_rows])
    for k in range(1, cfg.loss.num_iterations):
        for micro, (update, device_row) in enumerate(zip(updates, device_rows)):
            loss, metrics = _update(run, update, timer, micro == last)
            for key, value in {"loss": loss.detach(), **metrics}.items():  # running mean over the updates
                device_row[key] = device_row[key] + (value - device_row[key]) / (k + 1)
        grad_norm, _ = _optimizer_step(run, state, timer, [r["loss"] for r in device_rows])
    state.step += 1
    if logs is not None:
        run.metrics.log_samples(state.step, dist.gather_to_main(logs))
    return step_metrics(to_host(rows, device_rows), timer.seconds, grad_norm, lr)


# ---------------------------------------------------------------- the loop


def _heldout(run: Run, state: loop.State) -> Optional[dict[str, float]]:
    """Every ``eval.every`` steps: the policy's held-out accuracy, shuffled accuracy and gap (``eval.heldout``)."""
    if run.heldout is None or state.step % run.cfg.eval.every:
        return None
    return heldout_metrics(run.policy, run.tokenizer, run.heldout, run.cfg, run.info)


def train(run: Run, state: loop.State) -> loop.State:
    """Steps until ``run.total_steps`` (``loop.run_steps``: checkpoints every ``train.save_every`` steps and at the
    end, an early return after a SIGTERM save), the held-out eval every ``eval.every`` steps; the prefetching
    workers stop on return and on an exception."""
    with run.prompts:
        return loop.run_steps(run, state, train_step, _heldout)


# ---------------------------------------------------------------- building


def _models(cfg: Config, precision: Precision, attn: str, resume: Optional[Path]):
    """(policy, reference or None, tokenizer, the starting model's folder) in the precision plan's ``master`` dtype
    (or an explicit ``model.dtype``); the demo's warm start is made by rank 0 and reused by the others."""
    warm = dist.once(lambda: configured_warm_start(cfg))
    if warm is not None:
        s = warm.stats
        dist.print0(f"warm start: {'reused' if warm.reused else 'trained'} {warm.path} ({s['steps']} steps on "
                    f"{s['examples']} SFT records, loss {s['loss_first']:.2f} → {s['loss_last']:.2f}, "
                    f"{s['seconds']:.0f} s)")
    master = str(precision.master).removeprefix("torch.") if cfg.model.dtype == "auto" else cfg.model.dtype
    return (*build_models(cfg.model, beta=cfg.loss.beta, dtype=master, attn=attn,
                          init=resume / "model" if resume else None, warm=warm and warm.path),
            str(warm.path) if warm else cfg.model.path)


def build(cfg: Config, models: Optional[tuple] = None) -> tuple[Run, loop.State]:
    """Process group, data, models, wrapping, optimizer, resume and metrics for ``cfg``. ``models`` =
    (policy, reference or None, tokenizer) replaces the configured ones (benchmarks build 7B-shaped models)."""
    info = dist.init(cfg.dist)
    dist.seed_everything(cfg.train.seed, info.rank)
    records = run_records(cfg.data, once=dist.once)
    steps_per_epoch = math.ceil(len(records) / (cfg.train.prompts_per_rank * info.world_size
                                                * cfg.train.grad_accum))
    total = cfg.train.max_steps or steps_per_epoch
    resume = ckpt.resolve(cfg.train.resume, cfg.train.output_dir, info)  # rank 0 verifies, all get its verdict
    bf16 = info.device.type == "cuda" if cfg.train.bf16 is None else cfg.train.bf16
    precision = precision_plan(info.strategy, bf16)
    plan = dist.prepare(cfg, info, precision, {r.data_type for r in records}, text_hidden_size(cfg.model))
    attn = resolve_attn(cfg.model.attn_implementation, info.device)  # FA2 on a GPU with flash-attn, else SDPA
    policy_model, ref_model, tokenizer, start = (*models, cfg.model.path) if models else \
        _models(cfg, precision, attn, resume)
    resolved = {"precision": precision.describe(), "attention": policy_model.config._attn_implementation}
    dist.print0(f"vr1fast: {resolved['precision']}; attention {resolved['attention']}")
    policy = dist.wrap_policy(
        policy_model, info, cfg.dist, precision=precision, plan=plan,
        make_optimizer=optim.optimizer_factory(cfg.optim),
        make_scheduler=optim.scheduler_factory(cfg.optim, total * cfg.loss.num_iterations))
    ref = None if ref_model is None else dist.wrap_reference(ref_model, info, precision=precision, plan=plan)
    state = loop.restore(resume, policy, info)
    metrics = Metrics(cfg.metrics, cfg.train.output_dir, total_steps=total, start_step=state.step,
                      enabled=info.is_main, run_config={**cfg.to_dict(), "resolved": resolved})
    if info.is_main:
        Path(cfg.train.output_dir, "config.yaml").write_text(to_yaml(cfg))
    sampler = Sampler(len(records), cfg.train.seed, cfg.data.shuffle)
    prompts = PromptStream(records, sampler, cfg, rank=info.rank, world_size=info.world_size,
                           prepare=functools.partial(_prepare, cfg), tokenizer=tokenizer,
                           seed_of=functools.partial(_step_seed, cfg, info.rank))
    run = Run(cfg, info, tokenizer, policy, ref, records, sampler, prompts, metrics, total, resume, resume, start,
              configured_benchmarks(cfg, dist.once) if cfg.eval.every else None)
    return run, state


def close(run: Run) -> Optional[Path]:
    """Close the metric sinks (writes the plot on rank 0) and tear the process group down."""
    plot = run.metrics.close()
    dist.close(run.info, run.policy, run.ref)
    return plot


def run(cfg: Config) -> int:
    """Build, train, close; 143 when stopped by SIGTERM (after saving), else 0."""
    started = time.perf_counter()
    transformers.utils.logging.disable_progress_bar()  # "Writing model shards" at every checkpoint
    run, state = build(cfg)
    dist.print0(f"vr1fast: preset {cfg.preset}, {run.info.strategy} on {run.info.world_size} × "
                f"{run.info.device.type}, {len(run.records)} records, steps {state.step + 1}..{run.total_steps}, "
                f"output {cfg.train.output_dir}")
    train(run, state)
    final = cfg.eval.final and state.step == run.total_steps  # the start model and the last checkpoint compared
    table = compare_models(cfg, {"start": run.start_model, "last": run.last_checkpoint}, run.info,
                           Path(cfg.train.output_dir, "eval")) if final else ""
    code = loop.finish(run, state, "vr1fast.train", "steps", started, close(run))
    if table and run.info.is_main:
        print(table, flush=True)
    return code


def main(argv: Optional[list[str]] = None) -> None:
    """``python -m vr1fast.train [ARGS]``: expected failures print one line naming the cause and exit non-zero
    (``cli.run_main``); ``--help`` lists every key."""
    cli.run_main(run, argv, "vr1fast.train")


if __name__ == "__main__":
    main()
