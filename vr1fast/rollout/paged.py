"""The Qwen2.5-VL text decoder over paged KV: packed prefill of the prompts, then one token per running sample.

It runs the HF module's own submodules (``model.model.language_model``: per layer ``input_layernorm``,
``self_attn.{q,k,v,o}_proj``, ``post_attention_layernorm``, ``mlp``; then ``norm``, ``rotary_emb`` and
``model.lm_head``), so nothing is copied: an optimizer step on the policy is what the next call computes with, and
under FSDP2 / ZeRO-3 it needs the parameters gathered for the rollout, as HF ``generate`` does. Only the attention
differs from HF's: the K/V of every token goes to the pool's pages (``rollout.kv_pool``) and attention reads them
through page tables, with the kernels ``Kernels`` picks once per call: ``kernels.implementation`` for the device (the
Triton ``kernels.attention`` / ``kernels.prefill`` on CUDA, the pure-torch ``kernels.reference_paged`` elsewhere).

Layout. Prefill: the B prompts' real tokens packed one after the other (``cu_seqlens`` [B+1] on the CPU), their
input embeddings [N, H] (vision features already in place: ``model.forward.prompt_embeds``) and M-RoPE positions
[3, N] (``model.forward.prompt_positions`` with the padding removed); ``slots`` [N] are their KV slots
(``BlockManager.slots`` of each prompt sequence). Decode: S running samples, one token each at position
``p + 1 + k`` on all three axes (p: the prompt's last position, k: tokens the sample already holds), with the
cascade tables of ``kernels.reference_paged.cascade_decode_attention`` (``CascadeTables``): each sample attends to
its group's prompt pages, then to its own pages. Both return logits [B or S, V] in the model's dtype: the next
token's, from the last prompt token or the sample's token.

gpt-fast's shape: ``prefill`` and ``decode_one_token`` here; ``decode_n_tokens`` and ``generate`` (vision once per
prompt, fork to G, sampling, stop at EOS) live in ``rollout.engine``.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable, Optional, Union

import torch
from torch import Tensor, nn
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import apply_rotary_pos_emb

from vr1fast.kernels import implementation
from vr1fast.kernels.reference import to_device
from vr1fast.rollout.block_manager import BlockManager
from vr1fast.rollout.kv_pool import KVPool

Attend = Callable[[int, Tensor, Tensor, Tensor], Tensor]  # (layer, q [N,Hq,D], k, v [N,Hkv,D]) -> [N, Hq, D]


@dataclass(frozen=True)
class CascadeTables:
    """Where S decoding samples read their KV: their group's prompt pages, then their own pages."""

    prefix_table: Tensor   # int32 [P, Wp]: each prompt's pages, -1 after the last
    prefix_lens: Tensor    # int [P]: prompt lengths
    groups: Tensor         # int [S]: the prompt (row of prefix_table) of each sample
    suffix_table: Tensor   # int32 [S, Ws]: each sample's own pages
    suffix_lens: Tensor    # int [S]: each sample's own tokens, the one being decoded included


@dataclass(frozen=True)
class Kernels:
    """The attention one call runs: ``prefill`` and ``decode`` with ``kernels.reference_paged``'s signatures."""

    prefill: Callable
    decode: Callable
    capturable: bool = False  # the decode has no host sync (the Triton kernels): it can run in a CUDA graph

    @staticmethod
    def for_device(device: Union[str, torch.device], max_group: int, cascade: bool = True) -> "Kernels":
        """``kernels.implementation`` for ``device`` (``VR1FAST_IMPL`` overrides), the decode with its launch
        hints: ``max_group`` samples per prompt at most; ``cascade=False`` reads each prompt's pages once per
        sample instead of once per group (what a per-sequence paged kernel does; same result)."""
        kind = torch.device(device).type
        decode = implementation("cascade_decode_attention", device=kind)
        return Kernels(implementation("prefill_attention", device=kind),
                       functools.partial(decode, max_group=max_group, share=cascade),
                       decode.__module__ == "vr1fast.kernels.attention")


def text_model(model: nn.Module) -> nn.Module:
    """The decoder stack of a ``Qwen2_5_VLForConditionalGeneration``: ``model.model.language_model``."""
    return model.model.language_model


