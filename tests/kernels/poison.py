"""Fresh buffers poisoned with NaN, one intra-op thread, and dense GEMM operands: the conditions under which a kernel
launcher that leaves part of a buffer unwritten, or hands a GEMM a strided view whose padding it may read, fails
every time rather than on some CPUs some of the time.

``poisoned()`` patches ``torch.empty`` / ``torch.empty_like`` / ``Tensor.new_empty`` so that every floating-point
allocation starts as NaN (integer ones as -1), pins torch to one intra-op thread (what ``conftest.py`` sets under
xdist, and the setting in which oneDNN's bf16 GEMM was seen reading a strided operand's row padding on the
reviewer's CPU; this machine's AVX-512 kernels do not), and raises when a matrix product gets an operand that is
not dense (rows or columns with gaps between them: a column slice of a wider buffer), since whether a BLAS reads
such padding depends on the library, its version and the CPU.
"""
from __future__ import annotations

import contextlib

import torch
from torch.utils._python_dispatch import TorchDispatchMode

_EMPTY, _EMPTY_LIKE, _NEW_EMPTY = torch.empty, torch.empty_like, torch.Tensor.new_empty


def _poison(t: torch.Tensor) -> torch.Tensor:
    if t.device.type != "meta" and t.numel():
        t.fill_(float("nan") if t.is_floating_point() else -1)
    return t


aten = torch.ops.aten
GEMMS = {aten.mm.default, aten.mm.out, aten.mm.dtype, aten.addmm.default, aten.addmm.out, aten.addmm.dtype_out,
         aten.addmm_.default, aten.bmm.default, aten.baddbmm.default}


def _dense(t: torch.Tensor) -> bool:
    """A 2-D operand whose rows (or columns, for a transposed view) are packed without gaps."""
    return t.dim() != 2 or t.is_contiguous() or t.t().is_contiguous() or t.numel() == 0


class DenseGemms(TorchDispatchMode):
    """Checks every aten matrix product (also inside autograd backward) for operands with gaps between rows."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in GEMMS:
            for a in (*args, *(kwargs or {}).values()):
                if isinstance(a, torch.Tensor) and not _dense(a):
                    raise AssertionError(f"{func} got a strided operand {tuple(a.shape)} with strides "
                                         f"{a.stride()}: a BLAS may read its padding")
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def poisoned(threads: int = 1):
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    mode = DenseGemms()
    mode.__enter__()
    torch.empty = lambda *a, **k: _poison(_EMPTY(*a, **k))
    torch.empty_like = lambda *a, **k: _poison(_EMPTY_LIKE(*a, **k))
    torch.Tensor.new_empty = lambda self, *a, **k: _poison(_NEW_EMPTY(self, *a, **k))
    try:
        yield
    finally:
        mode.__exit__(None, None, None)
        torch.empty, torch.empty_like, torch.Tensor.new_empty = _EMPTY, _EMPTY_LIKE, _NEW_EMPTY
        torch.set_num_threads(saved)
