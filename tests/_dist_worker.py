"""torchrun worker for tests/test_dist.py: ``torchrun --nproc_per_node=2 tests/_dist_worker.py OUT.json ARGS...``.

Trains with ``vr1fast.train`` (ARGS are its config overrides), then every rank gathers the full policy weights its
own way (DDP / ZeRO-2: the local replica; FSDP2: ``full_tensor``; ZeRO-3: ``GatheredParameters``) and hashes
them; rank 0 writes each rank's hash, the largest change from the initial tiny model, and the world size.
"""
import hashlib
import json
import sys

import torch
import torch.distributed as tdist

from vr1fast.config import parse_args
from vr1fast.model.load import tiny_model
from vr1fast.train import build, close, train


def _full_weights(policy) -> dict[str, torch.Tensor]:
    named = list(policy.runner.named_parameters())
    if policy.zero_stage == 3:
        import deepspeed
        with deepspeed.zero.GatheredParameters([p for _, p in named]):
            return {n: p.detach().clone() for n, p in named}
    return {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone() for n, p in named}


def _hf_name(name: str) -> str:
    return name.removeprefix("module.").removeprefix("model.")


def main() -> None:
    out, argv = sys.argv[1], sys.argv[2:]
    cfg = parse_args(argv)
    initial = tiny_model(cfg.model.tiny_seed)[0].state_dict()  # before ZeRO-3's HfDeepSpeedConfig exists
    run, state = build(cfg)
    train(run, state)
    weights = {_hf_name(n): t.float().cpu() for n, t in _full_weights(run.policy).items()}
    digest = hashlib.sha256()
    for name in sorted(weights):
        digest.update(name.encode() + weights[name].numpy().tobytes())
    moved = max((weights[k] - initial[k]).abs().max().item() for k in weights)
    rows = [None] * tdist.get_world_size()
    tdist.all_gather_object(rows, {"rank": run.info.rank, "digest": digest.hexdigest(), "moved": moved})
    if run.info.is_main:
        with open(out, "w") as f:
            json.dump({"ranks": rows, "world_size": run.info.world_size, "strategy": run.info.strategy}, f)
    close(run)


if __name__ == "__main__":
    main()
