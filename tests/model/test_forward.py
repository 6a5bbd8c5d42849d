"""completion_hidden (vision once per prompt, completion positions only, packed), in both layouts (prompt once
per group, and repeated per completion), against Video-R1's full-logits path.

The model is the tiny Qwen2.5-VL with init std 0.1, so logits are peaked and position-sensitive: a 1-D or
off-by-one M-RoPE position changes log-probs by ~0.3, a thousand times the tolerance used here.
"""
import pytest
import torch

from media import prompt_inputs
from vr1fast.kernels.reference import selective_log_softmax
from vr1fast.model.forward import (completion_hidden, completion_logprobs_reference, completion_rows,
                                   expand_prompts, offsets_of, prompt_positions, repeated_hidden,
                                   sequence_positions)
from vr1fast.kernels.reference import pack
from vr1fast.model.load import tiny_model
from vr1fast.model.tokenizer import TEXT_VOCAB_SIZE

G, L = 3, 9


@pytest.fixture(scope="module")
def model_tok():
    model, tok = tiny_model(0, init_std=0.1)
    return model.eval(), tok


def completions(batch, pad, seed=0, vocab=TEXT_VOCAB_SIZE):
    """Random text-token completions [B·G, L] of random lengths (row 0 full), pad after the end."""
    g = torch.Generator().manual_seed(seed)
    n = batch["input_ids"].shape[0] * G
    ids = torch.randint(0, vocab, (n, L), generator=g)
    lengths = torch.randint(1, L + 1, (n,), generator=g)
    lengths[0] = L
    mask = (torch.arange(L)[None] < lengths[:, None]).long()
    return ids.masked_fill(mask == 0, pad), mask


SHARE = pytest.mark.parametrize("share", [True, False], ids=["prompt_once", "repeated"])


def fast_logprobs(model, batch, ids, mask, share=True):
    """Packed log-probs [N] of the real completion tokens (completion after completion)."""
    hidden, weight = completion_hidden(model, batch, ids, mask, num_samples=G, share_prompt=share)
    assert hidden.shape == (int(mask.sum()), model.config.text_config.hidden_size)
    assert weight is model.lm_head.weight
    return selective_log_softmax(hidden @ weight.T, ids[mask.bool()])


@SHARE
def test_completion_rows_pack_the_real_tokens(model_tok, mixed, share):
    """The packed record holds exactly the masked-in rows of the repeated layout's hidden states, completion after
    completion, and its log-probs equal the full-logits reference's on those tokens."""
    model, tok = model_tok
    ids, mask = completions(mixed, tok.pad_token_id, seed=3)
    lengths = mask.sum(1)
    rows = completion_rows(model, mixed, ids, lengths.tolist(), num_samples=G, share_prompt=share)
    hidden, weight = repeated_hidden(model, mixed, ids, mask, num_samples=G)
    assert rows.offsets.tolist() == [0, *lengths.cumsum(0).tolist()] and rows.weight is weight
    assert rows.hidden.shape == (int(lengths.sum()), hidden.shape[-1]) and torch.equal(rows.ids, ids[mask.bool()])
    torch.testing.assert_close(rows.hidden, hidden[mask.bool()], rtol=0, atol=1e-5 if share else 1e-6)
    ref = completion_logprobs_reference(model, mixed, ids, mask, num_samples=G)
    torch.testing.assert_close(selective_log_softmax(rows.hidden @ weight.T, rows.ids), ref[mask.bool()],
                               atol=2e-5, rtol=0)
    x = torch.arange(12.0).reshape(3, 4)
    assert pack(x, offsets_of([2, 0, 3])).tolist() == [0.0, 1.0, 8.0, 9.0, 10.0]
    with pytest.raises(ValueError, match="do not fit"):
        completion_rows(model, mixed, ids, [L + 1] + lengths.tolist()[1:], num_samples=G)


def test_prompts_are_left_padded(mixed):
    lengths = mixed["attention_mask"].sum(1)
    assert len(set(lengths.tolist())) == 3 and mixed["attention_mask"][:, -1].all()
    assert mixed["pixel_values"] is not None and mixed["video_grid_thw"].shape[0] == 2


@SHARE
def test_fast_path_equals_full_logits_reference(model_tok, mixed, share):
    model, tok = model_tok
    ids, mask = completions(mixed, tok.pad_token_id)
    fast = fast_logprobs(model, mixed, ids, mask, share)
    ref = completion_logprobs_reference(model, mixed, ids, mask, num_samples=G)
    m = mask.bool()
    assert ref[m].std() > 0.5  # peaked, varied log-probs: the comparison can fail
    torch.testing.assert_close(fast, ref[m], atol=2e-5, rtol=0)


