"""Triton paged attention (``kernels.attention``, interpreted) against the float64 ``reference_paged``: KV append,
cascade decode over random groups, prompt and suffix lengths (0 and page boundaries included), finished samples,
unused pages and fresh buffers poisoned with NaN; Qwen2.5-VL-7B's GQA 7:1 with 8 siblings in one tile; split-KV;
packed causal prefill; a short rollout over block-manager pages; dispatch; the sm_90 AOT compile of every variant.

Bar (DESIGN rule 3): the error vs float64 is at most twice the reference's own in the same dtype (fp32 maths, the
output rounded to the dtype), plus 1e-6."""
import random

import pytest
import torch

from poison import poisoned
from vr1fast import kernels
from vr1fast.kernels import attention, prefill, reference_paged as ref
from vr1fast.kernels._triton import aot_check
from vr1fast.rollout.kv_pool import KVPool

F64 = torch.float64


def assert_within_bar(got, inputs, fn, live=None, **kw):
    """``got`` vs fn on float64 copies of ``inputs``, against twice fn's own error in got's dtype (rows ``live``)."""
    want = fn(*[x.double().clone() if x.is_floating_point() else x for x in inputs], **kw)
    same = fn(*[x.clone() for x in inputs], **kw)
    pick = (lambda t: t[live]) if live is not None else (lambda t: t)
    err = (pick(got).double() - pick(want)).abs().max().item()
    bar = 2 * (pick(same).double() - pick(want)).abs().max().item() + 1e-6
    assert err <= bar, (err, bar)
    return err