def new_pool(model: nn.Module, num_pages: int, page_size: int, device: Union[str, torch.device, None] = None,
             dtype: Optional[torch.dtype] = None) -> KVPool:
    """A KV pool shaped for ``model``'s decoder (its dtype and device unless given)."""
    config = model.config.get_text_config()
    weight = text_model(model).embed_tokens.weight
    head_dim = config.hidden_size // config.num_attention_heads
    return KVPool(config.num_hidden_layers, num_pages, page_size, config.num_key_value_heads, head_dim,
                  dtype=dtype or weight.dtype, device=device or weight.device, manager=BlockManager)


def _layer(layer: nn.Module, index: int, h: Tensor, cos: Tensor, sin: Tensor, attend: Attend) -> Tensor:
    """One decoder layer on N tokens h [N, H], as ``Qwen2_5_VLDecoderLayer`` with paged attention."""
    attn = layer.self_attn
    x = layer.input_layernorm(h)
    n = x.shape[0]
    q = attn.q_proj(x).view(n, -1, attn.head_dim)
    k = attn.k_proj(x).view(n, -1, attn.head_dim)
    v = attn.v_proj(x).view(n, -1, attn.head_dim)
    q, k = apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1)
    h = h + attn.o_proj(attend(index, q, k, v).reshape(n, -1))
    return h + layer.mlp(layer.post_attention_layernorm(h))


def _decoder(model: nn.Module, h: Tensor, positions: Tensor, attend: Attend) -> Tensor:
    """All layers and the final norm on N tokens: h [N, H], positions [3, N] → [N, H]."""
    lm = text_model(model)
    cos, sin = lm.rotary_emb(h, positions[:, None, :])          # [1, N, D]: M-RoPE sections recomposed
    for index, layer in enumerate(lm.layers):
        h = _layer(layer, index, h, cos[0], sin[0], attend)
    return lm.norm(h)


@torch.no_grad()
def prefill(model: nn.Module, pool: KVPool, embeds: Tensor, positions: Tensor, cu_seqlens: Tensor,
            slots: Tensor, kernels: Optional[Kernels] = None) -> Tensor:
    """Packed prompts through the decoder, their K/V written at ``slots``: logits [B, V] of each last token."""
    cu = torch.as_tensor(cu_seqlens).to("cpu", torch.int64)
    if embeds.shape[0] != positions.shape[1] or slots.shape != (embeds.shape[0],) or int(cu[-1]) != embeds.shape[0]:
        raise ValueError(f"prefill: embeds {tuple(embeds.shape)}, positions {tuple(positions.shape)}, slots "
                         f"{tuple(slots.shape)} and cu_seqlens ending at {int(cu[-1])} must share the N packed tokens")

    layers = text_model(model).layers
    run = (kernels or Kernels.for_device(embeds.device, 1)).prefill

    def attend(i: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        return run(q, k, v, cu, pool.k[i], pool.v[i], slots, layers[i].self_attn.scaling)

    hidden = _decoder(model, embeds, positions, attend)
    return model.lm_head(hidden[to_device(cu[1:] - 1, hidden.device)])


@torch.no_grad()
def decode_one_token(model: nn.Module, pool: KVPool, tokens: Tensor, positions: Tensor, slots: Tensor,
                     tables: CascadeTables, kernels: Optional[Kernels] = None) -> Tensor:
    """One token per sample: tokens, positions, slots [S] (slot -1: a finished sample, nothing written)
    → logits [S, V]. No host sync with the Triton kernels: the step can be captured in a CUDA graph."""
    lm = text_model(model)
    run = (kernels or Kernels.for_device(tokens.device, tokens.shape[0])).decode

    def attend(i: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        return run(q, k, v, pool.k[i], pool.v[i], slots, tables.prefix_table, tables.prefix_lens, tables.groups,
                   tables.suffix_table, tables.suffix_lens, lm.layers[i].self_attn.scaling)

    hidden = _decoder(model, lm.embed_tokens(tokens), positions.expand(3, -1), attend)
    return model.lm_head(hidden)
