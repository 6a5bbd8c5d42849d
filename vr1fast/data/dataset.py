"""Video-R1-260k / Video-R1-COT-165k records → validated :class:`Sample`\\ s, and a resumable sampler.

A file is one JSON list (Video-R1's ``.json``) or JSON Lines. Every record is checked on load (schema of
``docs/video-r1.md`` §5): ``problem`` (non-empty string), ``data_type`` ∈ {image, video}, ``problem_type``
∈ the five types, ``options`` (a non-empty list of strings for multiple choice; absent, null or a list of strings
otherwise), ``solution`` (a string holding a non-empty ``<answer>…</answer>``), ``path`` (a string; resolved against
the media root, ``"./X/y.mp4"`` → ``root/X/y.mp4``, and the file must exist), ``problem_id`` (int or string,
optional), ``process`` (a string when present; required for SFT with ``require_process=True``). Other fields are
ignored. A bad record raises :class:`RecordError` naming file, index and field; with ``DataConfig.skip_bad`` it is
counted, skipped and reported in :attr:`Records.summary`. Deviation from Video-R1: it never substitutes another
sample for a broken one (Video-R1 silently swaps in a fixed image or video).

:class:`Sampler` gives each epoch a seeded permutation; the stream of all epochs back to back is consumed
``count × world_size`` indices at a time from a :class:`Position` ``(epoch, index)``, so a run resumes exactly.
"""
from __future__ import annotations

import json
import logging
import os
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional, Union

from vr1fast.config import DataConfig
from vr1fast.errors import RecordError

DATA_TYPES = ("image", "video")
PROBLEM_TYPES = ("multiple choice", "numerical", "OCR", "free-form", "regression")
MAX_REASONS = 5

ANSWER = re.compile(r"<answer>\s*(.*?)\s*</answer>", re.DOTALL)  # Video-R1's, for solutions and completions
logger = logging.getLogger(__name__)


def extract_answer(text: str) -> str:
    """The stripped content of the first ``<answer>…</answer>`` block of ``text``; ``""`` when there is none.
    Owned here with the solution schema; ``rl.rewards`` applies it to completions too."""
    match = ANSWER.search(text)
    return match.group(1).strip() if match else ""


@dataclass(frozen=True)
class Sample:
    """One validated record. ``path`` is absolute; ``answer`` is ``extract_answer(solution)``."""

    problem_id: Union[int, str, None]
    problem: str
    options: tuple[str, ...]
    solution: str               # "<answer>…</answer>"
    answer: str                 # the stripped content of the solution's first <answer> block
    data_type: str              # "image" | "video"
    problem_type: str           # one of PROBLEM_TYPES
    path: str                   # absolute media path
    process: Optional[str]      # "<think>…</think>" (SFT files), else None
    index: int                  # position of the record in its file
    source: str                 # the file it came from


@dataclass(frozen=True)
class Records:
    """The samples of one file, and how many records were skipped (only with ``skip_bad``) and why."""

    samples: tuple[Sample, ...]
    skipped: int
    reasons: tuple[str, ...]    # the first few skip reasons, each naming file, index and field
    source: str

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> Sample:
        return self.samples[i]

    def __iter__(self) -> Iterator[Sample]:
        return iter(self.samples)

    @property
    def summary(self) -> str:
        head = f"{self.source}: {len(self.samples)} records loaded, {self.skipped} skipped"
        return "; ".join([head, *self.reasons]) + ("; ..." if self.skipped > len(self.reasons) else "")


def _read_items(path: Path) -> list[Union[Any, RecordError]]:
    """The file's records in order; a JSONL line that does not parse becomes a RecordError in its place."""
    text = path.read_text(encoding="utf-8-sig")
    if text.lstrip().startswith("["):
        try:
            return json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not a valid JSON list: {e}") from None
    items: list[Union[Any, RecordError]] = []
    for line_no, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            items.append(json.loads(line))
        except json.JSONDecodeError as e:
            items.append(RecordError(path, len(items), "<json>", f"line {line_no} is not valid JSON: {e}"))
    return items


def _text(record: dict, name: str, file: Path, index: int) -> str:
    value = record.get(name)
    if value is None:
        raise RecordError(file, index, name, "missing")
    if not isinstance(value, str):
        raise RecordError(file, index, name, f"expected a string, got {type(value).__name__}")
    if not value.strip():
        raise RecordError(file, index, name, "empty")
    return value


def _choice(record: dict, name: str, allowed: tuple[str, ...], file: Path, index: int) -> str:
    value = _text(record, name, file, index)
    if value not in allowed:
        raise RecordError(file, index, name, f"{value!r} is not one of {list(allowed)}")
    return value


def _options(record: dict, problem_type: str, file: Path, index: int) -> tuple[str, ...]:
    value = record.get("options")
    if value is None and problem_type != "multiple choice":
        return ()
    if not isinstance(value, list) or not all(isinstance(option, str) for option in value):
        reason = "missing" if value is None else f"expected a list of strings, got {json.dumps(value)[:80]}"
        raise RecordError(file, index, "options", reason)
    if problem_type == "multiple choice" and not value:
        raise RecordError(file, index, "options", "a multiple-choice record needs at least one option")
    return tuple(value)


