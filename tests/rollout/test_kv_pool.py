"""The paged-KV block manager: invariants under random allocate/fork/append/free sequences, page tables and slots,
the worst-case sizing and its one-line error."""
import random

import pytest
import torch

from vr1fast.rollout.kv_pool import (BlockManager, KVPool, PoolTooSmall, check_fits, page_bytes, pages_for_memory,
                                     pages_needed)

PAGE = 4


def check_invariants(pool: KVPool, live: dict[int, tuple[list[int], int, int]]) -> None:
    """Ref counts = live holders; free + used = total; every slot a live sequence owns or reads as its prefix
    still holds the id written there (its own, or its prompt's): nothing wrote over another sequence's pages."""
    bm, flat = pool.blocks, pool.k.view(-1)
    holders = [0] * bm.num_pages
    for seq, (prefix, prefix_len, parent) in live.items():
        assert bm.prefix(seq) == prefix and bm.parent(seq) == parent
        for p in bm.pages(seq) + prefix:
            holders[p] += 1
        assert (flat[bm.slots(seq, 0, bm.length(seq))] == seq).all()
        pos = torch.arange(prefix_len)
        assert (flat[torch.tensor(prefix, dtype=torch.long)[pos // PAGE] * PAGE + pos % PAGE] == parent).all()
    assert [bm.refcount(p) for p in range(bm.num_pages)] == holders
    assert bm.num_free + sum(h > 0 for h in holders) == bm.num_pages


def step(rng: random.Random, pool: KVPool, live: dict, freed: list) -> str:
    """One random operation; returns what it did. Each token slot written gets its sequence's id."""
    bm, flat = pool.blocks, pool.k.view(-1)
    op = rng.choice(["allocate", "fork", "append", "append", "free", "double_free"])
    prompts = [s for s in sorted(live) if bm.parent(s) == -1]
    try:
        if op == "allocate":
            seq = bm.allocate(rng.randint(1, 3 * PAGE))
            live[seq] = ([], 0, -1)
            flat[bm.slots(seq, 0, bm.length(seq))] = seq
        elif op == "fork" and prompts:
            prompt = rng.choice(prompts)
            for s in bm.fork(prompt, rng.randint(1, 4)):
                live[s] = (bm.pages(prompt), bm.length(prompt), prompt)
        elif op == "append" and live:
            seq = rng.choice(sorted(live))
            n, before = rng.randint(1, PAGE + 1), bm.length(seq)
            if any(bm.refcount(p) > 1 for p in bm.pages(seq)):
                with pytest.raises(ValueError, match="read-only"):
                    bm.append(seq, n)
                return "append_shared"
            bm.append(seq, n)
            flat[bm.slots(seq, before, before + n)] = seq
        elif op == "free" and live:
            seq = rng.choice(sorted(live))
            bm.free(seq)
            del live[seq]
            freed.append(seq)
        elif op == "double_free" and freed:
            with pytest.raises(ValueError, match="not live"):
                bm.free(rng.choice(freed))
        else:
            return "none"
    except PoolTooSmall:
        return "full"
    return op


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_random_sequences_keep_invariants(seed):
    rng = random.Random(seed)
    pool = KVPool(1, 23, PAGE, 1, 1, dtype=torch.float64)
    pool.k.fill_(-1.0)
    live, freed, done = {}, [], []
    for _ in range(400):
        done.append(step(rng, pool, live, freed))
        check_invariants(pool, live)
    assert {"allocate", "fork", "append", "append_shared", "free", "double_free", "full"} <= set(done)
    for seq in list(live):
        pool.blocks.free(seq)
    assert pool.blocks.num_free == pool.blocks.num_pages
    whole = pool.blocks.allocate(pool.blocks.num_pages * PAGE)   # every page was given back and is usable
    assert sorted(pool.blocks.pages(whole)) == list(range(pool.blocks.num_pages))


def test_freed_pages_are_reused_and_prompt_outlives_its_fork():
    bm = BlockManager(4, PAGE)
    prompt = bm.allocate(PAGE + 1)                     # 2 pages, the last one partly filled
    a, b = bm.fork(prompt, 2)
    assert [bm.refcount(p) for p in bm.pages(prompt)] == [3, 3]
    bm.free(prompt)                                    # the samples keep the prompt's pages
    assert bm.num_free == 2 and [bm.refcount(p) for p in bm.prefix(a)] == [2, 2]
    bm.append(a)                                       # a sample starts on a fresh page, not the prompt's last
    assert bm.pages(a) == [2] and bm.slots(a, 0, 1).tolist() == [2 * PAGE]
    bm.free(a)
    bm.append(b, PAGE + 1)                             # a's page comes back from the free list
    assert bm.pages(b) == [2, 3] and bm.num_free == 0
    with pytest.raises(PoolTooSmall, match="1 more needed, 0 free of 4"):
        bm.append(b, PAGE)
    assert bm.length(b) == PAGE + 1                    # the failed append changed nothing
    bm.free(b)
    assert bm.num_free == 4 and all(bm.refcount(p) == 0 for p in range(4))


def test_page_table_and_slots():
    bm = BlockManager(8, PAGE)
    p0, p1 = bm.allocate(3), bm.allocate(2 * PAGE + 1)
    s = bm.fork(p1, 1)[0]
    bm.append(s, PAGE + 2)
    table = bm.page_table([p0, p1, s])
    assert table.dtype == torch.int32
    assert table.tolist() == [[0, -1, -1], [1, 2, 3], [4, 5, -1]]
    assert bm.page_table([p0], width=5).shape == (1, 5)
    assert bm.slots(p1, PAGE - 1, PAGE + 1).tolist() == [1 * PAGE + PAGE - 1, 2 * PAGE]
    assert bm.slots(s, 0, PAGE + 2).tolist() == [4 * PAGE + i for i in range(PAGE)] + [5 * PAGE, 5 * PAGE + 1]
    with pytest.raises(ValueError, match="outside sequence"):
        bm.slots(s, 0, PAGE + 3)
    with pytest.raises(ValueError, match="itself a fork"):
        bm.fork(s, 2)
    with pytest.raises(ValueError, match="read-only"):
        bm.append(p1)
    bm.reset()
    assert bm.num_free == 8
    with pytest.raises(ValueError, match="not live"):
        bm.pages(p0)


def test_worst_case_need_is_exact():
    # two prompts (5 and 8 tokens), 3 and 2 samples, up to 6 new tokens each: 2 + 2 pages + 5 samples × 2 pages
    lengths, samples, max_new = [5, 8], [3, 2], 6
    need = pages_needed(lengths, samples, max_new, PAGE)
    assert need == 2 + 2 + 5 * 2
    bm = BlockManager(need, PAGE)
    check_fits(need, bm)
    for n, g in zip(lengths, samples):
        for s in bm.fork(bm.allocate(n), g):
            bm.append(s, max_new)
    assert bm.num_free == 0
    with pytest.raises(PoolTooSmall) as err:
        check_fits(need, BlockManager(need - 1, PAGE))
    assert str(err.value).count("\n") == 0
    assert f"needs {need} KV pages of {PAGE} tokens but the pool has {need - 1} free of {need - 1}" in str(err.value)
    with pytest.raises(ValueError, match="3 entries for 2 prompts"):
        pages_needed(lengths, [1, 2, 3], max_new, PAGE)


def test_pool_size_from_memory():
    per_page = page_bytes(num_layers=28, page_size=16, kv_heads=4, head_dim=128, dtype=torch.bfloat16)
    assert per_page == 16 * 57344                      # 56 KiB per token for Qwen2.5-VL-7B (docs/kv-sharing.md §2.1)
    assert pages_for_memory(10 * per_page + per_page // 2, 1.0, per_page) == 10
    assert pages_for_memory(10 * per_page, 0.5, per_page) == 5
    with pytest.raises(ValueError, match="fraction"):
        pages_for_memory(10 * per_page, 1.5, per_page)
    pool = KVPool(3, 7, PAGE, 2, 5, dtype=torch.float32)
    assert pool.k.shape == pool.v.shape == (3, 7, PAGE, 2, 5) and pool.blocks.num_pages == 7
