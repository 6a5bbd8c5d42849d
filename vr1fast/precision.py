"""The precision plan: which dtypes the policy and the frozen reference compute in, per strategy.

One function of the strategy and the resolved ``train.bf16`` (:func:`precision_plan`), read by every place that
decides precision: ``train`` (the dtype both models are built in), ``dist`` (FSDP2's mixed precision, the
autocast around every forward), ``dist.deepspeed`` (DeepSpeed's bf16 block). It does not depend on the device, so
CPU tests run the GPU plan under CPU bf16 autocast.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from vr1fast.errors import ConfigError


@dataclass(frozen=True)
class Precision:
    """How the policy and the frozen reference compute under one strategy (:func:`precision_plan`)."""

    master: torch.dtype                 # dtype both models are built in; the policy's optimizer updates it
    autocast: Optional[torch.dtype]     # torch.autocast around every policy and reference forward (None: off)
    fsdp_param: Optional[torch.dtype]   # FSDP2 MixedPrecisionPolicy.param_dtype of both models (None: as built)
    deepspeed_bf16: bool                # the DeepSpeed config's bf16 block (both engines cast their parameters)

    def describe(self, built: str = "policy and reference") -> str:
        """One line for the run log: what ``built`` (the models) are built and compute in."""
        if self.autocast is not None:
            how = f"{_name(self.autocast)} autocast"
        elif self.fsdp_param is not None:
            how = f"FSDP2 param_dtype {_name(self.fsdp_param)}, gradients reduced in float32"
        elif self.deepspeed_bf16:
            how = "DeepSpeed bf16 (parameters bfloat16, float32 master copy in the optimizer)"
        else:
            how = "no mixed precision"
        return f"{built} built in {_name(self.master)}, {how}"


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def precision_plan(strategy: str, bf16: bool) -> Precision:
    """The precision of a run: a function of the strategy and the resolved ``train.bf16`` only, not of the device
    (CPU tests run the GPU plan under CPU bf16 autocast).

    Rule: the reference computes exactly as the policy does at step 1, so the k3 KL of step 1 is exactly 0 with a
    zero KL gradient, as in Video-R1 (there both are DeepSpeed bf16 modules). Both models are therefore built in
    the same dtype and wrapped by the same mixed-precision mechanism:

    * ``none`` / ``ddp``: fp32 parameters (AdamW on bf16 weights would lose lr-1e-6 updates to rounding) under
      bf16 autocast; the reference stays fp32 under the same autocast. A bf16 copy of it would differ: RMSNorm
      multiplies by its weight and the residual stream adds in the weights' dtype, fp32 here, bf16 there. Cost:
      the reference takes 4 bytes per parameter instead of 2 (15 GB more at 7B).
    * ``fsdp2``: fp32 sharded parameters with ``MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)`` on
      both: every unit computes in pure bf16, as Video-R1's DeepSpeed modules do; no autocast.
    * ``deepspeed``: both built fp32 and handed to a DeepSpeed engine with the same bf16 block, which casts the
      parameters (its version decides whether buffers such as the rotary ``inv_freq`` are cast too; both models
      get the same rule); the optimizer keeps the fp32 master copy; no autocast.

    With ``bf16`` false every strategy computes in fp32. ``model.dtype`` other than "auto" replaces ``master``
    for both models (the caller's choice)."""
    if strategy not in ("none", "ddp", "fsdp2", "deepspeed"):
        raise ConfigError(f"precision_plan: unknown strategy {strategy!r}")
    half = torch.bfloat16 if bf16 else None
    return Precision(torch.float32, autocast=half if strategy in ("none", "ddp") else None,
                     fsdp_param=half if strategy == "fsdp2" else None,
                     deepspeed_bf16=bf16 and strategy == "deepspeed")
