"""The paged decoder (``rollout.paged``) against the HF model's own forward on the tiny Qwen2.5-VL in float32:
packed prefill of a video and an image prompt of different lengths, then decode steps of 2 samples per prompt whose
tokens differ, over 4-token pages whose unused slots are NaN. The tiny model has init std 0.1, so logits are peaked
and position-sensitive (an off-by-one M-RoPE position moves them by ~0.3)."""
import pytest
import torch

from media import prompt_inputs
from vr1fast.data.dataset import load_records
from vr1fast.data.synthetic import generate_synthetic
from vr1fast.model.forward import expand_prompts, prompt_embeds, prompt_positions
from vr1fast.model.load import tiny_model
from vr1fast.model.tokenizer import TEXT_VOCAB_SIZE
from vr1fast.rollout.kv_pool import pages_needed
from vr1fast.rollout.paged import CascadeTables, decode_one_token, new_pool, prefill

G, STEPS, PAGE = 2, 6, 4
ATOL = 2e-5


@pytest.fixture(scope="module")
def model_tok():
    model, tok = tiny_model(0, init_std=0.1)
    return model.eval(), tok


@pytest.fixture(scope="module")
def inputs(model_tok, tmp_path_factory):
    """An 8-frame video prompt and a (shorter) image prompt, left-padded."""
    samples = load_records(generate_synthetic(tmp_path_factory.mktemp("syn"), n=8, seed=0).rl_json)
    batch = prompt_inputs(model_tok[1], [(samples[0], 8), (samples[6], 0)])
    lengths = batch["attention_mask"].sum(1)
    assert lengths[0] != lengths[1]
    return batch


def hf_logits(model, inputs, completion):
    """HF's full forward on every prompt repeated G times + its sample's tokens: logits [B·G, P + L, V]."""
    rep = expand_prompts(inputs, G)
    rep["input_ids"] = torch.cat([rep["input_ids"], completion], 1)
    rep["attention_mask"] = torch.cat([rep["attention_mask"], torch.ones_like(completion)], 1)
    rep["mm_token_type_ids"] = torch.cat([rep["mm_token_type_ids"], torch.zeros_like(completion)], 1)
    with torch.no_grad():
        return model(**rep, use_cache=False).logits


def paged_rollout(model, inputs, completion):
    """Prefill the packed prompts, fork G samples each, feed each sample its completion tokens one by one:
    (prefill logits [B, V], decode logits [STEPS, B·G, V])."""
    real = inputs["attention_mask"].bool()
    lengths = real.sum(1).tolist()
    pool = new_pool(model, num_pages=pages_needed(lengths, G, STEPS, PAGE) + 2, page_size=PAGE)
    pool.k.fill_(float("nan"))
    pool.v.fill_(float("nan"))
    bm = pool.blocks
    prompts = [bm.allocate(n) for n in lengths]
    embeds = prompt_embeds(model, inputs)[real]
    positions = prompt_positions(model, inputs)[:, real]
    cu = torch.tensor([0, *lengths]).cumsum(0)
    slots = torch.cat([bm.slots(p, 0, n) for p, n in zip(prompts, lengths)])
    first = prefill(model, pool, embeds, positions, cu, slots)
    last_pos = positions[0, cu[1:] - 1]
    samples = [s for p in prompts for s in bm.fork(p, G)]
    groups = torch.arange(len(prompts)).repeat_interleave(G)
    prefix = (bm.page_table(prompts), torch.tensor(lengths))
    for p in prompts:
        bm.free(p)                     # the samples hold the prompt pages from here on
    steps = []
    for k in range(STEPS):
        for s in samples:
            bm.append(s)
        tables = CascadeTables(*prefix, groups, bm.page_table(samples), torch.tensor([bm.length(s) for s in samples]))
        step_slots = torch.cat([bm.slots(s, k, k + 1) for s in samples])
        steps.append(decode_one_token(model, pool, completion[:, k], last_pos[groups] + 1 + k, step_slots, tables))
    assert torch.isnan(pool.k).any()   # unused slots stayed NaN: nothing past a length was read
    return first, torch.stack(steps)


def test_prefill_and_decode_equal_hf_forward(model_tok, inputs):
    model, _ = model_tok
    g = torch.Generator().manual_seed(0)
    completion = torch.randint(0, TEXT_VOCAB_SIZE, (2 * G, STEPS), generator=g)
    first, steps = paged_rollout(model, inputs, completion)
    ref = hf_logits(model, inputs, completion)
    P = inputs["input_ids"].shape[1]
    torch.testing.assert_close(first, ref[::G, P - 1], rtol=0, atol=ATOL)
    for k in range(STEPS):
        torch.testing.assert_close(steps[k], ref[:, P + k], rtol=0, atol=ATOL)
    assert (steps[:, 0] - steps[:, 1]).abs().max() > 0.1   # the siblings' own tokens matter


def test_a_weight_update_is_seen_without_a_copy(model_tok, inputs):
    model, _ = model_tok
    completion = torch.randint(0, TEXT_VOCAB_SIZE, (2 * G, STEPS), generator=torch.Generator().manual_seed(1))
    weight = model.model.language_model.layers[0].mlp.up_proj.weight
    saved = weight.detach().clone()
    try:
        with torch.no_grad():
            weight.mul_(1.5)
        first, steps = paged_rollout(model, inputs, completion)
        ref = hf_logits(model, inputs, completion)
    finally:
        with torch.no_grad():
            weight.copy_(saved)
    P = inputs["input_ids"].shape[1]
    torch.testing.assert_close(first, ref[::G, P - 1], rtol=0, atol=ATOL)
    torch.testing.assert_close(steps[-1], ref[:, P + STEPS - 1], rtol=0, atol=ATOL)
    unchanged, _ = paged_rollout(model, inputs, completion)
    assert (unchanged - first).abs().max() > 1e-3
