"""The block manager the rollout engine uses: the C++ one (``csrc/``, built by ``setup.py``) when its library loads,
else its Python twin ``kv_pool.BlockManager``; one log line at import says which runs.

``VR1FAST_BLOCK_MANAGER`` picks: ``auto`` (the default: C++ when built), ``cpp`` (C++, or a one-line error when it
does not load) or ``python``. ``CppBlockManager`` has the Python manager's methods and semantics (the interface is
in ``kv_pool``'s docstring) and raises the same exceptions (``ValueError``, ``PoolTooSmall``) with the same one-line
messages; ``tests/rollout/test_block_manager.py`` runs both on the same random operations and compares every
observable after each. Page tables come back as int32 tensors and slots as int64 tensors, as from ``kv_pool``, filled
in place by the library (no Python loop over their elements). Only for inputs no rollout makes do the two differ:
ids and counts must fit in int64 (a larger int raises ``ValueError`` naming it), and ``num_pages`` and
``page_size`` must be at most 2^31 - 1 (int32 page ids).

The library (``vr1fast/_C*.so``) is a plain C interface over an opaque handle (``csrc/c_api.cpp``), loaded with
ctypes: no torch and no Python headers, its C++ runtime linked in statically, so one binary loads under any torch.
It is loaded as a ``PyDLL``, so calls hold the GIL, as the Python manager's do.
"""
from __future__ import annotations

import array
import ctypes
import importlib.util
import logging
import operator
import os
import weakref
from typing import Optional, Sequence

import torch
from torch import Tensor

from vr1fast.errors import ConfigError
from vr1fast.rollout.kv_pool import BlockManager as PyBlockManager
from vr1fast.rollout.kv_pool import PoolTooSmall

ENV = "VR1FAST_BLOCK_MANAGER"
ABI_VERSION = 1  # csrc/c_api.cpp's kAbiVersion: a library built from older sources is not used
_ERROR = -(2 ** 63)  # BM_ERROR: the call failed; bm_error_kind / bm_error_message say how
_KINDS = {1: ValueError, 2: PoolTooSmall, 3: MemoryError}
_I64, _VOID, _PTR = ctypes.c_int64, ctypes.c_void_p, ctypes.POINTER(ctypes.POINTER(ctypes.c_int32))
_SIGNATURES = {
    "bm_abi_version": (_I64, []), "bm_error_kind": (ctypes.c_int, []), "bm_error_message": (ctypes.c_char_p, []),
    "bm_create": (_VOID, [_I64, _I64]), "bm_destroy": (None, [_VOID]), "bm_reset": (_I64, [_VOID]),
    "bm_num_free": (_I64, [_VOID]), "bm_refcount": (_I64, [_VOID, _I64]), "bm_allocate": (_I64, [_VOID, _I64]),
    "bm_fork": (_I64, [_VOID, _I64, _I64]), "bm_append": (_I64, [_VOID, _I64, _I64]), "bm_free": (_I64, [_VOID, _I64]),
    "bm_length": (_I64, [_VOID, _I64]), "bm_parent": (_I64, [_VOID, _I64]), "bm_pages": (_I64, [_VOID, _I64, _PTR]),
    "bm_prefix": (_I64, [_VOID, _I64, _PTR]), "bm_table_width": (_I64, [_VOID, _VOID, _I64]),
    "bm_page_table": (_I64, [_VOID, _VOID, _I64, _I64, _VOID]), "bm_slots": (_I64, [_VOID, _I64, _I64, _I64, _VOID]),
}
logger = logging.getLogger(__name__)


def library_path() -> Optional[str]:
    """Where the built library is (``vr1fast/_C`` with this Python's extension suffix), or None when not built."""
    spec = importlib.util.find_spec("vr1fast._C")
    return spec.origin if spec is not None else None


def load_library(path: str) -> ctypes.PyDLL:
    """The library at ``path`` with its functions' C signatures set; OSError when it is not loadable or stale."""
    lib = ctypes.PyDLL(path)
    for name, (restype, argtypes) in _SIGNATURES.items():
        func = getattr(lib, name)
        func.restype, func.argtypes = restype, argtypes
    if lib.bm_abi_version() != ABI_VERSION:
        raise OSError(f"{path} has ABI {lib.bm_abi_version()}, not {ABI_VERSION}: rebuild it (pip install -e .)")
    return lib


def _load() -> tuple[Optional[ctypes.PyDLL], str]:
    """The library and where it is, or None and why not."""
    path = library_path()
    if path is None:
        return None, "vr1fast._C is not built (pip install -e . builds it; VR1FAST_SKIP_CSRC=1 skips it)"
    try:
        return load_library(path), path
    except (OSError, AttributeError) as err:
        return None, f"{path} does not load: {err}"