class Cascade:
    """A random decode step: P prompts on random pages, samples in shuffled order, NaN everywhere not written."""

    def __init__(self, seed, hq, hkv, d, dtype, page, prompt_lens, samples, suffix_lens, finished):
        g = torch.Generator().manual_seed(seed)
        self.rand = lambda *shape: torch.randn(*shape, generator=g).to(dtype)
        n_pages = sum(-(-n // page) for n in [*prompt_lens, *suffix_lens]) + len(suffix_lens) + 3
        self.k_cache = torch.full((n_pages, page, hkv, d), float("nan"), dtype=dtype)
        self.v_cache = self.k_cache.clone()
        self.free, self.page = torch.randperm(n_pages, generator=g).tolist(), page
        self.prefix_table = self.table(prompt_lens, prompt_lens)
        S = len(suffix_lens)
        self.groups = torch.tensor([p for p, n in enumerate(samples) for _ in range(n)])[torch.randperm(S, generator=g)]
        stored = [max(n - 1, 0) for n in suffix_lens]  # the new token's K/V comes with the call
        self.suffix_table = self.table([max(n, 1) for n in suffix_lens], stored)
        slot = [self.slot(i, n - 1) if n else self.free.pop() * page for i, n in enumerate(suffix_lens)]
        self.slots = torch.tensor([-1 if f else s for s, f in zip(slot, finished)])
        self.q, self.k, self.v = self.rand(S, hq, d), self.rand(S, hkv, d), self.rand(S, hkv, d)
        self.prefix_lens, self.suffix_lens = torch.tensor(prompt_lens), torch.tensor(suffix_lens)
        self.live = self.slots >= 0

    def table(self, lengths, written):
        width = max(-(-n // self.page) for n in lengths) + 1  # a -1 column past the longest row
        rows = torch.full((len(lengths), width), -1, dtype=torch.int32)
        for i, (n, w) in enumerate(zip(lengths, written)):
            rows[i, :-(-n // self.page)] = torch.tensor([self.free.pop() for _ in range(-(-n // self.page))])
            flat = [self.slot_of(rows[i], t) for t in range(w)]
            self.k_cache.view(-1, *self.k_cache.shape[2:])[flat] = self.rand(w, *self.k_cache.shape[2:])
            self.v_cache.view(-1, *self.v_cache.shape[2:])[flat] = self.rand(w, *self.v_cache.shape[2:])
        return rows

    def slot_of(self, row, t):
        return int(row[t // self.page]) * self.page + t % self.page

    def slot(self, i, t):
        return self.slot_of(self.suffix_table[i], t)

    def inputs(self):
        return (self.q, self.k, self.v, self.k_cache, self.v_cache, self.slots, self.prefix_table, self.prefix_lens,
                self.groups, self.suffix_table, self.suffix_lens)

    def check(self, **kw):
        mine = [x.clone() for x in self.inputs()]
        with poisoned():
            out = attention.cascade_decode_attention(*mine, **kw)
        assert out.dtype == self.q.dtype and (out[~self.live] == 0).all()
        want = [x.clone() for x in self.inputs()]
        ref.paged_append(want[3], want[4], want[1], want[2], want[5])
        for i in (3, 4):  # the caches after the append, NaN wherever nothing was written
            assert torch.equal(mine[i].nan_to_num(7.0), want[i].nan_to_num(7.0))
        assert torch.isnan(mine[3]).any(), "unused slots must stay NaN for the test to mean anything"
        return assert_within_bar(out, self.inputs(), ref.cascade_decode_attention, self.live)


def random_case(seed, dtype):
    rng = random.Random(seed)
    hkv, r = rng.choice([(1, 7), (2, 2), (2, 3), (1, 1)])
    page, P = rng.choice([3, 4, 16]), rng.randint(1, 4)
    prompt_lens = [rng.choice([page, 2 * page, rng.randint(1, 40)]) for _ in range(P)]
    samples = [rng.randint(1, 5) for _ in range(P)]
    S = sum(samples)
    suffix = [rng.choice([0, 1, page, rng.randint(1, 30)]) for _ in range(S)]
    finished = [rng.random() < 0.25 for _ in range(S)]
    return Cascade(seed, hkv * r, hkv, rng.choice([8, 16, 24]), dtype, page, prompt_lens, samples, suffix, finished)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_cascade_random_groups_lengths_and_finished(seed, dtype):
    case = random_case(seed, dtype)
    case.check()
    case.check(share=False)  # the unshared baseline: prompt pages read per sample


def test_qwen7b_shape_eight_siblings_in_one_tile():
    """28 query / 4 KV heads, D 128, pages of 16: 8 siblings × 7 heads = 56 rows of the 64-row level-1 tile; the
    two groups' prompts end on a page boundary and not; one sibling finished, one at suffix 16 (a full page)."""
    case = Cascade(7, 28, 4, 128, torch.bfloat16, 16, [32, 21], [8, 8], [1, 16, 3, 5, 2, 9, 4, 7] * 2,
                   [False] * 5 + [True] + [False] * 10)
    case.check(max_group=8)


def test_split_kv_over_long_prompt_and_suffix():
    """One group of 3 and a prompt of 150 tokens: level 1 splits the prompt (and level 2 the 40-token suffixes);
    both rows of partials merge to the one softmax over prompt ‖ own tokens."""
    assert attention._plan(2, 152, 16)[0] > 1 and attention._plan(3 * 2, 44, 16)[0] > 1
    case = Cascade(8, 4, 2, 16, torch.float32, 4, [150], [3], [40, 37, 1], [False, False, False])
    case.check()


def test_large_scores_stay_exact():
    """Scores of order ±900 (q, k × 30): the online softmax and the merge subtract the running max."""
    case = Cascade(9, 4, 2, 16, torch.float32, 4, [9, 12], [2, 2], [3, 5, 1, 4], [False] * 4)
    case.q, case.k_cache = case.q * 30, case.k_cache * 30
    case.check()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_append_skips_finished_and_rounds_like_torch(dtype):
    kc = torch.full((5, 4, 2, 24), float("nan"), dtype=dtype)
    k = torch.randn(6, 2, 24, dtype=torch.float32)
    v = torch.randn(12, 2, 24, dtype=torch.float32)[::2]  # a strided token dimension
    slots = torch.tensor([3, -1, 19, 0, -1, 8])
    for rows in (k, k.to(dtype)):  # fp32 rows into a bf16 cache round to nearest even, as Tensor.to does
        mine, want = (kc.clone(), kc.clone()), (kc.clone(), kc.clone())
        attention.paged_append(*mine, rows, v, slots)
        ref.paged_append(*want, rows, v, slots)
        assert all(torch.equal(a.nan_to_num(7.0), b.nan_to_num(7.0)) for a, b in zip(mine, want))
        assert torch.isnan(mine[0].view(-1, 2, 24)[[1, 2, 4, 5, 7]]).all()
    with pytest.raises(ValueError, match="paged_append"):
        attention.paged_append(kc, kc, k[:, :1], v[:, :1], slots)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("hq,hkv,d", [(4, 2, 16), (28, 4, 128), (3, 1, 24)])
def test_prefill_matches_reference(hq, hkv, d, dtype):
    g = torch.Generator().manual_seed(hq + d)
    cu = [0, 1, 17, 33, 70]  # lengths 1, 16 (a tile exactly), 16, 37
    n = cu[-1]
    q, k, v = (torch.randn(n, h, d, generator=g).to(dtype) for h in (hq, hkv, hkv))
    kc = torch.full((30, 4, hkv, d), float("nan"), dtype=dtype)
    slots = torch.randperm(120, generator=g)[:n]
    mine = (kc.clone(), kc.clone())
    with poisoned():
        out = prefill.prefill_attention(q, k, v, torch.tensor(cu), *mine, slots)
    assert torch.equal(mine[0].view(-1, hkv, d)[slots], k) and torch.equal(mine[1].view(-1, hkv, d)[slots], v)
    assert_within_bar(out, (q, k, v), lambda q, k, v: ref.prefill_attention(q, k, v, cu, kc.to(q.dtype).clone(),
                                                                            kc.to(q.dtype).clone(), slots))
    with pytest.raises(ValueError, match="cu_seqlens"):
        prefill.prefill_attention(q, k, v, [0, 5, 5, n], *mine, slots)


def test_paged_attention_state_gives_natural_lse():
    case = Cascade(10, 6, 2, 16, torch.float32, 4, [13, 4], [2, 1], [5, 8, 1], [False] * 3)
    g = case.groups.long()
    args = (case.q, case.k_cache, case.v_cache, case.prefix_table[g], case.prefix_lens[g])
    with poisoned():
        o, lse = attention.paged_attention_state(*args)
    want_o, want_lse = ref.paged_attention_state(*[a.double() if a.is_floating_point() else a for a in args])
    torch.testing.assert_close(o.double(), want_o, rtol=0, atol=1e-6)
    torch.testing.assert_close(lse.double(), want_lse, rtol=0, atol=1e-5)


def test_rollout_over_block_manager_pages():
    """Prefill two prompts with the Triton prefill, fork 3 + 2 samples, decode 5 steps (one sample stops after 2)
    with the Triton cascade; every output equals the reference run on the same pages step by step."""
    g = torch.Generator().manual_seed(11)
    hq, hkv, d = 4, 2, 16
    pools = [KVPool(1, 24, 4, hkv, d, dtype=torch.float32) for _ in range(2)]
    for p in pools:
        p.k.fill_(float("nan")), p.v.fill_(float("nan"))
    bm = pools[0].blocks
    prompts = [bm.allocate(n) for n in (7, 8)]
    q, k, v = (torch.randn(15, h, d, generator=g) for h in (hq, hkv, hkv))
    slots = torch.cat([bm.slots(p, 0, bm.length(p)) for p in prompts])
    outs = [fn(q, k, v, [0, 7, 15], p.k[0], p.v[0], slots) for fn, p in
            ((prefill.prefill_attention, pools[0]), (ref.prefill_attention, pools[1]))]
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=1e-6)
    seqs = bm.fork(prompts[0], 3) + bm.fork(prompts[1], 2)
    groups, stop = torch.tensor([0, 0, 0, 1, 1]), [5, 2, 5, 5, 5]
    for step in range(5):
        run = [step < s for s in stop]
        for s, r in zip(seqs, run):
            if r:
                bm.append(s)
        slots = torch.tensor([bm.slots(s, step, step + 1).item() if r else -1 for s, r in zip(seqs, run)])
        qs, ks, vs = (torch.randn(5, h, d, generator=g) for h in (hq, hkv, hkv))
        tables = (bm.page_table(prompts), torch.tensor([7, 8]), groups, bm.page_table(seqs),
                  torch.tensor([bm.length(s) for s in seqs]))
        got = attention.cascade_decode_attention(qs, ks, vs, pools[0].k[0], pools[0].v[0], slots, *tables,
                                                 max_group=3)
        want = ref.cascade_decode_attention(qs, ks, vs, pools[1].k[0], pools[1].v[0], slots, *tables)
        live = torch.tensor(run)
        torch.testing.assert_close(got[live], want[live], rtol=0, atol=1e-6)
    assert torch.equal(pools[0].k.nan_to_num(7.0), pools[1].k.nan_to_num(7.0))


def test_dispatch_and_bad_inputs(monkeypatch):
    monkeypatch.delenv("VR1FAST_IMPL", raising=False)
    triton_fns = {name: getattr(attention, name) for name in ("paged_append", "paged_attention_state",
                                                              "cascade_decode_attention")}
    for name, fn in {**triton_fns, "prefill_attention": prefill.prefill_attention}.items():
        assert kernels.implementation(name, device="cuda") is fn
        assert kernels.implementation(name, device="cpu") is getattr(ref, name)
    assert kernels.implementation("merge_attention_states", device="cuda") is ref.merge_attention_states
    case = Cascade(12, 4, 2, 16, torch.float32, 4, [5], [2], [1, 2], [False, False])
    bad = list(case.inputs())
    bad[0] = bad[0].bfloat16()
    with pytest.raises(ValueError, match="cascade_decode_attention: q torch.bfloat16 and caches"):
        attention.cascade_decode_attention(*bad)
    with pytest.raises(ValueError, match="must share S rows"):
        attention.cascade_decode_attention(*case.inputs()[:5], case.slots[:1], *case.inputs()[6:])


@pytest.mark.parametrize("module", [attention, prefill])
def test_aot_compile_sm90_registers_and_spills(module):
    results = aot_check(module.__name__)
    assert len(results) == len(module.aot_variants())
    kinds = {"_append_kernel", "_partial_kernel", "_merge_kernel"} if module is attention else {"_prefill_kernel"}
    assert {r["kernel"] for r in results} == kinds
    for r in results:
        assert r["cubin"] > 0 and r["registers"] <= 255 and r["local"] == 0 and r["shared"] <= 227 * 1024, r


def test_more_siblings_than_one_tile():
    """GQA 7:1 with 11 and 3 samples: a tile holds 8 siblings (56 rows), so the first group takes two member blocks."""
    case = Cascade(13, 7, 1, 16, torch.float32, 4, [10, 6], [11, 3], [2, 5, 1, 3, 4, 2, 6, 1, 3, 2, 5, 1, 2, 3],
                   [False] * 9 + [True] + [False] * 4)
    case.check(max_group=11)
    case.check()


@pytest.mark.gpu
@pytest.mark.parametrize("share", [True, False])
def test_compiled_cascade_and_prefill_on_gpu(share):
    """The compiled kernels (bf16 tensor-core dots, p rounded to bf16 before p·v) at the 7B shape, within the same
    bar as the interpreted ones; a CUDA graph replay of the decode step gives the same output."""
    case = Cascade(14, 28, 4, 128, torch.bfloat16, 16, [1229, 300, 77], [8, 8, 4],
                   [random.Random(s).randint(0, 768) for s in range(20)], [s % 7 == 3 for s in range(20)])
    inputs = [x.cuda() for x in case.inputs()]
    out = attention.cascade_decode_attention(*[x.clone() for x in inputs], max_group=8, share=share)
    assert_within_bar(out.cpu(), case.inputs(), ref.cascade_decode_attention, case.live)
    graph, static = torch.cuda.CUDAGraph(), [x.clone() for x in inputs]
    attention.cascade_decode_attention(*static, max_group=8, share=share)  # compile outside the capture
    with torch.cuda.graph(graph):
        replayed = attention.cascade_decode_attention(*static, max_group=8, share=share)
    graph.replay()
    torch.testing.assert_close(replayed[case.live.cuda()], out[case.live.cuda()], rtol=0, atol=0)
    g = torch.Generator().manual_seed(15)
    q, k, v = (torch.randn(1606, h, 128, generator=g).bfloat16() for h in (28, 4, 4))
    cu, kc = [0, 1229, 1529, 1606], torch.zeros(120, 16, 4, 128, dtype=torch.bfloat16)
    slots = torch.randperm(1920, generator=g)[:1606]
    got = prefill.prefill_attention(q.cuda(), k.cuda(), v.cuda(), cu, kc.cuda(), kc.cuda(), slots.cuda())
    assert_within_bar(got.cpu(), (q, k, v), lambda q, k, v: ref.prefill_attention(q, k, v, cu, kc.to(q.dtype),
                                                                                   kc.to(q.dtype), slots))
