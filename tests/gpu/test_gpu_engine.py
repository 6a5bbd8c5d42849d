"""The paged rollout engine on a CUDA GPU with its compiled pieces: Triton prefill and cascade decode, the C++ block
manager, decode steps replayed from CUDA graphs.

The tiny Qwen2.5-VL in float32 on three short prompts (a 2-frame video, an image, a 4-frame video): greedy completions
from CUDA graphs (bucket 9, then smaller ones as samples stop), from eager decoding and with cascade off all
equal HF generate's token for token; one decode step with the Triton kernels makes no host sync (CUDA's sync debug
mode raises on one). Run by scripts/gpu_validate.sh (``--only engine``); skipped elsewhere.
"""
from __future__ import annotations

import pytest
import torch

from gpu_util import mixed_prompts
from vr1fast.model.load import tiny_model
from vr1fast.rollout import generate
from vr1fast.rollout import graphs as graphs_module
from vr1fast.rollout.engine import Sampling, paged_generate
from vr1fast.rollout.kv_pool import pages_needed
from vr1fast.rollout.paged import CascadeTables, Kernels, decode_one_token, new_pool

pytestmark = pytest.mark.gpu
MAX_NEW, PAGE = 24, 4


@pytest.fixture(scope="module")
def model_inputs():
    model, tok = tiny_model(0, init_std=0.1)
    return model.cuda().eval(), mixed_prompts(tok, ((2, 56, 56, 3), (56, 84, 3), (4, 84, 56, 3)))


def test_graphs_eager_and_cascade_off_equal_hf(model_inputs, monkeypatch):
    model, inputs = model_inputs
    never = model.config.get_text_config().vocab_size - 1
    free = generate(model, inputs, num_samples=1, max_new_tokens=MAX_NEW, greedy=True, eos_token_id=never, engine="hf")
    stops = [int(free.ids[0, 2]), int(free.ids[1, 5])]
    hf = generate(model, inputs, num_samples=3, max_new_tokens=MAX_NEW, greedy=True, eos_token_id=stops, engine="hf")
    captured = []
    capture = graphs_module.DecodeGraphs._capture
    monkeypatch.setattr(graphs_module.DecodeGraphs, "_capture", lambda self, b: captured.append(b) or capture(self, b))
    for flags in (dict(), dict(cuda_graphs=False), dict(cascade=False)):
        out = paged_generate(model, inputs, num_samples=3, max_new_tokens=MAX_NEW, sampling=Sampling(greedy=True),
                             eos_token_id=stops, page_size=PAGE, **flags)
        assert torch.equal(out.ids, hf.ids) and torch.equal(out.lengths, hf.lengths), flags
    # graphs from bucket 9 down as samples stop, again for the cascade-off call; none for the eager one
    assert captured[0] == 9 and captured.count(9) == 2 and set(captured) <= {9, 8, 4, 2, 1}, captured


def test_decode_step_has_no_host_sync(model_inputs):
    model, _ = model_inputs
    lengths, samples = [37, 20], [3, 2]
    pool = new_pool(model, pages_needed(lengths, samples, 8, PAGE), PAGE)
    bm, kernels = pool.blocks, Kernels.for_device("cuda", 3)
    assert kernels.capturable
    prompts = [bm.allocate(n) for n in lengths]
    seqs = [f for s, g in zip(prompts, samples) for f in bm.fork(s, g)]
    for s in seqs:
        bm.append(s)
    pool.k.normal_(), pool.v.normal_()
    S = len(seqs)
    tables = CascadeTables(bm.page_table(prompts).cuda(), torch.tensor(lengths, device="cuda"),
                           torch.tensor([0, 0, 0, 1, 1], device="cuda"), bm.page_table(seqs, 2).cuda(),
                           torch.ones(S, dtype=torch.long, device="cuda"))
    slots = torch.cat([bm.slots(s, 0, 1) for s in seqs]).cuda()
    tokens, positions = torch.randint(0, 100, (S,), device="cuda"), torch.arange(S, device="cuda") + 40
    decode_one_token(model, pool, tokens, positions, slots, tables, kernels)  # compiles the kernels
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        logits = decode_one_token(model, pool, tokens, positions, slots, tables, kernels)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert logits.shape == (S, model.config.get_text_config().vocab_size) and logits.isfinite().all()
