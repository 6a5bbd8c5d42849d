"""Paged KV cache: one pool of fixed-size pages, allocated once, and the block manager that hands them out.

A *page* holds ``page_size`` consecutive token slots of every layer's K and V; slot s of page p is the flat slot
``p · page_size + s``. The pool's tensors are ``k, v: [num_layers, num_pages, page_size, kv_heads, head_dim]``
(layer l's cache is ``k[l]``, which the paged attention of ``kernels.reference_paged`` reads).

Sequences (the cascade layout of ``docs/kv-sharing.md`` §7): a *prompt* sequence owns fresh pages holding its
tokens; ``fork(prompt, G)`` makes G *sample* sequences that share all of the prompt's pages, read-only, as their
prefix (the pages' ref counts rise by G, nothing is copied), and own no page yet. A sample's tokens go on its own
fresh pages, never on the prompt's last, partly filled page; attention reads the prompt pages (prefix page table
and prompt length) and then the sample's own pages (its page table and length), and merges the two. So no shared
page is ever written and there is no copy-on-write.

``BlockManager`` is the host-side interface part 2 re-implements in C++ (``csrc/block_manager.cpp``), same methods:
    allocate(num_tokens) -> seq             a prompt of num_tokens slots on fresh pages (ref 1 each)
    fork(seq, n) -> [seq]                   n samples whose prefix is seq's pages (each page's ref += n)
    append(seq, num_tokens=1)               num_tokens more own slots, a fresh page whenever the last is full
    free(seq)                               drop seq's holds; a page whose ref count reaches 0 is free again
    reset()                                 release everything (after a rollout, or a weight update)
    length(seq), pages(seq)                 own slots, own pages (in order)
    parent(seq), prefix(seq)                the forked-from prompt (-1 for a prompt) and its pages at the fork
    refcount(page), num_free, num_pages, page_size
    page_table(seqs, width) -> int32        [len(seqs), width] own pages of each seq, -1 after its last page
    slots(seq, start, stop) -> int64        flat slots of seq's own tokens start..stop-1
A holder is a live sequence: a page's ref count is the number of live sequences that hold it (as own page or
prefix), so a prompt may be freed right after its fork while its samples keep its pages. A page goes back to the
free list (LIFO) when its last holder is freed. Errors are ValueErrors naming the sequence or page; running out of
pages raises ``PoolTooSmall``. ``pages_needed`` + ``check_fits`` raise it before a rollout starts, from the worst
case (every sample reaching max_new_tokens), so a batch that cannot fit fails with one line instead of an
out-of-memory error deep inside decode.
"""
from __future__ import annotations

import os
from typing import Optional, Sequence, Union

import torch
from torch import Tensor


class PoolTooSmall(RuntimeError):
    """A rollout needs more KV pages than the pool has free."""


