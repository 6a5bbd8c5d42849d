"""The reference rollout (HF generate as Video-R1 calls it) on the tiny model with real video/image prompts.

For sampling, the model's LM head gets a bias on <|im_end|> so that completions end at varied lengths; the masks
are checked against a plain loop over the tokens. Greedy tests use the unbiased model (the biased one's argmax is
EOS at once): prompt-major order against one-prompt batches, tokens against the argmax of a teacher-forced full
forward.
"""
import pytest
import torch
from torch import nn

from media import prompt_inputs, sample_media
from vr1fast.config import RolloutConfig
from vr1fast.data.prompts import build_messages
from vr1fast.data.shuffle import build_shuffle_pair
from vr1fast.model.load import set_checkpointing, tiny_model
from vr1fast.rollout import Rollout, completion_lengths, generate, rollout

S, MAX_NEW = 4, 12


def eos_biased(model, eos: int, bias: float):
    """Replace the LM head by one with a bias on ``eos`` (same weights), making EOS likely."""
    head = nn.Linear(model.lm_head.in_features, model.lm_head.out_features, bias=True)
    with torch.no_grad():
        head.weight.copy_(model.lm_head.weight)
        head.bias.zero_()
        head.bias[eos] = bias
    model.lm_head = head
    return model


@pytest.fixture(scope="module")
def model_tok():
    model, tok = tiny_model(0, init_std=0.1)
    return eos_biased(model, tok.convert_tokens_to_ids("<|im_end|>"), 4.0).eval(), tok


@pytest.fixture(scope="module")
def plain(model_tok):
    """The same tiny model without the EOS bias: greedy decoding runs the full length on varied tokens."""
    return tiny_model(0, init_std=0.1, tokenizer=model_tok[1])[0].eval()


def first_stop(row, stops):
    for i, t in enumerate(row.tolist()):
        if t in stops:
            return i
    return None


def test_shapes_mask_and_padding(model_tok, batch):
    model, tok = model_tok
    stops = {tok.convert_tokens_to_ids("<|im_end|>"), tok.pad_token_id}
    out = generate(model, batch, num_samples=S, max_new_tokens=MAX_NEW, seed=0)
    n, length = out.ids.shape
    assert n == 3 * S and length <= MAX_NEW and out.lengths.dtype == torch.long
    ended = 0
    for row, k, m in zip(out.ids, out.lengths.tolist(), out.mask):
        stop = first_stop(row, stops)
        expected = length if stop is None else stop + 1
        assert k == expected and m.tolist() == [1] * k + [0] * (length - k)
        assert (row[k:] == tok.pad_token_id).all()
        ended += stop is not None and stop + 1 < MAX_NEW
    assert 0 < ended < n and length == MAX_NEW  # some end early, some run to max_new_tokens


def test_eos_argument_limits_the_stop_tokens(model_tok, batch):
    model, tok = model_tok
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    out = generate(model, batch, num_samples=S, max_new_tokens=MAX_NEW, seed=1, eos_token_id=eos)
    for row, k in zip(out.ids, out.lengths.tolist()):
        stop = first_stop(row, {eos})
        assert k == (out.ids.shape[1] if stop is None else stop + 1)


def test_prompt_major_order_and_left_padding(plain, model_tok, picks, batch):
    model, tok = plain, model_tok[1]
    together = generate(model, batch, num_samples=2, max_new_tokens=MAX_NEW, greedy=True)
    for b, pick in enumerate(picks):
        alone = generate(model, prompt_inputs(tok, [pick]), num_samples=1, max_new_tokens=MAX_NEW, greedy=True)
        k = int(alone.lengths[0])
        for row in (2 * b, 2 * b + 1):
            assert together.lengths[row] == k and torch.equal(together.ids[row, :k], alone.ids[0, :k])
    assert len({tuple(r.tolist()) for r in together.ids[::2]}) == 3  # the prompts really differ


def test_greedy_equals_teacher_forced_argmax(plain, model_tok, batch):
    model = plain
    out = generate(model, batch, num_samples=1, max_new_tokens=MAX_NEW, greedy=True)
    prompt_len = batch["input_ids"].shape[1]
    full = dict(batch)
    full["input_ids"] = torch.cat([batch["input_ids"], out.ids], 1)
    full["attention_mask"] = torch.cat([batch["attention_mask"], out.mask], 1)
    full["mm_token_type_ids"] = torch.cat([batch["mm_token_type_ids"], torch.zeros_like(out.ids)], 1)
    with torch.no_grad():
        logits = model(**full).logits[:, prompt_len - 1: -1]
    argmax = logits.argmax(-1)
    m = out.mask.bool()
    assert torch.equal(argmax[m], out.ids[m])


