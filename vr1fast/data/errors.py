"""Re-export of :mod:`vr1fast.errors` (the same classes) until the last importers switch to it."""
from __future__ import annotations

from vr1fast.errors import MediaError, RecordError

__all__ = ["MediaError", "RecordError"]