_lib, _where = _load()


def cpp_status() -> tuple[bool, str]:
    """Whether the C++ manager loaded, and its library's path (or why it did not load)."""
    return _lib is not None, _where


def _check(result: int) -> int:
    """``result``, or the library's error raised as the Python manager's exception."""
    if result == _ERROR:
        kind = _lib.bm_error_kind()
        raise _KINDS.get(kind, RuntimeError)(_lib.bm_error_message().decode())
    return result


def _int64(x: int, what: str) -> int:
    x = operator.index(x)
    if not -2 ** 63 <= x < 2 ** 63:
        raise ValueError(f"block manager: {what} {x} does not fit in int64")
    return x


class CppBlockManager:
    """``kv_pool.BlockManager``'s interface over the C++ manager of ``csrc/``."""

    def __init__(self, num_pages: int, page_size: int):
        if _lib is None:
            raise ConfigError(f"the C++ block manager does not load: {_where}")
        handle = _lib.bm_create(_int64(num_pages, "num_pages"), _int64(page_size, "page_size"))
        if not handle:
            _check(_ERROR)
        self.num_pages, self.page_size = num_pages, page_size
        self._handle, self._data = handle, ctypes.POINTER(ctypes.c_int32)()
        weakref.finalize(self, _lib.bm_destroy, handle)

    def reset(self) -> None:
        _check(_lib.bm_reset(self._handle))

    @property
    def num_free(self) -> int:
        return _lib.bm_num_free(self._handle)

    def refcount(self, page: int) -> int:
        return _check(_lib.bm_refcount(self._handle, _int64(page, "page")))

    def allocate(self, num_tokens: int) -> int:
        return _check(_lib.bm_allocate(self._handle, _int64(num_tokens, "num_tokens")))

    def fork(self, seq: int, n: int) -> list[int]:
        first = _check(_lib.bm_fork(self._handle, _int64(seq, "sequence"), _int64(n, "n")))
        return list(range(first, first + n))

    def append(self, seq: int, num_tokens: int = 1) -> None:
        _check(_lib.bm_append(self._handle, _int64(seq, "sequence"), _int64(num_tokens, "num_tokens")))

    def free(self, seq: int) -> None:
        _check(_lib.bm_free(self._handle, _int64(seq, "sequence")))

    def length(self, seq: int) -> int:
        return _check(_lib.bm_length(self._handle, _int64(seq, "sequence")))

    def pages(self, seq: int) -> list[int]:
        n = _check(_lib.bm_pages(self._handle, _int64(seq, "sequence"), ctypes.byref(self._data)))
        return self._data[:n]

    def parent(self, seq: int) -> int:
        return _check(_lib.bm_parent(self._handle, _int64(seq, "sequence")))

    def prefix(self, seq: int) -> list[int]:
        n = _check(_lib.bm_prefix(self._handle, _int64(seq, "sequence"), ctypes.byref(self._data)))
        return self._data[:n]

    def page_table(self, seqs: Sequence[int], width: int = 0) -> Tensor:
        try:
            ids = array.array("q", seqs)
        except OverflowError:
            raise ValueError(f"block manager: a sequence id of {list(seqs)} does not fit in int64") from None
        address, n = ids.buffer_info()
        widest = _check(_lib.bm_table_width(self._handle, address, n))
        table = torch.empty((n, max(width, widest) if n else width), dtype=torch.int32)
        _check(_lib.bm_page_table(self._handle, address, n, table.shape[1], table.data_ptr()))
        return table

    def slots(self, seq: int, start: int, stop: int) -> Tensor:
        seq, start, stop = _int64(seq, "sequence"), _int64(start, "start"), _int64(stop, "stop")
        _check(_lib.bm_slots(self._handle, seq, start, stop, None))  # range check before sizing the output
        out = torch.empty(stop - start, dtype=torch.int64)
        _check(_lib.bm_slots(self._handle, seq, start, stop, out.data_ptr()))
        return out


def choose(name: str) -> type:
    """The block manager class for ``name`` (auto, cpp or python); logs one line saying which runs."""
    if name not in ("auto", "cpp", "python"):
        raise ConfigError(f"{ENV}={name!r}: expected auto, cpp or python")
    if name == "python":
        logger.info("block manager: Python (kv_pool.BlockManager), as %s=python asks", ENV)
        return PyBlockManager
    if _lib is None:
        if name == "cpp":
            raise ConfigError(f"{ENV}=cpp but the C++ block manager does not load: {_where}")
        logger.warning("block manager: Python (kv_pool.BlockManager); the C++ one does not load: %s", _where)
        return PyBlockManager
    logger.info("block manager: C++ (%s)", _where)
    return CppBlockManager


BlockManager = choose(os.environ.get(ENV, "auto").strip().lower() or "auto")
