"""Step metrics → progress bar, JSONL, TensorBoard, optional W&B; a PNG plot at the end.

Metric names follow Video-R1's trainer (``reward``, ``reward_std``, ``rewards/accuracy_reward``,
``rewards/format_reward``, ``temporal_rewards``, ``completion_length``, ``kl``, ``all_wrong``, ``all_correct``) plus
``loss``, ``grad_norm``, ``learning_rate`` and, on steps timed by ``StageTimer`` (the logged ones),
``time/<stage>_s`` for each stage of the step, ``time/step_s`` and ``tokens_per_s``. One JSON object per line of
``<output_dir>/metrics.jsonl``: ``{"step": n, ...}``. Only rank 0 writes; other ranks get a logger whose methods do
nothing, so callers never branch on the rank.
"""
from __future__ import annotations

import contextlib
import json
import math
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Optional

import torch

from vr1fast import dist
from vr1fast.config import MetricsConfig
from vr1fast.errors import ConfigError

PLOT_PANELS = (
    ("reward parts", ("reward", "rewards/accuracy_reward", "rewards/format_reward")),
    ("temporal bonus: fired (0.5 = image), changed an advantage", ("temporal_rewards", "temporal_adv_changed")),
    ("completion length (tokens)", ("completion_length",)),
)


class StageTimer:
    """Wall seconds per stage of a step (``with timer("rollout"): ...``), on log steps only (house rule 6).

    ``timed=True``: CUDA is synchronised once before the first stage and at the end of every stage (the host
    syncs the per-stage split needs), and ``seconds`` holds each stage's total. ``timed=False`` (a step that is
    not logged): no sync, nothing is measured, ``seconds`` stays empty, so the step's metrics carry no time keys.
    """

    def __init__(self, device: torch.device, timed: bool = True):
        self.timed, self.cuda = timed, device.type == "cuda"
        self.seconds: dict[str, float] = defaultdict(float)

    def _sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    @contextlib.contextmanager
    def __call__(self, stage: str):
        if not self.timed:
            yield
            return
        if not self.seconds:
            self._sync()  # work queued before the first stage is not counted in it
        start = time.perf_counter()
        yield
        self._sync()
        self.seconds[stage] += time.perf_counter() - start


SUM_KEYS = ("skipped_media", "reward_exceptions")  # summed over ranks
MAX_KEYS = ("rollout/logprob_diff_max",)           # max over micro-batches and ranks; every other one is averaged


def to_host(rows: list[dict], device_rows: list[dict[str, torch.Tensor]]) -> list[dict]:
    """The micro-batches' device scalars (loss, its metrics, token counts) copied to the host in one go."""
    keys = list(device_rows[0])
    values = torch.stack([torch.stack([r[k].double() for k in keys]) for r in device_rows]).tolist()
    return [{**row, **dict(zip(keys, vals))} for row, vals in zip(rows, values)]


def step_metrics(rows: list[dict], seconds: dict[str, float], grad_norm, lr: float) -> dict[str, float]:
    """Mean over micro-batches (counts summed, maxima maxed), then the all-reduce over ranks."""
    def combine(k: str) -> float:
        values = [r[k] for r in rows]
        return max(values) if k in MAX_KEYS else sum(values) / (1 if k in SUM_KEYS else len(rows))
    out = {k: combine(k) for k in rows[0]}
    tokens = out.pop("tokens") * len(rows)
    if seconds:  # a timed (logged) step
        out.update({f"time/{k}_s": v for k, v in seconds.items()})
        total = sum(seconds.values())
        out.update({"time/step_s": total, "tokens_per_s": tokens / max(total, 1e-9)})
    out.update({"grad_norm": float("nan") if grad_norm is None else float(grad_norm), "learning_rate": lr})
    return dist.reduce_metrics(out, SUM_KEYS, MAX_KEYS)


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _keep_until(path: Path, step: int) -> None:
    """Drop lines logged after ``step`` (a resumed run re-logs the steps after its checkpoint)."""
    rows = [r for r in read_jsonl(path) if r["step"] <= step] if path.is_file() else []
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


