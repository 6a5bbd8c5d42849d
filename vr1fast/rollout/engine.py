"""The paged rollout engine: each prompt prefilled once, its KV pages shared by its samples (gpt-fast's shape).

``paged.prefill`` and ``paged.decode_one_token`` run the HF module's own layers over the KV pool; here are
``decode_n_tokens`` and ``generate`` around them (prompts packed by ``rollout.prompts``), and the two entry points
``vr1fast.rollout`` calls: ``paged_generate`` (one batch of prompts) and ``paged_rollout`` (T-GRPO's ordered +
shuffled prompts together).

One call:
1. the worst-case KV pages (every sample reaching ``max_new_tokens``) are counted from the prompt lengths and
   checked against ``kv_cache_fraction`` of the device's free memory *before any work*: a batch that cannot fit is
   one ``PoolTooSmall`` line. The pool is then allocated at exactly that size for the call (or a caller's pool is
   used, after the same check against its free pages) and every page goes back when the call ends, an exception
   included;
2. the vision encoder runs once per prompt (``model.forward.prompt_embeds``); the prompts' real tokens are packed
   (no padding) with their M-RoPE positions and prefilled in one packed pass, writing their K/V to the pages;
3. each prompt's pages are forked to its G samples (ref counts, no copy); the G first tokens are drawn from the
   prompt's last logits;
4. decode: every running sample feeds its last token at position p + 1 + k (p: its prompt's last position, k: its
   tokens so far) and attends to its group's prompt pages then its own pages (cascade tables). A sample that emits
   a stop token is done: from then on its ids are the pad id and its log-probs 0.

Host syncs. None inside a decode step: tokens, stop flags and outputs stay on the device, the page tables go up
with pinned non-blocking copies (``kernels.reference.to_device``), rebuilt only when a page fills. Every
``SYNC_EVERY`` steps the stop flags are read back once: finished samples leave the running batch (their pages are
freed, and they cost no attention or MLP work from then on) and the loop ends when none is left. So a finished
sample costs at most ``SYNC_EVERY − 1`` more steps, during which it rides along with its K/V written to its own
pages and its outputs masked. (The pure-torch ``kernels.reference_paged.paged_append`` itself selects rows with a
mask, a sync on CUDA; the Triton kernel does not.)

Kernels and graphs. ``paged.Kernels`` picks the attention once per call (Triton on CUDA, ``reference_paged``
elsewhere; ``VR1FAST_IMPL`` overrides); the decode's cascade reads each prompt's pages once per step for all its
live samples (``cascade=False``: once per sample). Every decode tensor keeps its shape for the call (page tables at
their full width), so on CUDA the decode forward runs from CUDA graphs (``rollout.graphs``) unless
``cuda_graphs=False``. Pages come from ``rollout.block_manager.BlockManager`` (C++ when built).

Randomness. Sampling (``rollout.sampling``: HF's temperature → top-k → top-p, log-prob before truncation) draws
from torch's RNG on the logits' device; ``seed`` forks and seeds it for the call (``completions.seeded``), None
draws from the global stream as HF ``generate`` does. A call is reproducible for the same seed, prompts, settings,
device and dtype; it is not HF's stream (another sampler), and a sample's tokens depend on the batch it ran in (one
[S, V] draw per step over the running samples). Greedy decoding equals HF's token for token (float32, tests).

The weights are the module's own: an optimizer step is seen by the next call. Rows are prompt-major, as HF's
``num_return_sequences``.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable, Mapping, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from vr1fast.kernels.reference import to_device
from vr1fast.rollout.completions import Completions, completion_lengths, pad_token_id, seeded, stop_token_ids
from vr1fast.rollout.kv_pool import (BlockManager, KVPool, PoolTooSmall, available_bytes, check_fits, page_bytes,
                                     pages_for_memory, pages_needed)
from vr1fast.rollout.graphs import DecodeGraphs, capturable
from vr1fast.rollout.paged import CascadeTables, Kernels, decode_one_token, new_pool, prefill, text_model
from vr1fast.rollout.prompts import Prompts, pack_prompts, prompt_lengths, shuffled_prompts
from vr1fast.rollout.sampling import check_sampling, sample

SYNC_EVERY = 16  # decode steps between two reads of the stop flags (the only host syncs of the decode loop)
EosIds = Union[int, Sequence[int], None]


@dataclass(frozen=True)
class Sampling:
    """How the next token is drawn (``rollout.sampling.sample``)."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    greedy: bool = False

    def __call__(self, logits: Tensor) -> tuple[Tensor, Tensor]:
        return sample(logits, None, temperature=self.temperature, top_k=self.top_k, top_p=self.top_p,
                      greedy=self.greedy)


