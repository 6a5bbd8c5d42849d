"""Shared Triton plumbing: interpreter flag, an upcast helper, a launch record and the AOT compile check.

Every kernel file builds a :class:`Launch` (kernel, grid, runtime args by name, constexprs, warps, stages) and calls
it, and lists in ``aot_variants()`` the launches of every constexpr variant its launchers can produce (built from
meta tensors). Tests run those kernels under ``TRITON_INTERPRET=1`` and compile every variant for a real GPU with
:func:`aot_check` (no GPU needed; it runs in a fresh process because interpreted kernels cannot be compiled).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from typing import Any, Optional

import torch
import triton
import triton.language as tl

# The interpreter stores bf16 as raw uint16 bits (triton 3.9): every bf16 load is upcast before arithmetic.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def dot_operand(x, UPCAST: tl.constexpr):
    """``tl.dot`` operand: fp32 under the interpreter (pass UPCAST=INTERPRET), native dtype on a GPU."""
    if UPCAST:
        return x.to(tl.float32)
    return x


def check_device(name: str, *tensors: torch.Tensor) -> None:
    """Triton runs CUDA tensors, or CPU tensors under the interpreter; all on one device."""
    devices = {t.device for t in tensors}
    if len(devices) != 1:
        raise ValueError(f"{name}: tensors on several devices {sorted(map(str, devices))}")
    device = devices.pop()
    if device.type != "cuda" and not INTERPRET:
        raise RuntimeError(f"{name}: Triton needs CUDA tensors (or TRITON_INTERPRET=1), got {device}")


def autocast_dtype(device: torch.device) -> Optional[torch.dtype]:
    """The active autocast dtype on ``device``'s type, or None when autocast is off there."""
    return torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else None


def autocast_inputs(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The tensors cast to the active autocast dtype of their device (``torch.get_autocast_dtype``), as cuBLAS
    calls under autocast would be; unchanged when autocast is off there or they are not floating point.

    A custom ``autograd.Function`` is outside autocast's reach (and ``custom_fwd(device_type="cuda")`` ignores CPU
    autocast), so without this fp32 master weights under bf16 autocast would run the head in fp32 (docs/kernel-audit.md
    F1). The cast is differentiable: gradients come back in the tensors' own dtype."""
    dtype = autocast_dtype(tensors[0].device)
    if dtype is None:
        return tensors
    return tuple(t.to(dtype) if t.is_floating_point() else t for t in tensors)


def check_head(hidden: torch.Tensor, weight: torch.Tensor, index: torch.Tensor, temperature: float, dtypes: tuple,
               cast: bool = False) -> None:
    """The LM-head launchers' input check (both designs): shapes, devices, dtypes (one of ``dtypes``) and
    temperature; with ``cast`` (the head computes on copies in one dtype) hidden and weight may differ in dtype."""
    check_device("linear_logprobs", hidden, weight, index)
    if hidden.shape[:-1] != index.shape or weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"linear_logprobs: hidden {tuple(hidden.shape)}, weight {tuple(weight.shape)} and index "
                         f"{tuple(index.shape)} do not fit ([..., H], [V, H], [...])")
    if (hidden.dtype != weight.dtype and not cast) or hidden.dtype not in dtypes or weight.dtype not in dtypes:
        raise ValueError(f"linear_logprobs: hidden dtype {hidden.dtype} and weight dtype {weight.dtype} must be "
                         f"the same, one of {dtypes}")
    if not temperature > 0:
        raise ValueError(f"linear_logprobs: temperature must be > 0, got {temperature}")
    if index.dtype.is_floating_point:
        raise ValueError(f"linear_logprobs: index dtype {index.dtype} is not an integer type")
    # A device-side check would cost a host sync on GPU, so there ids are not checked: the fused head gives a NaN
    # log-prob for an out-of-range id, the chunked head and the logits kernels read outside the row (garbage).
    if not index.is_cuda and index.numel() and (index.min() < 0 or index.max() >= weight.shape[0]):
        raise ValueError(f"linear_logprobs: index values must lie in [0, {weight.shape[0]}), got "
                         f"[{int(index.min())}, {int(index.max())}]")


_DTYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64",
           torch.int64: "i64", torch.int32: "i32", torch.int8: "i8", torch.uint8: "u8"}


@dataclass
class Launch:
    """One kernel launch: runtime args by name (tensors, ints, floats) and compile-time constants."""

    kernel: Any
    grid: tuple[int, ...]
    args: dict[str, Any]
    constexprs: dict[str, Any]
    num_warps: int = 4
    num_stages: int = 2

    def __call__(self) -> None:
        self.kernel[self.grid](**self.args, **self.constexprs, num_warps=self.num_warps,
                               num_stages=self.num_stages)

    def signature(self) -> dict[str, str]:
        """Triton type strings of the arguments, as the JIT launcher would type them."""
        sig = {}
        for name, value in self.args.items():
            if isinstance(value, torch.Tensor):
                sig[name] = "*" + _DTYPES[value.dtype]
            elif isinstance(value, bool):
                sig[name] = "i1"
            elif isinstance(value, int):
                sig[name] = "i32" if -2**31 <= value < 2**31 else "i64"
            else:
                sig[name] = "fp32"
        return sig | {name: "constexpr" for name in self.constexprs}


def _jit_aligned(value: Any) -> bool:
    """The JIT's specialisation: tensors are 16-byte aligned (every torch allocation is), ints divisible by 16."""
    return isinstance(value, torch.Tensor) or (type(value) is int and value % 16 == 0)


def aot_compile(launch: Launch, arch: int = 90):
    """Compile ``launch``'s kernel for ``cuda:sm_<arch>`` without a GPU, specialised as the JIT would at these
    arguments (16-byte divisibility hints: without them Triton builds unpipelined loads and a smaller shared-memory
    footprint, so an overflow at real shapes would pass); returns the compiled kernel."""
    from triton.backends.compiler import GPUTarget

    params = launch.kernel.arg_names
    sig = launch.signature()
    attrs = {(i,): [["tt.divisibility", 16]] for i, p in enumerate(params)
             if p in launch.args and _jit_aligned(launch.args[p])}
    src = triton.compiler.ASTSource(fn=launch.kernel, signature={p: sig[p] for p in params},
                                    constexprs=dict(launch.constexprs), attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32),
                          options={"num_warps": launch.num_warps, "num_stages": launch.num_stages})


_AOT_SCRIPT = """
import importlib, json, sys
from vr1fast.kernels._triton import aot_compile, resource_usage
out = []
for launch in importlib.import_module(sys.argv[1]).aot_variants():
    k = aot_compile(launch, int(sys.argv[2]))
    out.append(dict(kernel=launch.kernel.__name__, constexprs=launch.constexprs, signature=launch.signature(),
                    shared=k.metadata.shared, cubin=len(k.asm.get("cubin", b"")),
                    async_copies=k.asm["ttgir"].count("async_copy"), **resource_usage(k.asm["cubin"])))
print(json.dumps(out))
"""


def resource_usage(cubin: bytes) -> dict[str, int]:
    """Registers per thread and local-memory bytes (register spills) of a cubin, from the cuobjdump that ships
    with Triton's NVIDIA backend: ``{"registers": REG, "local": LOCAL, "stack": STACK}``."""
    import re
    import tempfile

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    fields = dict(re.findall(r"(REG|STACK|LOCAL):(\d+)", text))
    return {"registers": int(fields["REG"]), "local": int(fields["LOCAL"]), "stack": int(fields["STACK"])}


def aot_check(module: str, arch: int = 90) -> list[dict]:
    """Compile ``module.aot_variants()`` for sm_<arch> in a fresh non-interpreted process: one dict per launch
    (kernel name, constexprs, signature, shared memory bytes, cubin size, pipelined-load count, registers, local
    memory = spilled bytes). Raises with the compiler's message on failure."""
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_DEFAULT_FP_FUSION": "1"}
    proc = subprocess.run([sys.executable, "-c", _AOT_SCRIPT, module, str(arch)], env=env, capture_output=True,
                          text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"AOT compile of {module} for sm_{arch} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])
