"""Matrix products of the LM-head backward with a chosen accumulation / output dtype, on CUDA and on the CPU.

cuBLAS takes 16-bit operands with an fp32 output (``out_dtype``): products of bf16/fp16 numbers are exact in fp32
and the sums are fp32, so nothing is rounded to 16 bits in between. The CPU build has no ``out_dtype`` kernel
(``aten::addmm.dtype`` is CUDA-only in torch 2.13); there the operands are upcast to fp32 first, which gives the
same exact products and fp32 sums (in another order), so the CPU tests check the arithmetic the GPU runs. A torch
whose CUDA GEMMs lack ``out_dtype`` (``mm`` before 2.8; ``addmm`` into an fp32 C with 16-bit operands before
2.10) takes that same fp32-copy path, slower, with a warning once.

Operands must be dense (rows or columns packed without gaps): a column slice of a wider buffer is never passed,
since some BLAS builds read the gap (``tests/kernels/poison.py``).
"""
from __future__ import annotations

import warnings

import torch
from torch import Tensor

_SUPPORTED: dict[str, bool] = {}


def _cuda_out_dtype(op: str) -> bool:
    """Whether this torch's CUDA ``op`` ("mm" or "addmm") takes bf16 operands with ``out_dtype=fp32`` (probed once
    on a 2×2 product; the dtype check raises on the host, before any kernel runs)."""
    if op not in _SUPPORTED:
        a = torch.ones(2, 2, device="cuda", dtype=torch.bfloat16)
        c = torch.zeros(2, 2, device="cuda")
        try:
            if op == "mm":
                torch.mm(a, a, out_dtype=torch.float32)
            else:
                torch.addmm(c, a, a, out_dtype=torch.float32, out=c)
            _SUPPORTED[op] = True
        except (RuntimeError, TypeError):
            warnings.warn(f"torch {torch.__version__}: CUDA {op} has no out_dtype for bf16 operands into fp32; the LM "
                          f"head runs those GEMMs on fp32 copies (slower; torch >= 2.10 has it)", stacklevel=3)
            _SUPPORTED[op] = False
    return _SUPPORTED[op]


def mm(a: Tensor, b: Tensor, out_dtype: torch.dtype) -> Tensor:
    """a @ b with fp32 accumulation, returned in ``out_dtype`` (rounded once)."""
    if a.dtype == out_dtype or out_dtype != torch.float32:
        return torch.mm(a, b).to(out_dtype)
    if a.is_cuda and _cuda_out_dtype("mm"):
        return torch.mm(a, b, out_dtype=torch.float32)
    return torch.mm(a.float(), b.float())


def addmm_(acc: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """acc += a @ b for an fp32 ``acc`` and fp32 or 16-bit operands, accumulated in fp32; returns ``acc``."""
    if a.dtype == torch.float32:
        return acc.addmm_(a, b)
    if a.is_cuda and _cuda_out_dtype("addmm"):  # C = C + A B in place (cuBLAS beta = 1): no second fp32 buffer
        return torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
    return acc.addmm_(a.float(), b.float())