@SHARE
def test_batched_equals_single_prompt(model_tok, samples, mixed, share):
    model, tok = model_tok
    ids, mask = completions(mixed, tok.pad_token_id, seed=1)
    batched = fast_logprobs(model, mixed, ids, mask, share)
    offsets = offsets_of(mask.sum(1))
    for b, pick in enumerate([(samples[0], 8), (samples[6], 0), (samples[3], 4)]):
        single = prompt_inputs(tok, [pick])
        rows = slice(b * G, (b + 1) * G)
        alone = fast_logprobs(model, single, ids[rows], mask[rows], share)
        torch.testing.assert_close(batched[offsets[b * G]:offsets[(b + 1) * G]], alone, atol=2e-5, rtol=0)


def test_positions_equal_get_rope_index_on_full_sequence(model_tok, mixed):
    model, tok = model_tok
    ids, mask = completions(mixed, tok.pad_token_id)
    ours = sequence_positions(prompt_positions(model, mixed), G, L)
    rep = expand_prompts(mixed, G)
    full_mask = torch.cat([rep["attention_mask"], mask], 1)
    hf, _ = model.model.get_rope_index(
        torch.cat([rep["input_ids"], ids], 1), torch.cat([rep["mm_token_type_ids"], torch.zeros_like(ids)], 1),
        image_grid_thw=rep["image_grid_thw"], video_grid_thw=rep["video_grid_thw"],
        second_per_grid_ts=rep["second_per_grid_ts"], attention_mask=full_mask)
    valid = full_mask.bool()[None].expand(3, -1, -1)
    assert torch.equal(ours[valid], hf[valid])
    assert ours[0].max() > ours[1].max() or not torch.equal(ours[0], ours[1])  # truly 3-D positions


@SHARE
def test_gradients_equal_reference(model_tok, mixed, share):
    model, tok = model_tok
    ids, mask = completions(mixed, tok.pad_token_id, seed=2)
    weights = torch.randn(ids.shape, generator=torch.Generator().manual_seed(3)) * mask
    params = [model.lm_head.weight, model.model.visual.blocks[0].mlp.up_proj.weight,
              model.model.language_model.embed_tokens.weight,
              model.model.language_model.layers[1].self_attn.q_proj.weight]
    grads = []
    for fn in (lambda m, b, i, k: fast_logprobs(m, b, i, k, share),
               lambda m, b, i, k: completion_logprobs_reference(m, b, i, k, num_samples=G)[k.bool()]):
        loss = (fn(model, mixed, ids, mask) * weights[mask.bool()]).sum()
        grads.append(torch.autograd.grad(loss, params))
    for fast, ref in zip(*grads):
        assert ref.abs().max() > 0
        torch.testing.assert_close(fast, ref, atol=1e-5, rtol=1e-4)


@SHARE
def test_vision_tower_runs_once_per_prompt(model_tok, mixed, share):
    model, tok = model_tok
    ids, mask = completions(mixed, tok.pad_token_id)
    rows = []
    handle = model.model.visual.register_forward_hook(lambda mod, args, out: rows.append(args[0].shape[0]))
    try:
        with torch.no_grad():
            completion_hidden(model, mixed, ids, mask, num_samples=G, share_prompt=share)
            fast_rows, rows[:] = sum(rows), []
            completion_logprobs_reference(model, mixed, ids, mask, num_samples=G)
    finally:
        handle.remove()
    pixels = mixed["pixel_values"].shape[0] + mixed["pixel_values_videos"].shape[0]
    assert fast_rows == pixels and sum(rows) == G * pixels


@SHARE
def test_bad_inputs(model_tok, mixed, share):
    model, tok = model_tok
    ids, mask = completions(mixed, tok.pad_token_id)
    no_types = {k: v for k, v in mixed.items() if k != "mm_token_type_ids"}
    with pytest.raises(ValueError, match="mm_token_type_ids"):
        completion_hidden(model, no_types, ids, mask, num_samples=G, share_prompt=share)
    with pytest.raises(ValueError, match=r"\[B·G, L\]"):
        completion_hidden(model, mixed, ids[:-1], mask[:-1], num_samples=G, share_prompt=share)
    holes = mask.clone()
    holes[0, 1] = 0
    with pytest.raises(ValueError, match="prefix mask"):
        completion_hidden(model, mixed, ids, holes, num_samples=G, share_prompt=share)


@SHARE
def test_media_pad_tokens_in_a_completion_are_text(model_tok, mixed, share):
    model, tok = model_tok
    ids, mask = completions(mixed, tok.pad_token_id, seed=5)
    ids[0, 2] = model.config.video_token_id
    ids[1, 0] = model.config.image_token_id
    with torch.no_grad():
        hidden, weight = completion_hidden(model, mixed, ids, mask, num_samples=G, share_prompt=share)
    assert torch.isfinite(hidden).all()
    with pytest.raises(ValueError, match="tokens"):  # HF's full forward counts them as media placeholders
        completion_logprobs_reference(model, mixed, ids, mask, num_samples=G)
