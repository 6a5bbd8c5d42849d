"""The prompt computed once per group: the decoder over prompt ‖ completion₁ ‖ … ‖ completion_G.

GRPO scores G completions of each prompt. The repeated layout (``forward.repeated_hidden``, Video-R1's) runs the
decoder over G copies of the prompt; at Video-R1's shape (a prompt of ≈1.2k tokens, mostly video, completions of
≈390) two thirds of its tokens are copies. Here every group is laid out once, and all groups of the batch are
packed into one row of T tokens with no padding anywhere:

    [prompt₀ real tokens | c₀,₀[:l−1] | c₀,₁[:l−1] | … | prompt₁ real tokens | c₁,₀[:l−1] | …]

Completion g contributes its first l_g − 1 tokens (the inputs that predict its tokens 1 … l_g − 1; token 0 is
predicted by the prompt's last token, its last token predicts nothing that is scored). A token of group b attends
to a key of the same group when the key is not later in the row and the key is a prompt token or a token of its
own completion:

    allowed(q, k) = group[q] = group[k] ∧ k ≤ q ∧ (member[k] = 0 ∨ member[k] = member[q])

(member 0: the prompt; g + 1: completion g). Prompt tokens see the prompt causally, completion tokens the whole
prompt and their own earlier tokens: row for row what the repeated layout computes. Positions are explicit:
the prompt's own M-RoPE positions (``get_rope_index`` over the left-padded prompt, padding dropped), completion
token k at (the prompt's last position) + 1 + k on all three axes, as in the repeated layout. The prompt's hidden
states exist once, so the gradient reaching them is the sum over the G completions, as the repeated layout's
copies sum it. Output: the hidden states that predict the completion tokens, packed (real tokens only,
completion after completion): the record the head consumes (``forward.CompletionRows``).

The attention goes through transformers' registry with no copy of the model code: the mask (a
:class:`PromptOnceMask`) is passed as ``attention_mask={"full_attention": mask}`` (the text model then builds no
mask of its own) and reaches the configured attention function of every layer. On import this module wraps the
registered functions (sdpa, flash-attention, flex) so that one seeing a ``PromptOnceMask`` runs
:func:`prompt_once_attention` and any other mask goes to the original function unchanged: generation, the vision
tower and every other forward are untouched, and the wrapper is chosen by the mask object itself, so a gradient
checkpoint's recomputation in the backward (after this forward returned) takes the same path.
:func:`prompt_once_attention` runs

- ``dense`` (CPU, and wherever FlexAttention is not wanted): SDPA with the explicit boolean mask [1, 1, T, T].
  Exact and differentiable; FlexAttention has no CPU backward.
- ``flex`` (CUDA): compiled FlexAttention with a BlockMask built from the same rule (``mask_mod``): blocks that
  are all masked (other groups, other completions) cost no work, and there is no padding to skip.

An ``eager`` model has no registered function to wrap: :func:`shared_hidden` refuses it with a one-line error.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Mapping, Optional, Sequence

import torch
from torch import Tensor
from torch.nn import functional as F
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

ATTENTIONS = ("auto", "dense", "flex")
_WRAPPED = "_vr1fast_prompt_once"


@dataclass(frozen=True)
class SharedLayout:
    """Where each token of the packed row comes from and which rows predict the completion tokens (host-built,
    moved to the device once). T tokens in the row, N = Σ lengths predicted completion tokens."""

    source: Tensor     # int64 [T]: row of cat(prompt embeds [B·P, H], packed completion-input embeds) per token
    input_ids: Tensor  # int64 [T − prompt tokens]: the completion tokens that are inputs, in row order
    prompt_of: Tensor  # int64 [T]: the group (prompt) of each token
    member: Tensor     # int64 [T]: 0 for a prompt token, g + 1 for a token of completion g
    step: Tensor       # int64 [T]: k for completion token k (position = prompt's last + 1 + k); −1 for the prompt
    predict: Tensor    # int64 [N]: the row whose output predicts each completion token, completion after completion

    @property
    def tokens(self) -> int:
        return self.source.numel()


def shared_layout(prompt_mask: Tensor, completion_ids: Tensor, lengths: Sequence[int], num_samples: int,
                  device: torch.device) -> SharedLayout:
    """The packed row of B groups (module docstring). ``prompt_mask``: the left-padded prompts' attention mask
    [B, P]; ``completion_ids`` [B·G, L] prompt-major; ``lengths``: the B·G completion lengths (host)."""
    B, P = prompt_mask.shape
    G, L = num_samples, completion_ids.shape[1]
    real = prompt_mask.sum(1).tolist()
    if any(not (1 <= p <= P) for p in real) or (prompt_mask[:, -1] == 0).any():
        raise ValueError("prompts must be left-padded with at least one real token (attention_mask ends in 1)")
    source, prompt_of, member, step, predict, inputs = [], [], [], [], [], []
    row, n_prompt_rows = 0, B * P
    for b in range(B):
        p = real[b]
        source.extend(range(b * P + P - p, (b + 1) * P))
        prompt_of.extend([b] * p)
        member.extend([0] * p)
        step.extend([-1] * p)
        last = row + p - 1  # the prompt's last token predicts every completion's token 0
        row += p
        for g in range(G):
            i, n = b * G + g, int(lengths[b * G + g])
            if n <= 0:
                continue
            predict.append(last)
            m = n - 1  # completion tokens 0 … n − 2 are inputs
            source.extend(range(n_prompt_rows + len(inputs), n_prompt_rows + len(inputs) + m))
            inputs.extend(range(i * L, i * L + m))
            prompt_of.extend([b] * m)
            member.extend([g + 1] * m)
            step.extend(range(m))
            predict.extend(range(row, row + m))
            row += m
    t = functools.partial(torch.tensor, dtype=torch.int64, device=device)
    flat_ids = completion_ids.reshape(-1)
    return SharedLayout(t(source), flat_ids[t(inputs)] if inputs else flat_ids[:0], t(prompt_of), t(member),
                        t(step), t(predict))


def allowed(layout: SharedLayout) -> Tensor:
    """The dense rule: bool [T, T], allowed[q, k] (module docstring)."""
    g, m = layout.prompt_of, layout.member
    T = layout.tokens
    causal = torch.ones(T, T, dtype=torch.bool, device=g.device).tril()
    return causal & (g[:, None] == g[None, :]) & ((m[None, :] == 0) | (m[None, :] == m[:, None]))


def _mask_mod(layout: SharedLayout):
    g, m = layout.prompt_of, layout.member

    def mask_mod(b, h, q, k):
        return (k <= q) & (g[q] == g[k]) & ((m[k] == 0) | (m[k] == m[q]))
    return mask_mod


@dataclass(frozen=True)
class PromptOnceMask:
    """The attention mask of the packed row, for :func:`prompt_once_attention`: ``dense`` bool [1, 1, T, T] or a
    FlexAttention ``block`` mask."""

    dense: Optional[Tensor] = None
    block: Optional[object] = None

    @classmethod
    def build(cls, layout: SharedLayout, attention: str = "auto") -> "PromptOnceMask":
        if attention not in ATTENTIONS:
            raise ValueError(f"prompt-once attention must be one of {ATTENTIONS}, got {attention!r}")
        device = layout.source.device
        if attention == "dense" or (attention == "auto" and device.type != "cuda"):
            return cls(dense=allowed(layout)[None, None])
        from torch.nn.attention.flex_attention import create_block_mask
        T = layout.tokens
        return cls(block=create_block_mask(_mask_mod(layout), None, None, T, T, device=device))


@functools.lru_cache(maxsize=1)
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention
    return torch.compile(flex_attention, dynamic=True)


def prompt_once_attention(module, query: Tensor, key: Tensor, value: Tensor, mask: PromptOnceMask,
                          dropout: float = 0.0, scaling: Optional[float] = None, **kwargs) -> tuple[Tensor, None]:
    """Attention of the packed row under ``mask``, in transformers' attention-function form: query [1, Hq, T, D],
    key / value [1, Hkv, T, D] (GQA not repeated) → ([1, T, Hq, D], None)."""
    gqa = query.shape[1] != key.shape[1]
    if mask.block is not None:
        if dropout:
            raise ValueError("prompt-once FlexAttention has no attention dropout (Qwen2.5-VL's is 0)")
        out = _compiled_flex()(query, key, value, block_mask=mask.block, scale=scaling, enable_gqa=gqa)
    else:
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask.dense, dropout_p=dropout,
                                             scale=scaling, enable_gqa=gqa)
    return out.transpose(1, 2).contiguous(), None


def _dispatching(original):
    @functools.wraps(original)
    def attention(module, query, key, value, attention_mask, *args, **kwargs):
        if isinstance(attention_mask, PromptOnceMask):
            return prompt_once_attention(module, query, key, value, attention_mask, *args, **kwargs)
        return original(module, query, key, value, attention_mask, *args, **kwargs)
    setattr(attention, _WRAPPED, original)
    return attention


def install() -> None:
    """Wrap every registered attention function (module docstring); idempotent."""
    for name in list(AttentionInterface._global_mapping):
        fn = AttentionInterface._global_mapping[name]
        if not hasattr(fn, _WRAPPED):
            AttentionInterface.register(name, _dispatching(fn))


def supports(model) -> bool:
    """Whether the text decoder's attention function routes a :class:`PromptOnceMask` (not ``eager``)."""
    name = model.model.language_model.config._attn_implementation
    return name in ALL_ATTENTION_FUNCTIONS and hasattr(ALL_ATTENTION_FUNCTIONS[name], _WRAPPED)


