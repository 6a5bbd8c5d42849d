"""On-disk cache of sampled, resized video frames (``data.frame_cache = DIR``, capped at ``data.frame_cache_gb``): a
second epoch or a second run reads a video's frames back instead of decoding and resizing it again.

Key: SHA-256 of the key material — the file's identity (resolved path, size, mtime in ns) and the settings that
change the frames (the caller's dict: ``vr1fast.data.video.cache_settings``) — so a touched or replaced file, or a
changed setting, is a miss; the stale entry ages out. Entry ``<DIR>/<key[:2]>/<key>.frames``::

    MAGIC | header length (u32 little-endian) | header JSON | payload: raw uint8 frames, C order
    header = {"key": key material, "shape": [T, H, W, 3], "crc32": zlib.crc32(payload), "meta": caller's dict}

An entry with a wrong magic, an unreadable header, another key material, a payload of the wrong length or a
checksum mismatch is corrupt: a one-line warning names it and the reason, it is deleted and rebuilt (decoded
again), never used. Writes go to a unique temp file beside the entry and are published by ``os.replace``, so several
ranks and loader workers can fill the cache at once: a reader sees no entry or a whole one (two writers of one key
write the same bytes; the last replace wins). A write that fails (disk full) is a warning, not an error.

Eviction, least recently used: a hit refreshes the entry's mtime; when the entries' total passes the cap, the
oldest-mtime entries are deleted until it is under LOW_WATER of the cap. The total comes from a directory scan,
taken when this process's running estimate passes the cap and every RESCAN_EVERY of its writes (to see the other
processes' writes); the scan also deletes temp files left by a crashed writer. An entry larger than the cap is not
written. Frames are stored raw (4.5 MB for 16 frames at 224×420): decoding costs more than reading them.
"""
from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import os
import secrets
import time
import zlib
from pathlib import Path
from typing import Callable, Iterator, Optional, Union

import torch

from vr1fast.config import DataConfig

logger = logging.getLogger(__name__)

MAGIC = b"VR1FAST-FRAMES-1\n"
SUFFIX = ".frames"
LOW_WATER = 0.9          # eviction stops under this fraction of the cap
RESCAN_EVERY = 32        # writes between directory scans of one process
STALE_TEMP_S = 3600.0    # a temp file older than this belongs to a crashed writer
Entry = tuple[torch.Tensor, dict]  # uint8 frames [T, H, W, 3] and the caller's metadata (JSON-serialisable)


class CorruptEntry(ValueError):
    """Why an entry's bytes cannot be used."""


def _unlink(path: Union[str, Path]) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:  # another process evicted or rebuilt it first
        pass


def _canonical(material: dict) -> str:
    return json.dumps(material, sort_keys=True, separators=(",", ":"))


def _read_bytes(path: Path) -> Optional[bytearray]:
    """The whole file in a fresh bytearray (frames become a view of it, no copy), or None if it does not exist."""
    try:
        with open(path, "rb") as f:
            data = bytearray(os.fstat(f.fileno()).st_size)
            n = f.readinto(data)
    except FileNotFoundError:
        return None
    return data[:n] if n != len(data) else data


def decode_entry(data: bytearray, material: dict) -> Entry:
    """(frames, meta) of an entry's bytes written for ``material``, or CorruptEntry saying what is wrong."""
    start = len(MAGIC) + 4
    if data[:len(MAGIC)] != MAGIC or len(data) < start:
        raise CorruptEntry("not a frame-cache entry (bad magic or truncated header)")
    end = start + int.from_bytes(data[len(MAGIC):start], "little")
    try:
        header = json.loads(bytes(data[start:end]))
        shape, crc, meta = [int(s) for s in header["shape"]], int(header["crc32"]), dict(header["meta"])
        same_key = _canonical(header["key"]) == _canonical(material)
    except (ValueError, KeyError, TypeError) as e:
        raise CorruptEntry(f"unreadable header ({type(e).__name__})") from None
    if not same_key:
        raise CorruptEntry("written for another file or other video settings")
    payload = memoryview(data)[end:]
    if len(shape) != 4 or len(payload) != math.prod(shape):
        raise CorruptEntry(f"payload has {len(payload)} bytes, the header's shape {shape} needs {math.prod(shape)}")
    if zlib.crc32(payload) != crc:
        raise CorruptEntry("checksum mismatch")
    return torch.frombuffer(data, dtype=torch.uint8, count=len(payload), offset=end).view(shape), meta


