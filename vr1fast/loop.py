"""The step loop the two trainers share (T-GRPO's ``vr1fast.train``, SFT's ``vr1fast.sft``).

A ``run`` here is either trainer's ``Run`` (``cfg``, ``info``, ``policy``, ``tokenizer``, ``metrics``,
``total_steps``, ``last_checkpoint``, ``resumed_from``) and a ``state`` a :class:`State` (``step``, ``position``): the
checkpoint cadence (every ``train.save_every`` steps and at the end), SIGTERM (save at the next step boundary,
return early), the finite check before an update, and the run's last lines are written once, here.
"""
from __future__ import annotations

import dataclasses
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from vr1fast import ckpt, dist
from vr1fast.cli import to_yaml
from vr1fast.data.dataset import Position
from vr1fast.errors import NonFiniteLossError


@dataclass
class State:
    """What a trainer's checkpoint restores besides the weights and the optimizer."""

    step: int = 0                                    # optimizer steps done
    position: Position = field(default_factory=Position)  # of the global sample stream


def restore(resume: Optional[Path], policy: dist.Wrapped, info: dist.DistInfo) -> State:
    """``ckpt.load`` of checkpoint ``resume`` into ``policy`` (weights, optimizer, schedule, RNG) and its
    :class:`State`; a fresh State when ``resume`` is None."""
    if resume is None:
        return State()
    saved = ckpt.load(resume, policy, info=info)
    return State(saved["step"], Position(**saved["data"]))


def save_checkpoint(run: Any, state: Any) -> Path:
    """``ckpt.save`` of the policy with the data position and the resolved config, then ``train.save_total_limit``
    pruning (never the checkpoint the run resumed from)."""
    root = ckpt.checkpoint_root(run.cfg.train.output_dir)
    run.last_checkpoint = ckpt.save(
        root, state.step, run.policy, info=run.info, processor=run.tokenizer, source_dir=run.cfg.model.path,
        state={"data": dataclasses.asdict(state.position)}, config_text=to_yaml(run.cfg))
    ckpt.prune(root, run.cfg.train.save_total_limit, protect=run.resumed_from, info=run.info)
    return run.last_checkpoint


def run_steps(run: Any, state: Any, step: Callable[..., dict[str, float]],
              extra: Optional[Callable[[Any, Any], Optional[dict[str, float]]]] = None) -> Any:
    """``step(run, state, timed=logged)`` until ``run.total_steps``; metrics on logged steps (``train.log_every``
    and the last) and on steps where ``extra(run, state)`` (after the step) returns metrics (the held-out eval);
    checkpoints every ``train.save_every`` steps and at the end. On SIGTERM (any rank) it saves at the next step
    boundary and returns early (``state.step < run.total_steps``)."""
    cfg = run.cfg.train
    with ckpt.StopSignal() as stop:
        while state.step < run.total_steps:
            logged = (state.step + 1) % cfg.log_every == 0 or state.step + 1 == run.total_steps
            metrics = step(run, state, timed=logged)
            more = extra(run, state) if extra is not None else None
            if more:
                metrics.update(more)
            if logged or more:
                run.metrics.log(state.step, metrics)
            stopping = stop.requested()
            if stopping or state.step % cfg.save_every == 0 or state.step == run.total_steps:
                save_checkpoint(run, state)
            if stopping:
                break
    return state


def check_finite(run: Any, state: Any, values: dict[str, torch.Tensor], collective: bool = True) -> None:
    """One host sync (and, ``collective``, one all-reduce): every rank stops before the update if any value is
    NaN/inf on any rank, naming it, the step and the last checkpoint."""
    names = list(values)
    finite = torch.stack([torch.isfinite(values[n]).all() for n in names]).tolist()
    bad = not all(finite)
    if dist.any_rank(bad) if collective else bad:
        name = next((n for n, ok in zip(names, finite) if not ok), names[0])
        raise NonFiniteLossError(f"non-finite {name} ({values[name].tolist()} on rank {run.info.rank}) at step "
                                 f"{state.step + 1}: stopping before the update; last checkpoint: "
                                 f"{run.last_checkpoint or 'none written yet'}")


def finish(run: Any, state: Any, prog: str, what: str, started: float, plot: Optional[Path]) -> int:
    """The run's last line on rank 0: after a SIGTERM the checkpoint and how to continue (returns 143), else
    ``done: N <what> in S s`` with the metrics, plot and checkpoint (returns 0)."""
    if state.step < run.total_steps:
        if run.info.is_main:
            print(f"{prog}: SIGTERM: stopped after step {state.step}, checkpoint {run.last_checkpoint}; "
                  f"continue with --train.resume=auto", file=sys.stderr, flush=True)
        return 143
    if run.info.is_main:
        print(f"done: {run.total_steps} {what} in {time.perf_counter() - started:.0f} s; metrics "
              f"{run.metrics.jsonl_path}, plot {plot}, checkpoint {run.last_checkpoint}", flush=True)
    return 0