def page_bytes(num_layers: int, page_size: int, kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
    """Bytes of one page: K and V of every layer."""
    return 2 * num_layers * page_size * kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()


def pages_for_memory(available_bytes: int, fraction: float, bytes_per_page: int) -> int:
    """Pages that fit in ``fraction`` of ``available_bytes``."""
    if not 0 < fraction <= 1:
        raise ValueError(f"KV memory fraction must be in (0, 1], got {fraction}")
    return int(available_bytes * fraction) // bytes_per_page


def available_bytes(device: Union[str, torch.device]) -> int:
    """Free memory of ``device`` now: the CUDA allocator's free bytes, or the host's available RAM."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def pages_needed(prompt_lengths: Sequence[int], num_samples: Union[int, Sequence[int]], max_new_tokens: int,
                 page_size: int) -> int:
    """Worst-case pages of a rollout: every prompt's pages plus max_new_tokens slots on own pages per sample.

    ``num_samples``: samples per prompt (one int for all, or one per prompt).
    """
    counts = [num_samples] * len(prompt_lengths) if isinstance(num_samples, int) else list(num_samples)
    if len(counts) != len(prompt_lengths):
        raise ValueError(f"num_samples has {len(counts)} entries for {len(prompt_lengths)} prompts")
    per_sample = -(-max_new_tokens // page_size)
    return sum(-(-int(n) // page_size) + g * per_sample for n, g in zip(prompt_lengths, counts))


def check_fits(need: int, manager: "BlockManager", what: str = "rollout") -> None:
    """Raise ``PoolTooSmall`` (one line: the need and the pool's size) when ``need`` pages are not free."""
    if need > manager.num_free:
        raise PoolTooSmall(f"{what} needs {need} KV pages of {manager.page_size} tokens but the pool has "
                           f"{manager.num_free} free of {manager.num_pages}: raise the KV memory fraction or "
                           f"lower the batch, samples or max_new_tokens")


class BlockManager:
    """Free list and ref counts of ``num_pages`` pages of ``page_size`` slots; the interface is in the module
    docstring."""

    def __init__(self, num_pages: int, page_size: int):
        if num_pages < 1 or page_size < 1:
            raise ValueError(f"BlockManager: num_pages={num_pages} and page_size={page_size} must be >= 1")
        self.num_pages, self.page_size = num_pages, page_size
        self.reset()

    def reset(self) -> None:
        self._free = list(range(self.num_pages - 1, -1, -1))  # pop() hands out page 0 first
        self._refs = [0] * self.num_pages
        self._own: dict[int, list[int]] = {}
        self._len: dict[int, int] = {}
        self._parent: dict[int, int] = {}
        self._prefix: dict[int, list[int]] = {}
        self._next_id = 0

    @property
    def num_free(self) -> int:
        return len(self._free)

    def refcount(self, page: int) -> int:
        if not 0 <= page < self.num_pages:
            raise ValueError(f"page {page} is not in the pool (0..{self.num_pages - 1})")
        return self._refs[page]

    def _seq(self, seq: int) -> list[int]:
        if seq not in self._own:
            raise ValueError(f"sequence {seq} is not live (never allocated, or already freed)")
        return self._own[seq]

    def _take(self, n: int) -> list[int]:
        if n > len(self._free):
            raise PoolTooSmall(f"KV pool out of pages: {n} more needed, {len(self._free)} free of {self.num_pages}")
        pages = [self._free.pop() for _ in range(n)]
        for p in pages:
            self._refs[p] = 1
        return pages

    def _new(self, pages: list[int], length: int, parent: int, prefix: list[int]) -> int:
        seq, self._next_id = self._next_id, self._next_id + 1
        self._own[seq], self._len[seq], self._parent[seq], self._prefix[seq] = pages, length, parent, prefix
        return seq

    def allocate(self, num_tokens: int) -> int:
        if num_tokens < 1:
            raise ValueError(f"allocate: a prompt needs at least one token, got {num_tokens}")
        return self._new(self._take(-(-num_tokens // self.page_size)), num_tokens, -1, [])

    def fork(self, seq: int, n: int) -> list[int]:
        pages = self._seq(seq)
        if n < 1:
            raise ValueError(f"fork: sequence {seq} needs n >= 1 samples, got {n}")
        if self._parent[seq] != -1:
            raise ValueError(f"fork: sequence {seq} is itself a fork (one prefix level only)")
        for p in pages:
            self._refs[p] += n
        return [self._new([], 0, seq, list(pages)) for _ in range(n)]

    def append(self, seq: int, num_tokens: int = 1) -> None:
        pages = self._seq(seq)
        if num_tokens < 1:
            raise ValueError(f"append: sequence {seq} needs num_tokens >= 1, got {num_tokens}")
        if any(self._refs[p] > 1 for p in pages):
            raise ValueError(f"append: sequence {seq} has pages shared by its forks; they are read-only")
        length = self._len[seq] + num_tokens
        pages += self._take(-(-length // self.page_size) - len(pages))
        self._len[seq] = length

    def free(self, seq: int) -> None:
        for p in self._seq(seq) + self._prefix[seq]:
            self._refs[p] -= 1
            if self._refs[p] == 0:
                self._free.append(p)
        del self._own[seq], self._len[seq], self._parent[seq], self._prefix[seq]

    def length(self, seq: int) -> int:
        self._seq(seq)
        return self._len[seq]

    def pages(self, seq: int) -> list[int]:
        return list(self._seq(seq))

    def parent(self, seq: int) -> int:
        self._seq(seq)
        return self._parent[seq]

    def prefix(self, seq: int) -> list[int]:
        self._seq(seq)
        return list(self._prefix[seq])

    def page_table(self, seqs: Sequence[int], width: int = 0) -> Tensor:
        rows = [self._seq(s) for s in seqs]
        width = max([width, *map(len, rows)])
        table = torch.full((len(rows), width), -1, dtype=torch.int32)
        for i, pages in enumerate(rows):
            table[i, :len(pages)] = torch.tensor(pages, dtype=torch.int32)
        return table

    def slots(self, seq: int, start: int, stop: int) -> Tensor:
        pages = self._seq(seq)
        if not 0 <= start <= stop <= self._len[seq]:
            raise ValueError(f"slots: range {start}..{stop} outside sequence {seq}'s {self._len[seq]} tokens")
        pos = torch.arange(start, stop)
        return torch.tensor(pages, dtype=torch.int64)[pos // self.page_size] * self.page_size + pos % self.page_size


class KVPool:
    """The K and V pages of every layer, allocated once, and a block manager (``blocks``) over them: ``manager``
    (default this module's ``BlockManager``; the engine passes ``rollout.block_manager.BlockManager``, the C++ one
    when built)."""

    def __init__(self, num_layers: int, num_pages: int, page_size: int, kv_heads: int, head_dim: int, *,
                 dtype: torch.dtype, device: Union[str, torch.device] = "cpu", manager: Optional[type] = None):
        shape = (num_layers, num_pages, page_size, kv_heads, head_dim)
        self.k = torch.empty(shape, dtype=dtype, device=device)  # [layers, pages, page_size, kv_heads, head_dim]
        self.v = torch.empty(shape, dtype=dtype, device=device)
        self.blocks = (manager or BlockManager)(num_pages, page_size)
