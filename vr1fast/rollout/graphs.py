"""CUDA graphs of the paged engine's decode step, captured per rollout and per batch bucket, then replayed.

What is captured: ``paged.decode_one_token`` with the Triton kernels (token ids → logits: embedding, every layer's
projections, KV append, cascade attention, MLP, norm, LM head; no host sync, static shapes). What stays eager:
sampling (its RNG draw and top-p sort act on the logits the graph leaves), the page-table uploads, the stop flags.
A decode step of a 7B model is ~30 kernels a layer; replayed, their launch cost is paid once per step, not per
kernel (gpt-fast and vLLM capture the same region).

Why per rollout. A graph replays the addresses it was captured with. The KV pool is allocated for each call at its
exact size (``engine.reserve_pool``) and, under FSDP2 / ZeRO-3, the gathered weights are fresh storage for each
rollout, so a graph cannot outlive its call in any strategy: ``DecodeGraphs`` lives as long as one ``generate``,
captures lazily, and is freed with it. (Within a call every address is stable: the weights are gathered for the
whole rollout and the engine calls the layers' submodules directly, so no FSDP / ZeRO hook runs in a step.)

Buckets. The running batch shrinks every ``engine.SYNC_EVERY`` steps as finished samples leave, and a graph has
fixed shapes: S running samples replay the graph of the smallest bucket ≥ S among S₀ (the first decode batch) and
the powers of two below it, with rows S… of the bucket as padding (slot −1 and length 0: no K/V written, no
attention read, their logits dropped). So at most ⌊log₂ S₀⌋ + 2 captures per rollout. The first step of a bucket
runs eagerly on a side stream (the warm-up PyTorch asks for, which also compiles the Triton kernels at those shapes)
and *is* that step's result; the capture after it records without executing.

The measured choice between this and eager decoding (``rollout.cuda_graphs=false``, vLLM's ``enforce_eager``), the
capture cost included, is the ``engine`` stage of ``scripts/gpu_validate.sh``.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from vr1fast.rollout.kv_pool import KVPool
from vr1fast.rollout.paged import CascadeTables, Kernels, decode_one_token


def capturable(device: torch.device, kernels: Kernels) -> bool:
    """Graphs need a CUDA device and the Triton kernels (the pure-torch reference syncs with the host)."""
    return device.type == "cuda" and kernels.capturable


def buckets(first: int) -> list[int]:
    """The batch sizes graphs are captured for, largest first: ``first`` and the powers of two below it."""
    if first < 1:
        raise ValueError(f"buckets: the first decode batch must hold >= 1 sample, got {first}")
    sizes = [first]
    while sizes[-1] > 1:
        sizes.append(1 << ((sizes[-1] - 1).bit_length() - 1))
    return sizes


def bucket_for(n: int, sizes: list[int]) -> int:
    """The smallest of ``sizes`` (descending) holding ``n`` rows."""
    fits = [s for s in sizes if s >= n]
    if not fits:
        raise ValueError(f"bucket_for: {n} running samples exceed the first decode batch {sizes[0]}")
    return fits[-1]


class DecodeGraphs:
    """``decode_one_token(model, pool, tokens, positions, slots, tables, kernels)`` as CUDA graphs for one call.

    Called as the eager step is: ``(tokens, positions, slots, tables) → logits [S, V]``, for S ≤ ``capacity``
    running samples whose ``tables`` use the call's fixed prompt tables and suffix tables ``width`` pages wide."""

    def __init__(self, model: nn.Module, pool: KVPool, kernels: Kernels, prefix_table: Tensor, prefix_lens: Tensor,
                 capacity: int, width: int):
        device = prefix_table.device
        self.model, self.pool, self.kernels = model, pool, kernels
        self.prefix_table, self.prefix_lens = prefix_table, prefix_lens
        self.sizes = buckets(capacity)
        self.tokens = torch.zeros(capacity, dtype=torch.long, device=device)
        self.positions = torch.zeros(capacity, dtype=torch.long, device=device)
        self.slots = torch.full((capacity,), -1, dtype=torch.long, device=device)
        self.groups = torch.zeros(capacity, dtype=torch.long, device=device)
        self.table = torch.full((capacity, width), -1, dtype=torch.int32, device=device)
        self.lens = torch.zeros(capacity, dtype=torch.long, device=device)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, Tensor]] = {}
        self.mempool = None  # one memory pool for all of the call's graphs, made at the first capture

    def _forward(self, b: int) -> Tensor:
        tables = CascadeTables(self.prefix_table, self.prefix_lens, self.groups[:b], self.table[:b], self.lens[:b])
        return decode_one_token(self.model, self.pool, self.tokens[:b], self.positions[:b], self.slots[:b], tables,
                                self.kernels)

    def _fill(self, n: int, b: int, tokens: Tensor, positions: Tensor, slots: Tensor, tables: CascadeTables) -> None:
        if tables.prefix_table is not self.prefix_table or tables.suffix_table.shape[1] != self.table.shape[1]:
            raise ValueError("DecodeGraphs: a step's prompt table or suffix width differs from the captured call's")
        for buf, x, pad in ((self.tokens, tokens, 0), (self.positions, positions, 0), (self.slots, slots, -1),
                            (self.groups, tables.groups, 0), (self.table, tables.suffix_table, -1),
                            (self.lens, tables.suffix_lens, 0)):
            buf[:n].copy_(x, non_blocking=True)
            if b > n:
                buf[n:b].fill_(pad)

    def _capture(self, b: int) -> Tensor:
        main = torch.cuda.current_stream()
        side = torch.cuda.Stream()
        side.wait_stream(main)
        with torch.cuda.stream(side):
            logits = self._forward(b)
        main.wait_stream(side)
        logits.record_stream(main)
        graph = torch.cuda.CUDAGraph()
        self.mempool = self.mempool or torch.cuda.graph_pool_handle()
        with torch.cuda.graph(graph, pool=self.mempool):
            out = self._forward(b)
        self.graphs[b] = (graph, out)
        return logits

    def __call__(self, tokens: Tensor, positions: Tensor, slots: Tensor, tables: CascadeTables) -> Tensor:
        n = tokens.shape[0]
        b = bucket_for(n, self.sizes)
        self._fill(n, b, tokens, positions, slots, tables)
        if b not in self.graphs:
            return self._capture(b)[:n]
        graph, out = self.graphs[b]
        graph.replay()
        return out[:n]