def _solution(record: dict, file: Path, index: int) -> tuple[str, str]:
    solution = _text(record, "solution", file, index)
    if not ANSWER.search(solution):
        raise RecordError(file, index, "solution", f"no <answer>…</answer> block in {solution[:80]!r}")
    answer = extract_answer(solution)
    if not answer:
        raise RecordError(file, index, "solution", "the <answer> block is empty")
    return solution, answer


def _media_path(record: dict, root: str, file: Path, index: int, check_media: bool) -> str:
    relative = _text(record, "path", file, index)
    resolved = os.path.normpath(os.path.join(root, relative))
    if check_media and not os.path.isfile(resolved):
        raise RecordError(file, index, "path", f"media file not found: {resolved}")
    return resolved


def _optional_fields(record: dict, file: Path, index: int, require_process: bool):
    problem_id = record.get("problem_id")
    if problem_id is not None and (isinstance(problem_id, bool) or not isinstance(problem_id, (int, str))):
        raise RecordError(file, index, "problem_id", f"expected an integer or string, got {problem_id!r}")
    process = record.get("process")
    if process is not None or require_process:
        process = _text(record, "process", file, index)
    return problem_id, process


def _to_sample(record: Any, file: Path, index: int, root: str, require_process: bool,
               check_media: bool) -> Sample:
    if not isinstance(record, dict):
        raise RecordError(file, index, "<record>", f"expected a JSON object, got {type(record).__name__}")
    problem_type = _choice(record, "problem_type", PROBLEM_TYPES, file, index)
    problem_id, process = _optional_fields(record, file, index, require_process)
    solution, answer = _solution(record, file, index)
    return Sample(
        problem_id=problem_id,
        problem=_text(record, "problem", file, index),
        options=_options(record, problem_type, file, index),
        solution=solution,
        answer=answer,
        data_type=_choice(record, "data_type", DATA_TYPES, file, index),
        problem_type=problem_type,
        path=_media_path(record, root, file, index, check_media),
        process=process,
        index=index,
        source=str(file),
    )


def load_records(path: Union[str, Path, None], cfg: Optional[DataConfig] = None, *,
                 require_process: bool = False, check_media: bool = True) -> Records:
    """Load and validate every record of ``path`` (default ``cfg.path``); media paths resolve against
    ``cfg.media_root`` (default: the file's directory). Bad records raise :class:`RecordError`, or with
    ``cfg.skip_bad`` are counted in :attr:`Records.skipped` and logged once at the end."""
    cfg = cfg or DataConfig()
    file = Path(path if path is not None else cfg.path or "")
    if not file.is_file():
        raise FileNotFoundError(f"dataset file not found: {file}")
    root = os.path.abspath(cfg.media_root if cfg.media_root is not None else file.parent)
    items = _read_items(file)
    samples: list[Sample] = []
    reasons: list[str] = []
    skipped = 0
    for index, item in enumerate(items):
        try:
            if isinstance(item, RecordError):
                raise item
            samples.append(_to_sample(item, file, index, root, require_process, check_media))
        except RecordError as e:
            if not cfg.skip_bad:
                raise
            skipped += 1
            if len(reasons) < MAX_REASONS:
                reasons.append(str(e))
    records = Records(tuple(samples), skipped, tuple(reasons), str(file))
    if not samples:
        raise ValueError(f"{file}: no usable records ({records.summary})")
    if skipped:
        logger.warning(records.summary)
    return records


@dataclass(frozen=True)
class Position:
    """Where the sample stream stands: ``index`` items of epoch ``epoch``'s order have been consumed."""

    epoch: int = 0
    index: int = 0


class Sampler:
    """Seeded per-epoch permutations of ``range(num_samples)`` (identity order if ``shuffle`` is False)."""

    def __init__(self, num_samples: int, seed: int = 0, shuffle: bool = True):
        if num_samples < 1:
            raise ValueError(f"Sampler needs at least one sample, got {num_samples}")
        self.num_samples, self.seed, self.shuffle = num_samples, seed, shuffle
        self._cached: tuple[int, list[int]] = (-1, [])

    def order(self, epoch: int) -> list[int]:
        """Epoch ``epoch``'s order; the same for the same (seed, epoch) in every process and run."""
        if self._cached[0] != epoch:
            order = list(range(self.num_samples))
            if self.shuffle:
                random.Random(self.seed * 2**32 + epoch).shuffle(order)
            self._cached = (epoch, order)
        return self._cached[1]

    def take(self, position: Position, count: int, rank: int = 0,
             world_size: int = 1) -> tuple[list[int], Position]:
        """The next ``count × world_size`` indices of the stream from ``position`` (crossing epochs as needed);
        returns this rank's ``count`` of them (slice ``rank·count : (rank+1)·count``) and the next position."""
        if not 0 <= position.index < self.num_samples or position.epoch < 0:
            raise ValueError(f"position {position} is outside a dataset of {self.num_samples} samples")
        if count < 1 or not 0 <= rank < world_size:
            raise ValueError(f"bad take: count={count}, rank={rank}, world_size={world_size}")
        epoch, index, stream = position.epoch, position.index, []
        while len(stream) < count * world_size:
            need = count * world_size - len(stream)
            chunk = self.order(epoch)[index:index + need]
            stream.extend(chunk)
            index += len(chunk)
            if index == self.num_samples:
                epoch, index = epoch + 1, 0
        return stream[rank * count:(rank + 1) * count], Position(epoch, index)
