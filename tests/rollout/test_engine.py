"""The paged engine (``rollout.engine``) against HF on the tiny Qwen2.5-VL in float32, with real prompts: an 8-frame
video (300 tokens), an image (240) and a 4-frame video (269), left-padded in one batch.

Greedy completions equal HF generate's token for token (stop ids picked from HF's own output so that some rows stop
early and some run to the limit, across a page boundary and a drop of finished samples); sampled first tokens follow
the filtered distribution of HF's prompt logits (chi-square) and never leave its support; returned log-probs equal
HF's full forward; a pool that is too small fails in one line before any forward; every page goes back after a call
and after an exception; the pair shuffle's reused vision output gives the two-call path's tokens.
"""
import pytest
import torch
from test_sampling import chi_square_pvalue

from media import sample_media
from vr1fast.config import RolloutConfig
from vr1fast.data.prompts import build_messages
from vr1fast.data.shuffle import build_shuffle_pair
from vr1fast.model.forward import completion_logprobs_reference, repeated_hidden
from vr1fast.model.load import tiny_model
from vr1fast.rollout import engine as engine_module
from vr1fast.rollout import generate, resolve_engine, rollout
from vr1fast.rollout.engine import SYNC_EVERY, Sampling, paged_generate
from vr1fast.rollout.kv_pool import PoolTooSmall
from vr1fast.rollout.paged import new_pool
from vr1fast.rollout.sampling import filter_logits

MAX_NEW, PAGE = SYNC_EVERY + 6, 4


@pytest.fixture(scope="module")
def model_tok():
    model, tok = tiny_model(0, init_std=0.1)
    return model.eval(), tok


@pytest.fixture(scope="module")
def never(model_tok):
    """A stop id the tiny model never emits here (the last vocabulary row): completions run to the limit."""
    return model_tok[0].config.get_text_config().vocab_size - 1


class Counted:
    """Patches through the vision tower and forward calls of the text decoder's layers, by forward pre-hooks."""

    def __init__(self, model):
        self.calls = {"vision": 0, "text": 0}
        self.handles = [model.model.visual.register_forward_pre_hook(lambda _, args: self._hit("vision", args))]
        for layer in model.model.language_model.layers:
            self.handles.append(layer.register_forward_pre_hook(lambda _, args: self._hit("text", args)))

    def _hit(self, what, args):
        self.calls[what] += args[0].shape[0] if what == "vision" else 1

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()


def trainer_logprobs(model, inputs, out, num_samples):
    """The trainer's log-probs of completions (its forward in the repeated layout, ``repeated_hidden``, which
    tests/model shows equal to the prompt-once one: media pad ids sampled into a completion are plain tokens there,
    while HF's full forward would take them for placeholders): fp32 [B·G, L]."""
    with torch.no_grad():
        hidden, weight = repeated_hidden(model, inputs, out.ids, out.mask, num_samples=num_samples)
    return (hidden @ weight.T).float().log_softmax(-1).gather(-1, out.ids[..., None])[..., 0]


def test_greedy_equals_hf_generate(model_tok, batch, never):
    model, _ = model_tok
    free = generate(model, batch, num_samples=1, max_new_tokens=MAX_NEW, greedy=True, eos_token_id=never, engine="hf")
    stops = [int(free.ids[0, 2]), int(free.ids[1, 12])]  # prompt 0 stops by token 3, prompt 1 by token 13
    hf = generate(model, batch, num_samples=3, max_new_tokens=MAX_NEW, greedy=True, eos_token_id=stops, engine="hf")
    paged = generate(model, batch, num_samples=3, max_new_tokens=MAX_NEW, greedy=True, eos_token_id=stops,
                     engine="paged", page_size=PAGE)
    assert torch.equal(paged.ids, hf.ids) and torch.equal(paged.lengths, hf.lengths)
    lengths = hf.lengths.tolist()
    assert lengths[0] <= 3 and lengths[3] <= 13 and lengths[6] == MAX_NEW == hf.ids.shape[1], lengths
    assert len({tuple(r.tolist()) for r in hf.ids[::3]}) == 3  # the prompts really differ
    assert paged.logprobs.dtype == torch.float32 and paged.logprobs.shape == paged.ids.shape
    assert (paged.logprobs[~paged.mask.bool()] == 0).all() and (paged.logprobs[paged.mask.bool()] < 0).all()
    assert hf.logprobs is None


def test_logprobs_equal_hf_forward(model_tok, batch):
    model, tok = model_tok
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    out = generate(model, batch, num_samples=3, max_new_tokens=MAX_NEW, temperature=0.7, top_k=20, top_p=0.9,
                   seed=0, eos_token_id=[eos, 13], engine="paged", page_size=PAGE)
    ref = completion_logprobs_reference(model, batch, out.ids, out.mask, num_samples=3, temperature=0.7)
    m = out.mask.bool()
    assert (out.lengths < out.ids.shape[1]).any() and len({tuple(r[:4].tolist()) for r in out.ids}) > 3
    torch.testing.assert_close(out.logprobs[m], ref[m], rtol=0, atol=1e-5)
    assert (out.logprobs[~m] == 0).all()
    with torch.no_grad():
        hot = completion_logprobs_reference(model, batch, out.ids, out.mask, num_samples=3, temperature=1.0)
    assert (hot[m] - out.logprobs[m]).abs().max() > 0.1  # the temperature matters at this tolerance