def shared_hidden(model, embeds: Tensor, prompt_positions: Tensor, inputs: Mapping[str, Tensor],
                  completion_ids: Tensor, lengths: Sequence[int], *, num_samples: int,
                  attention: str = "auto") -> Tensor:
    """Final-norm hidden states [N, H] that predict the N = Σ lengths completion tokens, completion after
    completion, from the prompt-once layout. ``embeds`` [B, P, H] and ``prompt_positions`` [3, B, P] are the
    prompts' (``forward.prompt_embeds`` / ``forward.prompt_positions``)."""
    install()
    text = model.model.language_model
    if not supports(model):
        raise ValueError(f"model.share_prompt needs the decoder's attention to be sdpa, flash_attention_2/3 or "
                         f"flex_attention, not {text.config._attn_implementation!r}: set model.attn_implementation="
                         f"sdpa or model.share_prompt=false")
    if any(kind != "full_attention" for kind in text.config.layer_types):
        raise ValueError("model.share_prompt does not support sliding-window decoder layers "
                         "(text_config.use_sliding_window); set model.share_prompt=false")
    device = embeds.device
    layout = shared_layout(inputs["attention_mask"], completion_ids, lengths, num_samples, device)
    B, P, H = embeds.shape
    rows = torch.cat([embeds.reshape(B * P, H), model.get_input_embeddings()(layout.input_ids).to(embeds.dtype)])
    hidden_in = rows.index_select(0, layout.source)[None]
    is_prompt = layout.step < 0
    prompt_pos = prompt_positions.reshape(3, B * P).index_select(1, layout.source.clamp(max=B * P - 1))
    last = prompt_positions[0, :, -1].index_select(0, layout.prompt_of)  # a prompt ends in text: one position
    positions = torch.where(is_prompt, prompt_pos, last + 1 + layout.step)[:, None, :]      # [3, 1, T]
    mask = PromptOnceMask.build(layout, attention)
    out = text(inputs_embeds=hidden_in, attention_mask={"full_attention": mask}, position_ids=positions,
               use_cache=False)
    return out.last_hidden_state[0].index_select(0, layout.predict)


install()