def encode_header(material: dict, frames: torch.Tensor, payload: memoryview, meta: dict) -> bytes:
    header = json.dumps(dict(key=material, shape=list(frames.shape), crc32=zlib.crc32(payload), meta=meta)).encode()
    return MAGIC + len(header).to_bytes(4, "little") + header


class FrameCache:
    """Frames cached under ``root``, at most ``cap_bytes`` of entries (see the module docstring)."""

    def __init__(self, root: Union[str, Path], cap_bytes: int):
        self.root, self.cap_bytes = Path(root), int(cap_bytes)
        self.root.mkdir(parents=True, exist_ok=True)
        self._estimate: Optional[int] = None  # bytes of entries as of the last scan + this process's writes since
        self._writes = 0

    def fetch(self, path: Union[str, Path], settings: dict, build: Callable[[], Entry]) -> Entry:
        """The cached (frames, meta) of ``path`` under ``settings``, else ``build()``'s, stored for the next time.
        A file that cannot be stat'ed is not cached (``build`` reports it)."""
        try:
            st = os.stat(path)
        except OSError:
            return build()
        material = dict(path=os.path.realpath(path), size=st.st_size, mtime_ns=st.st_mtime_ns, settings=settings)
        key = hashlib.sha256(_canonical(material).encode()).hexdigest()
        entry = self.root / key[:2] / f"{key}{SUFFIX}"
        hit = self._read(entry, material)
        if hit is not None:
            return hit
        frames, meta = build()
        self._write(entry, material, frames, meta)
        return frames, meta

    def _read(self, entry: Path, material: dict) -> Optional[Entry]:
        data = _read_bytes(entry)
        if data is None:
            return None
        try:
            hit = decode_entry(data, material)
        except CorruptEntry as e:
            logger.warning("frame cache: %s is corrupt (%s): deleted, decoding the video again", entry, e)
            _unlink(entry)
            return None
        try:
            os.utime(entry)  # least recently used = oldest mtime
        except FileNotFoundError:
            pass
        return hit

    def _write(self, entry: Path, material: dict, frames: torch.Tensor, meta: dict) -> None:
        payload = memoryview(frames.contiguous().numpy()).cast("B")
        head = encode_header(material, frames, payload, meta)
        size = len(head) + len(payload)
        if size > self.cap_bytes:
            return
        temp = entry.with_name(f"{entry.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
        try:
            entry.parent.mkdir(exist_ok=True)
            with open(temp, "wb") as f:
                f.write(head)
                f.write(payload)
            os.replace(temp, entry)
        except OSError as e:
            _unlink(temp)
            logger.warning("frame cache: could not write %s (%s): continuing without caching it", entry, e)
            return
        self._writes += 1
        self._estimate = None if self._estimate is None else self._estimate + size
        if self._estimate is None or self._estimate > self.cap_bytes or self._writes % RESCAN_EVERY == 0:
            self._estimate = self.evict()

    def _scan(self) -> Iterator[tuple[float, int, str]]:
        """(mtime, size, path) of every entry; deletes temp files of crashed writers on the way."""
        now = time.time()
        for sub in os.scandir(self.root):
            if not sub.is_dir():
                continue
            for item in os.scandir(sub.path):
                try:
                    st = item.stat()
                except FileNotFoundError:
                    continue
                if item.name.endswith(SUFFIX):
                    yield st.st_mtime, st.st_size, item.path
                elif item.name.endswith(".tmp") and now - st.st_mtime > STALE_TEMP_S:
                    _unlink(item.path)

    def evict(self) -> int:
        """Delete least recently used entries while the total is over the cap (down to LOW_WATER of it); returns
        the bytes of entries left."""
        entries = sorted(self._scan())
        total = sum(size for _, size, _ in entries)
        if total <= self.cap_bytes:
            return total
        for _, size, path in entries:
            if total <= LOW_WATER * self.cap_bytes:
                break
            _unlink(path)
            total -= size
        return total


@functools.lru_cache(maxsize=None)
def _open(root: str, cap_gb: float) -> FrameCache:
    return FrameCache(root, int(cap_gb * 1e9))


def frame_cache(cfg: DataConfig) -> Optional[FrameCache]:
    """This process's cache for ``data.frame_cache`` / ``data.frame_cache_gb`` (one object per directory and cap), or
    None when the cache is off."""
    if cfg.frame_cache is None:
        return None
    return _open(os.path.abspath(cfg.frame_cache), float(cfg.frame_cache_gb))
