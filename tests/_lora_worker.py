"""torchrun worker for tests/test_lora_dist.py: ``torchrun --nproc_per_node=2 tests/_lora_worker.py OUT ARGS...``
(or ``python tests/_lora_worker.py OUT ARGS...``: one process, DeepSpeed makes a group of one).

Builds the LoRA policy with every lora_B drawn at random (:func:`perturbed_models`, also used by
tests/model/test_lora.py; with ``--train.resume`` the checkpoint's adapters instead), trains with ``vr1fast.train`` (ARGS: its config overrides, LoRA on), then on every rank:
runs the reference (the policy with adapters disabled, through the strategy's forward) and a fresh base model on one
prompt, gathers the full weights its strategy's way and hashes the adapters. Rank 0 writes, per rank, the adapter
hash, the largest change of any base weight and the smallest change of any adapter tensor, and the reference's
largest logit difference from the base; and ``OUT.adapters.pt``: its gathered adapters under peft's saved keys.
"""
import faulthandler
import hashlib
import json
import sys

import torch
import torch.distributed as tdist

from _dist_worker import full_weights
from vr1fast.cli import parse as parse_args
from vr1fast.model.load import build_models, tiny_model
from vr1fast.train import build, close, train

IDS = torch.tensor([[3, 17, 42, 99, 7, 56, 100, 12, 5]])


def perturbed_models(cfg):
    """``build_models`` (fp32, SDPA) with every lora_B drawn at random (seeded, equal on every rank): peft's B = 0
    makes the adapted policy the base, and the tiny model's all-zero rewards would then give no gradient at all."""
    policy, ref, tokenizer = build_models(cfg.model, beta=cfg.loss.beta, dtype="float32", attn="sdpa")
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in policy.named_parameters():
            if ".lora_B." in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    return policy, ref, tokenizer


def _peft_key(name: str) -> str:
    """Runner parameter name → the key peft saves (``base_model.model.<hf key without the adapter name>``)."""
    return "base_model.model." + name.removeprefix("module.").removeprefix("model.").replace(".default.", ".")


def _report(run, initial: dict[str, torch.Tensor], base: torch.Tensor, start: dict[str, torch.Tensor]):
    """(this rank's row, the gathered adapters under peft's keys); ``base``: a fresh base model's logits on IDS."""
    with torch.no_grad():
        ref = run.ref.runner(lambda model, ids: model(input_ids=ids).logits, IDS)
    weights = {n.removeprefix("module.").removeprefix("model."): t.float() for n, t in
               full_weights(run.policy).items()}
    adapters = {k: v for k, v in weights.items() if ".lora_" in k}
    digest = hashlib.sha256()
    for name in sorted(adapters):
        digest.update(name.encode() + adapters[name].numpy().tobytes())
    base_moved = max((v - initial[k.replace(".base_layer", "")]).abs().max().item()
                     for k, v in weights.items() if k not in adapters)
    return ({"rank": run.info.rank, "digest": digest.hexdigest(), "base_moved": base_moved,
             "adapter_moved": min(((v - start[k]).abs().max().item() for k, v in adapters.items() if k in start),
                                  default=None),
             "ref_vs_base": (ref - base).abs().max().item()},
            {_peft_key("model." + k): v for k, v in adapters.items()})


def main() -> None:
    out, argv = sys.argv[1], sys.argv[2:]
    faulthandler.dump_traceback_later(240, exit=True)  # a stuck rank prints every thread's stack and exits
    faulthandler.enable(all_threads=True)
    cfg = parse_args(argv)
    base_model = tiny_model(cfg.model.tiny_seed)[0].eval()  # before ZeRO-3's HfDeepSpeedConfig exists
    initial = base_model.state_dict()
    with torch.no_grad():
        base = base_model(input_ids=IDS).logits
    models = perturbed_models(cfg) if cfg.train.resume == "none" else None  # resuming: the checkpoint's adapters
    start = {n: p.detach().clone() for n, p in models[0].named_parameters() if ".lora_" in n} if models else {}
    run, state = build(cfg, models)
    train(run, state)
    row, adapters = _report(run, initial, base, start)
    rows = [None] * tdist.get_world_size()
    tdist.all_gather_object(rows, row)
    if run.info.is_main:
        torch.save(adapters, out + ".adapters.pt")
        with open(out, "w") as f:
            json.dump({"ranks": rows, "world_size": run.info.world_size, "strategy": run.info.strategy}, f)
    close(run)


if __name__ == "__main__":
    main()