class Metrics:
    """``log(step, values)`` after every step; ``close()`` at the end writes the plot."""

    def __init__(self, cfg: MetricsConfig, out_dir: str | Path, *, total_steps: int, start_step: int = 0,
                 enabled: bool = True, run_config: Optional[dict] = None,
                 panels: tuple[tuple[str, tuple[str, ...]], ...] = PLOT_PANELS):
        self.cfg, self.enabled, self.panels = cfg, enabled, panels
        self.out_dir = Path(out_dir)
        self.jsonl_path = self.out_dir / "metrics.jsonl"
        self.plot_path = self.out_dir / "metrics.png"
        self.samples_path = self.out_dir / "samples.jsonl"
        self._jsonl = self._tb = self._wandb = self._bar = self._samples = None
        if not enabled:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        if cfg.samples_every:
            _keep_until(self.samples_path, start_step)
            self._samples = open(self.samples_path, "a")
        if cfg.jsonl:
            _keep_until(self.jsonl_path, start_step)
            self._jsonl = open(self.jsonl_path, "a")
        if cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            self._tb = SummaryWriter(str(self.out_dir / "tensorboard"), purge_step=start_step + 1)
        if cfg.wandb:
            try:
                import wandb
            except ImportError:
                raise ConfigError("metrics.wandb=true needs the wandb package (pip install wandb)") from None
            self._wandb = wandb.init(project=cfg.wandb_project, config=run_config, dir=str(self.out_dir),
                                     resume="allow")
        if cfg.progress_bar:
            from tqdm.auto import tqdm
            self._bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)

    def log(self, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        row = {"step": step, **{k: float(v) for k, v in values.items()}}
        if self._jsonl:
            self._jsonl.write(json.dumps(row) + "\n")
            self._jsonl.flush()
        if self._tb:
            for key, value in row.items():
                if key != "step" and math.isfinite(value):
                    self._tb.add_scalar(key, value, step)
        if self._wandb:
            self._wandb.log(row, step=step)
        if self._bar:
            self._bar.update(1)
            shown = {k: f"{row[k]:.{digits}f}" for k, digits in (("reward", 3), ("loss", 4)) if k in row}
            self._bar.set_postfix(shown, refresh=False)

    def sample_step(self, step: int) -> bool:
        """Whether step ``step`` (1-based) logs its completions (``metrics.samples_every``); the same on every rank."""
        return bool(self.cfg.samples_every) and step % self.cfg.samples_every == 0

    def log_samples(self, step: int, rows: list[dict]) -> None:
        """One JSON line per completion into ``samples.jsonl``: ``{"step": n, ...row}``."""
        if self._samples:
            self._samples.write("".join(json.dumps({"step": step, **row}) + "\n" for row in rows))
            self._samples.flush()

    def write(self, message: str) -> None:
        """A line of text that does not break the progress bar."""
        if not self.enabled:
            return
        if self._bar:
            self._bar.write(message)
        else:
            print(message, flush=True)

    def close(self) -> Optional[Path]:
        """Flush and close every sink; write the PNG plot (returns its path when written)."""
        if not self.enabled:
            return None
        for sink in (self._bar, self._jsonl, self._tb, self._samples):
            if sink:
                sink.close()
        if self._wandb:
            self._wandb.finish()
        if self.cfg.plot and self.cfg.jsonl and self.jsonl_path.is_file():
            return plot_metrics(self.jsonl_path, self.plot_path, self.panels)
        return None


def plot_metrics(jsonl_path: str | Path, png_path: str | Path,
                 panels: tuple[tuple[str, tuple[str, ...]], ...] = PLOT_PANELS) -> Path:
    """One panel per ``(title, keys)`` of ``panels`` against step; default ``PLOT_PANELS`` (reward parts, temporal
    reward, completion length: training's)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_jsonl(jsonl_path)
    fig, axes = plt.subplots(len(panels), 1, figsize=(7, 2.6 * len(panels)), sharex=True, squeeze=False)
    axes = axes[:, 0]
    for ax, (title, keys) in zip(axes, panels):
        for key in keys:
            pts = [(r["step"], r[key]) for r in rows if key in r]
            if pts:
                ax.plot(*zip(*pts), marker=".", label=key)
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7)
    axes[-1].set_xlabel("step")
    fig.tight_layout()
    png_path = Path(png_path)
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
    return png_path


def sample_rows(samples: list, texts: list[str], shuffled: Optional[list], rewards, rank: int) -> list[dict]:
    """``samples.jsonl`` rows: every ordered completion with its rewards and advantage, every shuffled one with
    its accuracy (``metrics.samples_every``)."""
    G, out = rewards.group_size, []
    for b, sample in enumerate(samples):
        head = {"rank": rank, "problem_id": sample.problem_id, "record": sample.index, "source": sample.source,
                "problem_type": sample.problem_type, "answer": sample.answer}
        for g in range(G):
            i = b * G + g
            out.append({**head, "branch": "ordered", "sample": g, "completion": texts[i],
                        "length": int(rewards.lengths[i]), "accuracy": float(rewards.accuracy[i]),
                        "format": float(rewards.format[i]), "reward": float(rewards.total[i]),
                        "advantage": float(rewards.advantages[i]), "temporal": float(rewards.temporal[b])})
        accuracy = rewards.shuffled_accuracy[b] if rewards.shuffled_accuracy else None
        for j, text in enumerate(shuffled[b] if shuffled and shuffled[b] is not None else []):
            out.append({**head, "branch": "shuffled", "sample": j, "completion": text,
                        "accuracy": None if accuracy is None else float(accuracy[j])})
    return out