def test_first_tokens_follow_the_filtered_distribution(model_tok, batch):
    model, _ = model_tok
    n, temperature, top_k, top_p = 3000, 0.8, 12, 0.9
    out = generate(model, batch, num_samples=n, max_new_tokens=1, temperature=temperature, top_k=top_k, top_p=top_p,
                   seed=1, eos_token_id=0, engine="paged", page_size=PAGE)
    with torch.no_grad():
        last = model(**batch, use_cache=False).logits[:, -1].double()
    probs = filter_logits(last, temperature, top_k, top_p).softmax(-1)
    for b in range(3):
        tokens = out.ids[b * n:(b + 1) * n, 0]
        assert (probs[b, tokens] > 0).all(), "a token outside the top-k/top-p support was sampled"
        assert 3 <= int((probs[b] > 0).sum()) <= top_k and chi_square_pvalue(tokens, probs[b]) > 1e-3


def test_pool_too_small_fails_before_any_work(model_tok, batch):
    model, _ = model_tok
    with Counted(model) as counted:
        with pytest.raises(PoolTooSmall) as err:
            generate(model, batch, num_samples=4, max_new_tokens=MAX_NEW, engine="paged", kv_cache_fraction=1e-9)
        assert "\n" not in str(err.value) and "kv_cache_fraction=1e-09" in str(err.value)
        pool = new_pool(model, 20, PAGE)
        with pytest.raises(PoolTooSmall, match=r"^rollout needs \d+ KV pages of 4 tokens but the pool has 20 free"):
            paged_generate(model, batch, num_samples=4, max_new_tokens=MAX_NEW, pool=pool)
        cfg = RolloutConfig(engine="paged", num_generations=2, max_new_tokens=4, kv_cache_fraction=1e-9)
        with pytest.raises(PoolTooSmall, match="kv_cache_fraction=1e-09"):
            rollout(model, batch, None, cfg)
    assert counted.calls == {"vision": 0, "text": 0}


def test_every_page_released_also_after_an_exception(model_tok, batch, monkeypatch, never):
    model, _ = model_tok
    pool = new_pool(model, 400, PAGE)
    bm = pool.blocks
    out = paged_generate(model, batch, num_samples=3, max_new_tokens=MAX_NEW, sampling=Sampling(greedy=True),
                         eos_token_id=never, pool=pool)
    assert out.ids.shape == (9, MAX_NEW)
    assert bm.num_free == bm.num_pages and all(bm.refcount(p) == 0 for p in range(bm.num_pages))
    calls = []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 5:
            raise RuntimeError("injected")
        return decode(*args, **kwargs)

    decode = engine_module.decode_one_token
    monkeypatch.setattr(engine_module, "decode_one_token", failing)
    with pytest.raises(RuntimeError, match="injected"):
        paged_generate(model, batch, num_samples=3, max_new_tokens=MAX_NEW, eos_token_id=never, pool=pool)
    assert bm.num_free == bm.num_pages and all(bm.refcount(p) == 0 for p in range(bm.num_pages))


def test_resolve_engine():
    assert resolve_engine("auto", "cpu") == "hf" and resolve_engine("auto", "cuda:0") == "paged"
    assert resolve_engine("paged", "cpu") == "paged" and resolve_engine("hf", "cuda") == "hf"
    with pytest.raises(ValueError, match=r"unknown rollout engine 'vllm' \(choices: auto, hf, paged\)"):
        resolve_engine("vllm", "cpu")


@pytest.mark.parametrize("mode", ["pair", "frame"])
def test_ordered_and_shuffled_together_equal_two_calls(model_tok, picks, mode):
    """top_k = 1 makes sampling greedy: the paged engine's one prefill of ordered + shuffled prompts (with the
    ordered vision output permuted for a pair shuffle) gives the tokens of Video-R1's two HF calls."""
    model, tok = model_tok
    pair = build_shuffle_pair(tok, [build_messages(s) for s, _ in picks], [sample_media(s, f) for s, f in picks],
                              torch.Generator().manual_seed(3), mode=mode)
    ordered, shuffled = pair.ordered.model_inputs(), pair.shuffled.model_inputs()
    cfg = RolloutConfig(num_generations=3, num_shuffled=2, max_new_tokens=MAX_NEW, top_k=1, kv_page_size=PAGE)
    stops = [tok.convert_tokens_to_ids("<|im_end|>"), 13]
    two = rollout(model, ordered, shuffled, cfg, eos_token_id=stops, seed=0)
    paged_cfg = RolloutConfig(**{**cfg.__dict__, "engine": "paged"})
    with Counted(model) as counted:
        one = rollout(model, ordered, shuffled, paged_cfg, eos_token_id=stops, seed=0, video_rows=pair.video_rows,
                      permutations=pair.permutations)
    patches = ordered["pixel_values"].shape[0] + ordered["pixel_values_videos"].shape[0]
    assert counted.calls["vision"] == patches + (0 if mode == "pair" else shuffled["pixel_values_videos"].shape[0])
    for got, want, inputs, g in ((one.ordered, two.ordered, ordered, 3), (one.shuffled, two.shuffled, shuffled, 2)):
        assert torch.equal(got.ids, want.ids) and torch.equal(got.lengths, want.lengths)
        ref = trainer_logprobs(model, inputs, got, g)
        m = got.mask.bool()  # greedy tokens barely see the frame order here: the log-probs do (~1e-2 if unpermuted)
        torch.testing.assert_close(got.logprobs[m], ref[m], rtol=0, atol=1e-5)
    assert one.shuffled.ids.shape[0] == 2 * 2 and len(pair.permutations) == 2