def test_seeded_reproducible_and_global_rng_untouched(model_tok, batch):
    model, _ = model_tok
    torch.manual_seed(7)
    expected = torch.rand(2)
    torch.manual_seed(7)
    a = generate(model, batch, num_samples=S, max_new_tokens=MAX_NEW, seed=3)
    after = torch.rand(2)
    b = generate(model, batch, num_samples=S, max_new_tokens=MAX_NEW, seed=3)
    c = generate(model, batch, num_samples=S, max_new_tokens=MAX_NEW, seed=4)
    assert torch.equal(after, expected)
    assert torch.equal(a.ids, b.ids) and torch.equal(a.lengths, b.lengths)
    assert not torch.equal(a.ids[:, :2], c.ids[:, :2])
    assert len({tuple(r[:3].tolist()) for r in a.ids[:S]}) > 1  # samples of one prompt differ


def test_sampling_ignores_checkpoint_generation_defaults(model_tok, batch):
    model, _ = model_tok
    plain = generate(model, batch, num_samples=S, max_new_tokens=MAX_NEW, seed=5, top_p=0.95, top_k=50)
    saved = model.generation_config
    qwen = saved.__class__.from_dict({**saved.to_dict(), "do_sample": True, "top_k": 1, "top_p": 0.001,
                                      "temperature": 0.1, "repetition_penalty": 1.05})
    model.generation_config = qwen  # what Qwen2.5-VL-Instruct's generation_config.json sets
    try:
        again = generate(model, batch, num_samples=S, max_new_tokens=MAX_NEW, seed=5, top_p=0.95, top_k=50)
    finally:
        model.generation_config = saved
    assert torch.equal(plain.ids, again.ids)


def test_top_k_one_and_cold_temperature_are_greedy(plain, model_tok, batch):
    model = plain
    greedy = generate(model, batch, num_samples=2, max_new_tokens=MAX_NEW, greedy=True)
    top1 = generate(model, batch, num_samples=2, max_new_tokens=MAX_NEW, top_k=1, seed=0)
    cold = generate(model, batch, num_samples=2, max_new_tokens=MAX_NEW, temperature=1e-4, seed=0)
    assert torch.equal(greedy.ids, top1.ids) and torch.equal(greedy.ids, cold.ids)


def test_train_mode_with_checkpointing_is_restored_and_equal(plain, model_tok, batch):
    model = plain
    expected = generate(model, batch, num_samples=1, max_new_tokens=MAX_NEW, greedy=True)
    set_checkpointing(model, True)
    model.train()
    try:
        got = generate(model, batch, num_samples=1, max_new_tokens=MAX_NEW, greedy=True)
        assert model.training
    finally:
        set_checkpointing(model, False)
        model.eval()
    assert torch.equal(got.ids, expected.ids)


def test_ordered_and_shuffled_rollout(model_tok, picks):
    model, tok = model_tok
    pair = build_shuffle_pair(tok, [build_messages(s) for s, _ in picks], [sample_media(s, f) for s, f in picks],
                              torch.Generator().manual_seed(0))
    cfg = RolloutConfig(num_generations=4, num_shuffled=2, max_new_tokens=8, top_k=50, top_p=0.95)
    run = lambda seed: rollout(model, pair.ordered.model_inputs(), pair.shuffled.model_inputs(), cfg, seed=seed)
    a, b = run(11), run(11)
    assert isinstance(a, Rollout) and a.ordered.ids.shape[0] == 3 * 4 and a.shuffled.ids.shape[0] == 2 * 2
    assert pair.video_rows == (0, 2) and a.ordered.ids.shape[1] <= 8 and a.shuffled.ids.shape[1] <= 8
    assert torch.equal(a.ordered.ids, b.ordered.ids) and torch.equal(a.shuffled.ids, b.shuffled.ids)
    torch.manual_seed(2)
    g1 = run(None)
    torch.manual_seed(2)
    g2 = run(None)  # seed=None draws from the global RNG, as Video-R1
    assert torch.equal(g1.ordered.ids, g2.ordered.ids) and torch.equal(g1.shuffled.ids, g2.shuffled.ids)
    none = rollout(model, pair.ordered.model_inputs(), None, cfg, seed=1)
    assert none.shuffled is None and none.ordered.ids.shape[0] == 12


def test_bad_arguments(model_tok, batch):
    model, _ = model_tok
    with pytest.raises(ValueError, match="engine"):
        generate(model, batch, num_samples=2, max_new_tokens=4, engine="vllm")
    with pytest.raises(ValueError, match="num_samples"):
        generate(model, batch, num_samples=0, max_new_tokens=4)


def test_completion_lengths_count_through_first_stop():
    ids = torch.tensor([[5, 7, 2, 9, 2], [5, 5, 5, 5, 5], [2, 0, 0, 0, 0], [9, 2, 2, 0, 0]])
    assert completion_lengths(ids, [2]).tolist() == [3, 5, 1, 2]
    assert completion_lengths(ids, [2, 9]).tolist() == [3, 5, 1, 1]
