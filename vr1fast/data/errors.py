"""Typed errors for bad input. Each message names the thing that is wrong, on one line."""
from __future__ import annotations


class MediaError(RuntimeError):
    """A video or image that cannot be read: missing, empty, truncated, unknown codec, or a decode timeout."""

    def __init__(self, path, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"cannot decode {self.path}: {reason}")


class RecordError(ValueError):
    """A malformed dataset record; names the file, the record index and the field."""

    def __init__(self, file, index: int, field: str, reason: str):
        self.file, self.index, self.field, self.reason = str(file), index, field, reason
        super().__init__(f"{self.file}: record {index}: field {field!r}: {reason}")
