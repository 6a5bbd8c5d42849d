"""The pure-torch paged attention (``kernels.reference_paged``) against dense ``scaled_dot_product_attention`` in
float64: packed causal prefill and cascade decode (group prompt ⊕ own tokens, LSE merge) over pages handed out by
the block manager, random lengths (page boundaries hit exactly and not), several samples per prompt, GQA, unused
pages and fresh buffers poisoned with NaN."""
import random

import pytest
import torch
import torch.nn.functional as F

from poison import poisoned
from vr1fast.kernels.reference_paged import (attention_state, cascade_decode_attention, merge_attention_states,
                                             paged_append, prefill_attention)
from vr1fast.rollout.kv_pool import KVPool

F64 = torch.float64


def dense(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> torch.Tensor:
    """SDPA of q [M, Hq, D] over k/v [T, Hkv, D] (GQA), one sequence."""
    out = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
                                         is_causal=causal, enable_gqa=True)
    return out[0].transpose(0, 1)


def run_rollout(seed: int, page: int, hq: int, hkv: int, d: int, prompt_lens: list[int], samples: list[int],
                new_tokens: list[list[int]], magnitude: float = 1.0) -> None:
    """Prefill the prompts, fork them, decode every sample token by token until its length; each step's output and
    the prompt outputs are checked against dense SDPA over the same keys."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=g, dtype=F64) * magnitude

    with poisoned():
        pool = KVPool(1, 64, page, hkv, d, dtype=F64)
        bm, kc, vc = pool.blocks, pool.k[0], pool.v[0]
        prompts = [bm.allocate(n) for n in prompt_lens]
        n = sum(prompt_lens)
        q, k, v = rand(n, hq, d), rand(n, hkv, d), rand(n, hkv, d)
        cu = torch.tensor([0, *prompt_lens]).cumsum(0)
        slots = torch.cat([bm.slots(p, 0, bm.length(p)) for p in prompts])
        out = prefill_attention(q, k, v, cu, kc, vc, slots)
        for i, (a, b) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
            torch.testing.assert_close(out[a:b], dense(q[a:b], k[a:b], v[a:b], causal=True), rtol=0, atol=1e-12)
        prefix_table, prefix_lens = bm.page_table(prompts), torch.tensor(prompt_lens)
        seqs = [s for p, gcount in zip(prompts, samples) for s in bm.fork(p, gcount)]
        groups = torch.tensor([i for i, gcount in enumerate(samples) for _ in range(gcount)])
        lengths = [t for per_prompt in new_tokens for t in per_prompt]
        own_k = [torch.empty(0, hkv, d, dtype=F64) for _ in seqs]
        own_v = [torch.empty(0, hkv, d, dtype=F64) for _ in seqs]
        for step in range(max(lengths)):
            running = [step < n_i for n_i in lengths]
            for s, run in zip(seqs, running):
                if run:
                    bm.append(s)
            slots = torch.tensor([bm.slots(s, step, step + 1).item() if run else -1 for s, run in zip(seqs, running)])
            qs, ks, vs = rand(len(seqs), hq, d), rand(len(seqs), hkv, d), rand(len(seqs), hkv, d)
            suffix_lens = torch.tensor([bm.length(s) for s in seqs])
            out = cascade_decode_attention(qs, ks, vs, kc, vc, slots, prefix_table, prefix_lens, groups,
                                           bm.page_table(seqs), suffix_lens)
            for i, run in enumerate(running):
                if not run:
                    continue
                own_k[i], own_v[i] = torch.cat([own_k[i], ks[i:i + 1]]), torch.cat([own_v[i], vs[i:i + 1]])
                a, b = cu[groups[i]].item(), cu[groups[i] + 1].item()
                want = dense(qs[i:i + 1], torch.cat([k[a:b], own_k[i]]), torch.cat([v[a:b], own_v[i]]), causal=False)
                torch.testing.assert_close(out[i:i + 1], want, rtol=0, atol=1e-12 * magnitude ** 2)
        assert torch.isnan(pool.k).any(), "some pages must stay unused (NaN) for the test to mean anything"


def test_prompt_and_suffix_on_page_boundaries():
    # page 4: prompts of exactly 1 and 2 pages and one of 5 tokens; suffixes ending exactly on a page and not
    run_rollout(0, page=4, hq=6, hkv=2, d=8, prompt_lens=[4, 8, 5], samples=[2, 3, 1],
                new_tokens=[[4, 1], [8, 3, 5], [9]])


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_random_lengths_samples_and_gqa(seed):
    rng = random.Random(seed)
    hkv = rng.choice([1, 2])
    hq = hkv * rng.choice([1, 3, 7])
    page = rng.choice([3, 4, 16])
    prompt_lens = [rng.randint(1, 40) for _ in range(rng.randint(1, 3))]
    samples = [rng.randint(1, 4) for _ in prompt_lens]
    new_tokens = [[rng.randint(1, 12) for _ in range(s)] for s in samples]
    run_rollout(seed, page, hq, hkv, rng.choice([5, 8]), prompt_lens, samples, new_tokens)


def test_large_logits_stay_exact():
    # scores of order ±900 (std magnitude²): exp overflows float64 unless the softmax and the merge subtract the max
    run_rollout(4, page=4, hq=4, hkv=2, d=8, prompt_lens=[7, 3], samples=[2, 2], new_tokens=[[5, 2], [6, 1]],
                magnitude=30.0)


def test_merge_of_split_keys_equals_one_softmax_and_empty_is_identity():
    g = torch.Generator().manual_seed(5)
    q = torch.randn(2, 1, 4, 8, generator=g, dtype=F64)
    k, v = torch.randn(2, 11, 2, 8, generator=g, dtype=F64), torch.randn(2, 11, 2, 8, generator=g, dtype=F64)
    full = torch.ones(2, 1, 11, dtype=torch.bool)
    o, lse = attention_state(q, k, v, full, 0.3)
    cut = torch.arange(11)[None, None, :] < torch.tensor([4, 0])[:, None, None]   # row 1: all keys on one side
    o_a, lse_a = attention_state(q, k, v, cut, 0.3)
    o_b, lse_b = attention_state(q, k, v, ~cut, 0.3)
    assert torch.isneginf(lse_a[1]).all() and (o_a[1] == 0).all()
    o_m, lse_m = merge_attention_states(o_a, lse_a, o_b, lse_b)
    torch.testing.assert_close(o_m, o, rtol=0, atol=1e-13)
    torch.testing.assert_close(lse_m, lse, rtol=0, atol=1e-13)
    scores = torch.einsum("bmhd,bthd->bmht", q, k.repeat_interleave(2, dim=2)) * 0.3
    torch.testing.assert_close(lse, torch.logsumexp(scores, -1), rtol=0, atol=1e-13)
    o_e, lse_e = merge_attention_states(o_a[1:], lse_a[1:], o_a[1:], lse_a[1:])
    assert (o_e == 0).all() and torch.isneginf(lse_e).all()


def test_append_skips_finished_and_checks_shapes():
    kc, vc = torch.full((3, 2, 1, 4), float("nan"), dtype=F64), torch.full((3, 2, 1, 4), float("nan"), dtype=F64)
    k = torch.arange(12, dtype=F64).reshape(3, 1, 4)
    paged_append(kc, vc, k, -k, torch.tensor([5, -1, 0]))
    assert (kc[2, 1] == k[0]).all() and (vc[0, 0] == -k[2]).all()
    assert torch.isnan(kc[1]).all() and torch.isnan(kc[0, 1]).all()
    with pytest.raises(ValueError, match="paged_append"):
        paged_append(kc, vc, k[:, :, :3], k[:, :, :3], torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="cu_seqlens"):
        prefill_attention(k, k, k, [0, 2, 2, 3], kc, vc, torch.tensor([0, 1, 2]))
