"""torchrun worker for tests/test_sft.py: ``torchrun --nproc_per_node=2 tests/_sft_worker.py OUT.json ARGS...``.

Runs ``vr1fast.sft`` (ARGS are its config overrides), then every rank gathers the full weights its own way (DDP /
ZeRO-2: the local replica; FSDP2: ``full_tensor``) and hashes them in float32; rank 0 writes each rank's hash, the
hash of the HF checkpoint it saved last, and the strategy.
"""
import faulthandler
import hashlib
import json
import sys
from pathlib import Path

import torch
import torch.distributed as tdist
from transformers import Qwen2_5_VLForConditionalGeneration

from vr1fast.cli import parse as parse_args
from vr1fast.sft import build, close, train


def _digest(weights: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for name in sorted(weights):
        digest.update(name.encode() + weights[name].detach().cpu().float().numpy().tobytes())
    return digest.hexdigest()


def main() -> None:
    out, argv = sys.argv[1], sys.argv[2:]
    faulthandler.dump_traceback_later(240, exit=True)  # a stuck rank prints every thread's stack and exits
    faulthandler.enable(all_threads=True)
    run, state = build(parse_args(argv))
    train(run, state)
    named = run.policy.runner.named_parameters()
    held = {n.removeprefix("module.").removeprefix("model."): (p.full_tensor() if hasattr(p, "full_tensor") else p)
            for n, p in named}
    rows = [None] * tdist.get_world_size()
    tdist.all_gather_object(rows, {"rank": run.info.rank, "digest": _digest(held)})
    if run.info.is_main:
        saved = Qwen2_5_VLForConditionalGeneration.from_pretrained(run.last_checkpoint / "model").state_dict()
        report = {"ranks": rows, "strategy": run.info.strategy, "checkpoint_digest": _digest(saved)}
        Path(out).write_text(json.dumps(report))
    close(run)


if __name__ == "__main__":
    main()
