"""torchrun worker for tests/test_sft.py: ``torchrun --nproc_per_node=2 tests/_sft_worker.py OUT.json ARGS...``.

Runs ``vr1fast.sft`` (ARGS are its config overrides), then every rank gathers the full weights its own way (DDP /
ZeRO-2: the local replica; FSDP2: ``full_tensor``) and hashes them in float32 (:func:`digest`); rank 0 writes each
rank's hash, the checkpoint it saved last, and the strategy.
"""
import faulthandler
import hashlib
import json
import sys
from pathlib import Path

import torch
import torch.distributed as tdist

from vr1fast.cli import parse as parse_args
from vr1fast.sft import build, close, train


def digest(weights: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(weights):
        h.update(name.encode() + weights[name].detach().cpu().float().numpy().tobytes())
    return h.hexdigest()


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
    tdist.all_gather_object(rows, {"rank": run.info.rank, "digest": digest(held)})
    if run.info.is_main:
        report = {"ranks": rows, "strategy": run.info.strategy, "checkpoint": str(run.last_checkpoint)}
        Path(out).write_text(json.dumps(report))
    close(run)


if __name__ == "__main__":
    main()
