"""torchrun worker for tests/test_dist.py: ``torchrun --nproc_per_node=2 tests/_dist_worker.py OUT.json ARGS...``.

Trains with ``vr1fast.train`` (ARGS are its config overrides), then every rank gathers the full policy weights its
own way (DDP / ZeRO-2: the local replica; FSDP2: ``full_tensor``; ZeRO-3: ``GatheredParameters``) and hashes
them; rank 0 writes each rank's hash, the largest change from the initial tiny model (rounded to the dtype the
weights are held in: DeepSpeed's bf16 block casts them, which alone is no training), and the world size.
Under DDP and FSDP2 it checks rank-0 loading: ``build_models`` after ``dist.prepare`` builds on the meta device on
rank 1 only, and the wrapped policy starts from exactly the initial tiny model (what each rank built itself before).
It also counts the all-gather collectives each rank issues around one ``dist.rollout_call`` greedy generate of
1 and of 4 new tokens on a real prompt: with the weights gathered once per call the count cannot grow with the
number of decode steps.
"""
import faulthandler
import hashlib
import json
import sys

import torch
import torch.distributed as tdist
import torch.distributed.distributed_c10d as c10d

from vr1fast import dist
from vr1fast.cli import parse as parse_args
from vr1fast.data.prompts import build_messages
from vr1fast.data.shuffle import build_shuffle_pair
from vr1fast.model.load import build_models, tiny_model
from vr1fast.precision import precision_plan
from vr1fast.data.loader import next_prompts
from vr1fast.train import build, close, train

GATHERS = [0]     # outermost all-gather calls (all_gather_into_tensor calls all_gather_single: counted once)
DEPTH = [0]
GATHER_FNS = ("all_gather", "all_gather_into_tensor", "all_gather_single", "_all_gather_base", "all_gather_coalesced")


def _count_gathers() -> None:
    """Wrap torch.distributed's all-gathers (before DeepSpeed binds them at init) with a call counter."""
    for name in GATHER_FNS:
        original = getattr(c10d, name, None)
        if original is None:
            continue

        def counted(*args, _original=original, **kwargs):
            GATHERS[0] += DEPTH[0] == 0
            DEPTH[0] += 1
            try:
                return _original(*args, **kwargs)
            finally:
                DEPTH[0] -= 1

        setattr(c10d, name, counted)
        setattr(tdist, name, counted)


def _greedy(model, inputs, tokens: int, pad: int):
    was_training = model.training
    model.eval()
    try:
        return model.generate(**inputs, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False,
                              pad_token_id=pad, synced_gpus=False)
    finally:
        model.train(was_training)


def _gathers_per_generate(run, state) -> dict[int, int]:
    """All-gathers this rank issues for one rollout_call generating exactly 1 and 4 tokens on its next prompt,
    after a first call (which may find some ZeRO-3 parameters still gathered from the training step)."""
    samples, media, _, _ = next_prompts(run.records, run.sampler, state.position, run.cfg, rank=run.info.rank,
                                         world_size=run.info.world_size, seed=12345)
    pair = build_shuffle_pair(run.tokenizer, [build_messages(s, run.cfg.data.eval_mode) for s in samples], media,
                              torch.Generator().manual_seed(0), mode=run.cfg.data.frame_shuffle)
    inputs = pair.ordered.to(run.info.device).model_inputs()
    counts = {}
    for tokens in (1, 1, 4):
        before = GATHERS[0]
        with torch.no_grad():
            out = dist.rollout_call(run.policy, _greedy, inputs, tokens, run.tokenizer.pad_token_id)
        assert out.shape[1] == inputs["input_ids"].shape[1] + tokens
        counts[tokens] = GATHERS[0] - before
    return counts


def full_weights(policy) -> dict[str, torch.Tensor]:
    named = list(policy.runner.named_parameters())
    if policy.zero_stage == 3:
        import deepspeed
        with deepspeed.zero.GatheredParameters([p for _, p in named]):
            return {n: p.detach().clone() for n, p in named}
    return {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone() for n, p in named}


def _hf_name(name: str) -> str:
    return name.removeprefix("module.").removeprefix("model.")


def _built_on_meta(cfg) -> bool:
    """Whether ``build_models`` on this rank, after ``dist.prepare``, gives models on the meta device (DDP / FSDP2
    rank-0 loading: every rank but 0) — all of their tensors, policy and reference alike."""
    info = dist.init(cfg.dist)
    dist.prepare(cfg, info, precision_plan(info.strategy, bool(cfg.train.bf16)), {"video"}, 64)
    models = [m for m in build_models(cfg.model, beta=cfg.loss.beta, dtype="float32", attn="sdpa")[:2] if m]
    tensors = [t for m in models for t in (*m.parameters(), *m.buffers())]
    assert len(models) == 2 and len({t.is_meta for t in tensors}) == 1
    return tensors[0].is_meta


def _starts_from(run, initial: dict[str, torch.Tensor]) -> bool:
    """The wrapped policy holds, bit for bit, the model each rank would build itself (today's loading)."""
    held = {_hf_name(n): t.cpu() for n, t in full_weights(run.policy).items()}
    return all(torch.equal(t, initial[k].to(t.dtype)) for k, t in held.items())


def main() -> None:
    out, argv = sys.argv[1], sys.argv[2:]
    # A run takes ~15 s: a rank still alive after 240 s is stuck; it prints every thread's stack and exits, so the
    # test's failure shows where (the test's own timeout, 420 s, would only say that it timed out).
    faulthandler.dump_traceback_later(240, exit=True)
    faulthandler.enable(all_threads=True)  # an abort (SIGABRT from C++) prints where each Python thread was
    _count_gathers()
    cfg = parse_args(argv)
    initial = tiny_model(cfg.model.tiny_seed)[0].state_dict()  # before ZeRO-3's HfDeepSpeedConfig exists
    meta = _built_on_meta(cfg) if cfg.dist.strategy in ("ddp", "fsdp2") else None
    run, state = build(cfg)
    starts = _starts_from(run, initial)
    train(run, state)
    gathers = _gathers_per_generate(run, state)
    held = {_hf_name(n): t.cpu() for n, t in full_weights(run.policy).items()}
    weights = {k: t.float() for k, t in held.items()}
    digest = hashlib.sha256()
    for name in sorted(weights):
        digest.update(name.encode() + weights[name].numpy().tobytes())
    moved = max((weights[k] - initial[k].to(held[k].dtype).float()).abs().max().item() for k in weights)
    rows = [None] * tdist.get_world_size()
    tdist.all_gather_object(rows, {"rank": run.info.rank, "digest": digest.hexdigest(), "moved": moved,
                                "gathers": gathers, "meta": meta, "starts_from_initial": starts})
    if run.info.is_main:
        with open(out, "w") as f:
            json.dump({"ranks": rows, "world_size": run.info.world_size, "strategy": run.info.strategy}, f)
    close(run)


if __name__ == "__main__":
    main()
