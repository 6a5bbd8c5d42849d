"""The paged engine with its part-2 pieces on: the Triton kernels (prefill, KV append, cascade decode, merge; under
the interpreter here), the C++ block manager, and the bucketed decode of ``rollout.graphs`` (its capture replaced by
the eager forward on the CPU; the real capture runs in ``tests/gpu/test_gpu_engine.py``). Greedy completions equal HF generate's
token for token in float32 (tiny Qwen2.5-VL; short prompts of 35, 33 and 45 tokens with a 2-frame video, an image
and a 4-frame video, so that the interpreter runs the prefill in seconds; the long ``conftest`` batch runs the same
engine with the reference kernels in ``test_engine``)."""
import pytest
import torch

from media import conversation, random_frames
from vr1fast.data.processor import build_prompt_batch
from vr1fast.model.load import tiny_model
from vr1fast.rollout import block_manager, generate
from vr1fast.rollout import engine as engine_module
from vr1fast.rollout.graphs import DecodeGraphs, bucket_for, buckets
from vr1fast.rollout.kv_pool import KVPool
from vr1fast.rollout.paged import Kernels, new_pool

MAX_NEW, SHORT, PAGE = 20, 10, 4


@pytest.fixture(scope="module")
def model_tok():
    model, tok = tiny_model(0, init_std=0.1)
    return model.eval(), tok


@pytest.fixture(scope="module")
def batch(model_tok):
    messages = [conversation("Which way does the square move?", "video"), conversation("What colour is it?", "image"),
                conversation("Count the flashes.", "video")]
    media = [random_frames(2, 56, 56, 1), random_frames(1, 56, 84, 2)[0], random_frames(4, 84, 56, 3)]
    inputs = build_prompt_batch(model_tok[1], messages, media).model_inputs()
    assert inputs["attention_mask"].sum(1).tolist() == [35, 33, 45]
    return inputs


@pytest.fixture(scope="module")
def hf_and_stops(model_tok, batch):
    """HF greedy completions with stop ids picked from HF's own output: prompt 0 stops by token 3, prompt 1 by 13,
    prompt 2 runs to the limit (so the running batch shrinks at the first read of the stop flags)."""
    model, _ = model_tok
    never = model.config.get_text_config().vocab_size - 1
    free = generate(model, batch, num_samples=1, max_new_tokens=MAX_NEW, greedy=True, eos_token_id=never, engine="hf")
    stops = [int(free.ids[0, 2]), int(free.ids[1, 12])]
    hf = generate(model, batch, num_samples=3, max_new_tokens=MAX_NEW, greedy=True, eos_token_id=stops, engine="hf")
    lengths = hf.lengths.tolist()
    assert lengths[0] <= 3 and lengths[3] <= 13 and lengths[6] == MAX_NEW, lengths
    return hf, stops


@pytest.mark.parametrize("cascade", [True, False])
def test_greedy_equals_hf_with_every_kernel_on(model_tok, batch, hf_and_stops, monkeypatch, cascade):
    """10 tokens (the interpreter is slow): prompt 0's samples stop by token 3, the others run to the limit across
    two page boundaries."""
    model, _ = model_tok
    stops = hf_and_stops[1]
    hf = generate(model, batch, num_samples=3, max_new_tokens=SHORT, greedy=True, eos_token_id=stops, engine="hf")
    monkeypatch.setenv("VR1FAST_IMPL", "triton")
    kernels = Kernels.for_device("cpu", 3, cascade)
    assert kernels.prefill.__module__ == "vr1fast.kernels.prefill" and kernels.capturable
    assert kernels.decode.keywords == {"max_group": 3, "share": cascade}
    launched = []
    monkeypatch.setattr(engine_module, "Kernels", type("Spy", (), {"for_device": staticmethod(
        lambda *a: launched.append(a) or Kernels.for_device(*a))}))
    paged = engine_module.paged_generate(model, batch, num_samples=3, max_new_tokens=SHORT,
                                         sampling=engine_module.Sampling(greedy=True), eos_token_id=stops,
                                         page_size=PAGE, cascade=cascade)
    assert launched == [(batch["input_ids"].device, 3, cascade)]
    assert torch.equal(paged.ids, hf.ids) and torch.equal(paged.lengths, hf.lengths)


def test_engine_pool_uses_the_chosen_block_manager(model_tok):
    pool = new_pool(model_tok[0], 8, PAGE)
    assert isinstance(pool.blocks, block_manager.BlockManager)
    assert type(KVPool(1, 4, PAGE, 1, 2, dtype=torch.float32).blocks).__module__ == "vr1fast.rollout.kv_pool"


def test_bucketed_decode_equals_hf(model_tok, batch, hf_and_stops, monkeypatch):
    """The graph runner's padded buckets (rows past the running samples: slot -1, length 0) change no token; the
    batch of 9 samples runs in bucket 9, then, once 6 have stopped, in bucket 4."""
    model, _ = model_tok
    hf, stops = hf_and_stops
    seen = []

    def eager(self, b):
        seen.append(b)
        return self._forward(b)

    monkeypatch.setattr(engine_module, "capturable", lambda device, kernels: True)
    monkeypatch.setattr(DecodeGraphs, "_capture", eager)
    paged = generate(model, batch, num_samples=3, max_new_tokens=MAX_NEW, greedy=True, eos_token_id=stops,
                     engine="paged", page_size=PAGE)
    assert torch.equal(paged.ids, hf.ids) and torch.equal(paged.lengths, hf.lengths)
    assert seen == [9] * 16 + [4] * (MAX_NEW - 17), seen


def test_buckets():
    assert buckets(24) == [24, 16, 8, 4, 2, 1] and buckets(16) == [16, 8, 4, 2, 1] and buckets(1) == [1]
    assert bucket_for(17, buckets(24)) == 24 and bucket_for(16, buckets(24)) == 16 and bucket_for(3, [4, 2, 1]) == 4
    with pytest.raises(ValueError, match="25 running samples exceed the first decode batch 24"):
        bucket_for(25, buckets(24))
    with pytest.raises(ValueError, match="must hold >= 1 sample"):
        buckets(0)
