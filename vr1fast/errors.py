"""Expected failures: bad input or a run that cannot go on. Each message names the thing that is wrong, on one line.

An entry point catches :class:`Vr1fastError` once (``vr1fast.cli.run_main``) and prints the message instead of a
traceback; anything else is a bug and keeps its traceback. Each subclass also keeps the builtin base it had before
this module existed (``ValueError`` or ``RuntimeError``), so ``except ValueError`` callers see no change.
"""
from __future__ import annotations


class Vr1fastError(Exception):
    """Base class of the failures vr1fast expects and reports as one line."""


class ConfigError(Vr1fastError, ValueError):
    """A bad config value, unknown key or unreadable config file; the message names it."""


class MediaError(Vr1fastError, RuntimeError):
    """A video or image that cannot be read: missing, empty, truncated, unknown codec, or a decode timeout."""

    def __init__(self, path, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"cannot decode {self.path}: {reason}")


class RecordError(Vr1fastError, ValueError):
    """A malformed dataset record; names the file, the record index and the field."""

    def __init__(self, file, index: int, field: str, reason: str):
        self.file, self.index, self.field, self.reason = str(file), index, field, reason
        super().__init__(f"{self.file}: record {index}: field {field!r}: {reason}")


class NonFiniteLossError(Vr1fastError, RuntimeError):
    """The loss or gradient norm is NaN/inf; raised before the update, so the last checkpoint stays valid."""