def reserve_pool(model: nn.Module, lengths: Sequence[int], samples: Sequence[int], max_new_tokens: int,
                 page_size: int, kv_cache_fraction: float, pool: Optional[KVPool] = None) -> KVPool:
    """A pool with room for the worst case, or ``PoolTooSmall`` (one line) before any work is done.

    Without ``pool``, the worst case must fit in ``kv_cache_fraction`` of the free memory of the model's device, and
    a pool of exactly that many pages is allocated; with one, it must have that many pages free."""
    need = pages_needed(list(lengths), list(samples), max_new_tokens, page_size)
    if pool is not None:
        check_fits(need, pool.blocks)
        return pool
    config = model.config.get_text_config()
    weight = text_model(model).embed_tokens.weight
    per_page = page_bytes(config.num_hidden_layers, page_size, config.num_key_value_heads,
                          config.hidden_size // config.num_attention_heads, weight.dtype)
    free = available_bytes(weight.device)
    cap = pages_for_memory(free, kv_cache_fraction, per_page)
    if need > cap:
        raise PoolTooSmall(f"rollout needs {need} KV pages of {page_size} tokens ({need * per_page / 2**30:.3g} GiB) "
                           f"but kv_cache_fraction={kv_cache_fraction} of the {free / 2**30:.3g} GiB free on "
                           f"{weight.device} holds {cap}: raise rollout.kv_cache_fraction or lower the batch, "
                           f"samples or max_new_tokens")
    return new_pool(model, need, page_size)


class Held:
    """The sequences one call holds in a block manager; every one still held is freed on exit (exceptions too)."""

    def __init__(self, blocks: BlockManager):
        self.blocks, self.live = blocks, set()

    def __enter__(self) -> "Held":
        return self

    def __exit__(self, *exc) -> None:
        for seq in sorted(self.live):
            self.blocks.free(seq)
        self.live.clear()

    def allocate(self, num_tokens: int) -> int:
        seq = self.blocks.allocate(num_tokens)
        self.live.add(seq)
        return seq

    def fork(self, seq: int, n: int) -> list[int]:
        forks = self.blocks.fork(seq, n)
        self.live.update(forks)
        return forks

    def free(self, seq: int) -> None:
        self.blocks.free(seq)
        self.live.discard(seq)


@dataclass
class Decoding:
    """The state of one decode loop: the running samples (host sequences, device tensors) and the outputs."""

    pool: KVPool
    held: Held
    seqs: list[int]              # block-manager sequences of the running samples
    rows: Tensor                 # int64 [R]: their rows of the output
    groups: Tensor               # int64 [R]: their prompt
    tokens: Tensor               # int64 [R]: the last token each sampled
    done: Tensor                 # bool [R]: sampled a stop token
    table: Tensor                # int32 [R, W]: their own pages (W fixed for the call: static shapes)
    prefix_table: Tensor         # int32 [P, Wp]: each prompt's pages
    prefix_lens: Tensor          # int64 [P]
    last_pos: Tensor             # [P]: position of each prompt's last token
    ids: Tensor                  # int64 [S, max_new_tokens], pad after the stop token
    logprobs: Tensor             # float32 [S, max_new_tokens], 0 after the stop token
    stops: Tensor                # int64 [n_stop]
    pad: int
    step: Callable = None        # (tokens, positions, slots, CascadeTables) → logits: eager or CUDA graphs


def _record(d: Decoding, j: int, tokens: Tensor, logprobs: Tensor) -> None:
    """Token j of every running sample (pad and 0 for the finished ones); mark the ones that stop here."""
    tokens = tokens.masked_fill(d.done, d.pad)
    d.ids[d.rows, j] = tokens
    d.logprobs[d.rows, j] = logprobs.float().masked_fill(d.done, 0.0)
    d.done = d.done | torch.isin(tokens, d.stops)
    d.tokens = tokens


def decode_step(model: nn.Module, d: Decoding, kernels: Kernels, cuda_graphs: bool) -> Callable:
    """The call's decode forward: CUDA graphs of ``decode_one_token`` (``rollout.graphs``) when asked and
    possible, else the eager function."""
    if cuda_graphs and capturable(d.rows.device, kernels):
        return DecodeGraphs(model, d.pool, kernels, d.prefix_table, d.prefix_lens, d.rows.shape[0], d.table.shape[1])
    return functools.partial(decode_one_token, model, d.pool, kernels=kernels)


def prefill_prompts(model: nn.Module, prompts: Prompts, pool: KVPool, held: Held, sampling: Sampling,
                    stops: Sequence[int], pad: int, max_new_tokens: int, kernels: Kernels) -> Decoding:
    """One packed prefill of every prompt, the fork to its samples and their first tokens: the decode state."""
    device, bm = prompts.embeds.device, pool.blocks
    seqs = [held.allocate(n) for n in prompts.lengths]
    cu = torch.tensor([0, *prompts.lengths]).cumsum(0)
    slots = torch.cat([bm.slots(s, 0, n) for s, n in zip(seqs, prompts.lengths)])
    logits = prefill(model, pool, prompts.embeds, prompts.positions, cu, to_device(slots, device), kernels)
    prefix_table = to_device(bm.page_table(seqs), device)
    samples = [fork for s, g in zip(seqs, prompts.samples) for fork in held.fork(s, g)]
    for s in seqs:
        held.free(s)  # the samples hold the prompt pages from here on
    groups = to_device(torch.repeat_interleave(torch.arange(len(seqs)), torch.tensor(prompts.samples)), device)
    n, width = len(samples), max(1, -(-(max_new_tokens - 1) // bm.page_size))  # pages of the tokens fed back
    d = Decoding(pool, held, samples, torch.arange(n, device=device), groups,
                 torch.zeros(n, dtype=torch.long, device=device), torch.zeros(n, dtype=torch.bool, device=device),
                 torch.full((n, width), -1, dtype=torch.int32, device=device), prefix_table,
                 to_device(torch.tensor(prompts.lengths), device), prompts.positions[0, to_device(cu[1:] - 1, device)],
                 torch.full((n, max_new_tokens), pad, dtype=torch.long, device=device),
                 torch.zeros(n, max_new_tokens, dtype=torch.float32, device=device),
                 to_device(torch.tensor(list(stops)), device), pad)
    _record(d, 0, *sampling(logits[groups]))
    return d


def decode_n_tokens(model: nn.Module, d: Decoding, start: int, n: int, sampling: Sampling) -> None:
    """Tokens ``start`` … ``start + n − 1`` of every running sample, with no host sync."""
    bm, device = d.pool.blocks, d.rows.device
    for j in range(start, start + n):
        own = j - 1  # the token fed now is the sample's own token j − 1
        for seq in d.seqs:
            bm.append(seq)
        if own % bm.page_size == 0:
            d.table = to_device(bm.page_table(d.seqs, d.table.shape[1]), device)
        slots = d.table[:, own // bm.page_size].long() * bm.page_size + own % bm.page_size
        tables = CascadeTables(d.prefix_table, d.prefix_lens, d.groups, d.table, torch.full_like(d.rows, j))
        logits = d.step(d.tokens, d.last_pos[d.groups] + j, slots, tables)
        _record(d, j, *sampling(logits))


def drop_finished(d: Decoding) -> None:
    """Read the stop flags (a host sync) and remove the finished samples from the running batch, freeing their
    pages."""
    keep = (~d.done).cpu()
    for seq, kept in zip(d.seqs, keep.tolist()):
        if not kept:
            d.held.free(seq)
    d.seqs = [seq for seq, kept in zip(d.seqs, keep.tolist()) if kept]
    idx = to_device(keep.nonzero()[:, 0], d.rows.device)
    d.rows, d.groups, d.tokens, d.done, d.table = (t[idx] for t in (d.rows, d.groups, d.tokens, d.done, d.table))


def trimmed(ids: Tensor, logprobs: Tensor, stops: Sequence[int]) -> Completions:
    """Completions cut to their longest length (HF's width: generation ends when every row has stopped)."""
    lengths = completion_lengths(ids, stops)
    width = int(lengths.max()) if lengths.numel() else 0
    return Completions(ids[:, :width], lengths, logprobs[:, :width])


@torch.no_grad()
def generate(model: nn.Module, prompts: Prompts, pool: KVPool, *, max_new_tokens: int, sampling: Sampling,
             stops: Sequence[int], pad: int, cascade: bool = True, cuda_graphs: bool = True) -> Completions:
    """``prompts.samples[b]`` completions of every packed prompt b, prompt-major, with their log-probs.

    ``cascade=False``: each sample reads its prompt's pages itself (the same result; the benchmarks' stand-in for
    a prefix cache without cascade attention). ``cuda_graphs``: decode steps replayed from CUDA graphs
    (``rollout.graphs``) on CUDA with the Triton kernels; ignored elsewhere."""
    kernels = Kernels.for_device(prompts.embeds.device, max(prompts.samples), cascade)
    with Held(pool.blocks) as held:
        d = prefill_prompts(model, prompts, pool, held, sampling, stops, pad, max_new_tokens, kernels)
        d.step = decode_step(model, d, kernels, cuda_graphs)
        j = 1
        while j < max_new_tokens and d.seqs:
            n = min(SYNC_EVERY, max_new_tokens - j)
            decode_n_tokens(model, d, j, n, sampling)
            j += n
            drop_finished(d)
    return trimmed(d.ids[:, :j], d.logprobs[:, :j], stops)


def _settings(model: nn.Module, num_samples: Sequence[int], max_new_tokens: int, sampling: Sampling,
              eos_token_id: EosIds) -> tuple[list[int], int]:
    if min(num_samples) < 1 or max_new_tokens < 1:
        raise ValueError(f"paged generate: num_samples={list(num_samples)} and max_new_tokens={max_new_tokens} "
                         f"must be >= 1")
    check_sampling(sampling.temperature, sampling.top_k, sampling.top_p)
    return stop_token_ids(model, eos_token_id), pad_token_id(model)


class _EvalMode:
    """The model in eval mode for the block, its mode restored after (as ``rollout.hf``)."""

    def __init__(self, model: nn.Module):
        self.model, self.was_training = model, model.training

    def __enter__(self) -> None:
        self.model.eval()

    def __exit__(self, *exc) -> None:
        self.model.train(self.was_training)


def paged_generate(model: nn.Module, inputs: Mapping[str, Tensor], *, num_samples: int, max_new_tokens: int,
                   sampling: Sampling = Sampling(), eos_token_id: EosIds = None, seed: Optional[int] = None,
                   kv_cache_fraction: float = 0.8, page_size: int = 16, pool: Optional[KVPool] = None,
                   cascade: bool = True, cuda_graphs: bool = True) -> Completions:
    """``num_samples`` completions per prompt of ``inputs`` (PromptBatch.model_inputs(), left-padded); ``cascade``
    and ``cuda_graphs`` as ``generate``."""
    stops, pad = _settings(model, [num_samples], max_new_tokens, sampling, eos_token_id)
    lengths = prompt_lengths(inputs)
    pool = reserve_pool(model, lengths, [num_samples] * len(lengths), max_new_tokens, page_size, kv_cache_fraction,
                        pool)
    with _EvalMode(model), seeded(seed, inputs["input_ids"]), torch.no_grad():
        prompts = pack_prompts(model, inputs, num_samples)
        return generate(model, prompts, pool, max_new_tokens=max_new_tokens, sampling=sampling, stops=stops, pad=pad,
                        cascade=cascade, cuda_graphs=cuda_graphs)


def _split(out: Completions, rows: int, stops: Sequence[int]) -> tuple[Completions, Completions]:
    return (trimmed(out.ids[:rows], out.logprobs[:rows], stops),
            trimmed(out.ids[rows:], out.logprobs[rows:], stops))


def paged_rollout(model: nn.Module, ordered: Mapping[str, Tensor], shuffled: Optional[Mapping[str, Tensor]], *,
                  num_samples: int, num_shuffled: int, max_new_tokens: int, sampling: Sampling = Sampling(),
                  eos_token_id: EosIds = None, seed: Optional[int] = None, kv_cache_fraction: float = 0.8,
                  page_size: int = 16, video_rows: Optional[Sequence[int]] = None,
                  permutations: Optional[Sequence[Tensor]] = None, pool: Optional[KVPool] = None,
                  cascade: bool = True, cuda_graphs: bool = True) -> tuple[Completions, Optional[Completions]]:
    """T-GRPO's ordered and shuffled prompts in one prefill and one decode loop: (ordered completions
    [B·num_samples, L], shuffled [B_video·num_shuffled, L'] or None without shuffled prompts or samples).

    With ``video_rows`` (the ordered row of each shuffled prompt) and ``permutations`` (each video's frame
    permutation, ``data.shuffle.ShufflePair``) of a pair shuffle, the shuffled prompts reuse the ordered vision
    output by block permutation; otherwise (frame shuffle, or a 2-frame video) they get their own vision pass.
    ``cascade`` and ``cuda_graphs`` as ``generate``."""
    if shuffled is None or num_shuffled == 0:
        return paged_generate(model, ordered, num_samples=num_samples, max_new_tokens=max_new_tokens,
                              sampling=sampling, eos_token_id=eos_token_id, seed=seed,
                              kv_cache_fraction=kv_cache_fraction, page_size=page_size, pool=pool, cascade=cascade,
                              cuda_graphs=cuda_graphs), None
    stops, pad = _settings(model, [num_samples, num_shuffled], max_new_tokens, sampling, eos_token_id)
    lengths, extra = prompt_lengths(ordered), prompt_lengths(shuffled)
    samples = [num_samples] * len(lengths) + [num_shuffled] * len(extra)
    pool = reserve_pool(model, lengths + extra, samples, max_new_tokens, page_size, kv_cache_fraction, pool)
    with _EvalMode(model), seeded(seed, ordered["input_ids"]), torch.no_grad():
        first = pack_prompts(model, ordered, num_samples)
        second = shuffled_prompts(model, first, ordered, shuffled, num_shuffled, video_rows, permutations)
        out = generate(model, first + second, pool, max_new_tokens=max_new_tokens, sampling=sampling, stops=stops,
                       pad=pad, cascade=cascade, cuda_graphs=cuda_graphs)
    return _split(out, len(lengths) * num_samples, stops)
