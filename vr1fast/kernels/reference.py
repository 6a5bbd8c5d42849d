"""Pure-torch references for the log-prob, GRPO-loss and patchify kernels: the specification every Triton kernel
matches. ``patchify_frames`` (uint8 video frames → Qwen2.5-VL pixel_values) is documented at its definition.

Log-probs (one token; z its logits [V], y its target id, T the sampling temperature, s = z / T):
    logp    = s_y - lse(s)                                  lse(s) = log Σ_v exp(s_v)
    entropy = lse(s) - Σ_v p_v s_v                          p = softmax(s)
Math runs in fp32 (fp64 for fp64 input) whatever the logits dtype; outputs are fp32 (fp64 for fp64 input).
Deviation from TRL/Video-R1: they run log_softmax in bf16 on bf16 logits (≈4e-3 error); fp32 math is exact-er.

GRPO loss on per-token log-probs ℓ [B,T], mask m [B,T], advantages A [B] (TRL ``_compute_loss`` semantics):
    r       = ℓ - ℓ_old, with ℓ_old = sg(ℓ) when old_logprobs is None (on-policy: ratio exp(ℓ - sg ℓ) ≡ 1 in value,
              gradient that of ℓ: exactly Video-R1's μ=1 loss)
    log w   = r (token level) | Σ_t r·m / max(Σ_t m, 1) per sequence (sequence level, GSPO)
    w1      = min(exp(log w), δ) if delta else exp(log w);   w2 = clamp(exp(log w), 1-ε_low, 1+ε_high)
    k3      = e^x - x - 1,  x = clamp(ℓ_ref - ℓ, -c, c) with c = kl_clamp (Video-R1: 10), x = ℓ_ref - ℓ when None (TRL)
    L       = -min(w1·A, w2·A) + β·k3
Aggregation (n_i = Σ_t m_it):
    grpo    mean_i[ Σ_t L·m / max(n_i, 1) ]      Video-R1 divides by n_i unclamped; n_i ≥ 1 for every real
                                                 completion, so the clamp (TRL's) only turns an all-masked row's
                                                 0/0 = NaN into a row that contributes 0 (it still counts in B)
    bnpo    Σ L·m / max(Σ n_i, 1)
    dr_grpo Σ L·m / (B · max_completion_length)
    dapo    Σ L·m / num_items; num_items = TRL's num_items_in_batch / num_processes (active tokens of the whole
            generation batch per process), default the active tokens of this batch, Σ n_i (clamped to ≥ 1)
Metrics (detached 0-dim tensors, masked means over all active tokens as TRL logs them): ``kl`` (mean k3, only when
ref_logprobs is given), ``ratio`` (mean exp(log w)), ``clip_low`` (w < 1-ε_low and A < 0), ``clip_high``
(w > 1+ε_high and A > 0), ``clip_region`` (either).

Shapes: logits [B,T,V]; hidden [B,T,H]; weight [V,H]; index, mask, ref/old log-probs [B,T]; advantages [B].
The log-prob functions also take any leading shape ([..., V] / [..., H] with index [...]).
Packed layout (``offsets=``, int64 [B+1] on the CPU, flash-attn's cu_seqlens): the B sequences' real tokens one
after the other, sequence i at rows offsets[i]:offsets[i+1]; hidden [N, H], index / ref / old log-probs [N], mask
[N] or None (all real), advantages [B]. Every value and gradient equals that of the padded layout with those tokens
(``padded`` scatters a packed tensor into [B, max length]); the loss types normalise over the same tokens.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from vr1fast.model.qwen import CLIP_MEAN, CLIP_STD, MERGE_SIZE, PATCH_DIM, PATCH_SIZE, TEMPORAL_PATCH_SIZE

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
IS_LEVELS = ("token", "sequence")
# Defaults = Video-R1's loss (LossConfig's defaults); every key of **cfg.
DEFAULTS = dict(beta=0.04, loss_type="grpo", epsilon_low=0.2, epsilon_high=0.2, delta=None,
                importance_sampling_level="token", kl_clamp=10.0, temperature=1.0, max_completion_length=None,
                num_items=None)
# linear_logprobs materialises at most this many logits at once (rows per chunk = CHUNK_ELEMENTS // V).
CHUNK_ELEMENTS = 1 << 24


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# ---------------------------------------------------------------- log-probs


def selective_log_softmax(logits: Tensor, index: Tensor, temperature: float = 1.0,
                          return_entropy: bool = False):
    """log softmax(logits / T) gathered at ``index``: logits [..., V], index [...] → fp32 log-probs [...].

    With ``return_entropy`` also the entropy of softmax(logits / T) per row: ``(logp, entropy)``.
    """
    if logits.shape[:-1] != index.shape:
        raise ValueError(f"selective_log_softmax: index shape {tuple(index.shape)} does not match logits "
                         f"{tuple(logits.shape)} without the vocab dim")
    s = logits.to(_compute_dtype(logits.dtype)) / temperature
    lse = torch.logsumexp(s, dim=-1)
    logp = s.gather(-1, index.long().unsqueeze(-1)).squeeze(-1) - lse
    if not return_entropy:
        return logp
    entropy = lse - (torch.softmax(s, dim=-1) * s).sum(-1)
    return logp, entropy


def _head_chunk(hidden: Tensor, weight: Tensor, index: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
    """One chunk of rows: logits = hidden @ weight.T in the inputs' dtype (as the model's lm_head), fp32 after."""
    return selective_log_softmax(hidden @ weight.T, index, temperature, return_entropy=True)


def linear_logprobs(hidden: Tensor, weight: Tensor, index: Tensor, temperature: float = 1.0,
                    return_entropy: bool = False, *, chunk_size: Optional[int] = None):
    """Log-probs (and entropy) of ``index`` under softmax(hidden @ weight.T / T), never holding N×V logits.

    hidden [..., H], weight [V, H], index [...] → fp32 log-probs [...] (fp64 for fp64 input). Rows are processed in
    chunks of ``chunk_size`` (default CHUNK_ELEMENTS // V); with autograd each chunk is checkpointed, so backward
    recomputes that chunk's logits (8NHV in all, like the fused kernel) and peak memory stays one chunk of logits.
    The GEMM runs in the inputs' dtype like the model's lm_head; pass fp32/fp64 inputs for an exact reference.
    """
    if hidden.shape[:-1] != index.shape or weight.shape[-1] != hidden.shape[-1]:
        raise ValueError(f"linear_logprobs: hidden {tuple(hidden.shape)}, weight {tuple(weight.shape)} and index "
                         f"{tuple(index.shape)} do not fit ([..., H], [V, H], [...])")
    rows = chunk_size or max(1, CHUNK_ELEMENTS // weight.shape[0])
    h = hidden.reshape(-1, hidden.shape[-1])
    idx = index.reshape(-1)
    track = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    logps, entropies = [], []
    for start in range(0, max(h.shape[0], 1), rows):
        args = (h[start:start + rows], weight, idx[start:start + rows], temperature)
        logp, entropy = checkpoint(_head_chunk, *args, use_reentrant=False) if track else _head_chunk(*args)
        logps.append(logp)
        entropies.append(entropy)
    logp = torch.cat(logps).reshape(index.shape)
    if not return_entropy:
        return logp
    return logp, torch.cat(entropies).reshape(index.shape)


# ---------------------------------------------------------------- packed layout


def check_offsets(offsets: Tensor, n: int, batch: int) -> Tensor:
    """``offsets`` as a CPU int64 tensor [B+1] with 0 = o_0 ≤ o_1 ≤ ... ≤ o_B = n and B = ``batch`` (the
    advantages' length), or a ValueError naming it."""
    o = torch.as_tensor(offsets).to("cpu", torch.int64)
    if o.dim() != 1 or o.numel() != batch + 1 or o[0] != 0 or o[-1] != n or (o[1:] < o[:-1]).any():
        raise ValueError(f"offsets must be [{batch}+1] (one per advantage) non-decreasing from 0 to the {n} packed "
                         f"rows, got {o.tolist()}")
    return o


def to_device(t: Tensor, device: torch.device) -> Tensor:
    """A small CPU tensor on ``device`` without waiting for the GPU's queue (pinned, non-blocking copy)."""
    if torch.device(device).type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def sequence_ids(offsets: Tensor) -> Tensor:
    """The sequence of each packed row [N] (CPU int64)."""
    return torch.repeat_interleave(torch.arange(offsets.numel() - 1), offsets[1:] - offsets[:-1])


def packed_positions(offsets: Tensor, width: Optional[int] = None) -> tuple[Tensor, int]:
    """(flat positions b·T + j of the packed rows in a [B, T] padded layout, T = ``width`` or the longest
    sequence); CPU."""
    width = width or max(int((offsets[1:] - offsets[:-1]).max()), 1)
    seq = sequence_ids(offsets)
    return seq * width + torch.arange(int(offsets[-1])) - offsets[:-1][seq], width


def pack(padded: Tensor, offsets: Tensor) -> Tensor:
    """The inverse of :func:`padded`: [S, L, ...] with sequence s's real entries at positions < its length →
    [N, ...], sequence after sequence (L may exceed the longest sequence)."""
    pos, _ = packed_positions(offsets, padded.shape[1])
    return padded.reshape(-1, *padded.shape[2:])[to_device(pos, padded.device)]


def padded(values: Tensor, offsets: Tensor, fill: float = 0.0) -> Tensor:
    """Packed values [N, ...] → [B, T, ...] (T the longest sequence), ``fill`` after each sequence's end;
    differentiable w.r.t. ``values``."""
    pos, width = packed_positions(offsets)
    out = values.new_full((width * (offsets.numel() - 1), *values.shape[1:]), fill)
    out = out.index_copy(0, to_device(pos, values.device), values)
    return out.reshape(offsets.numel() - 1, width, *values.shape[1:])


def token_rows(mask: Optional[Tensor], advantages: Tensor, cfg: dict, n: int,
               offsets: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor]:
    """Per-token (mask m, aggregation weight c_t, advantage) [n] fp32 of either layout, so that the loss is
    Σ_t c_t·L_t over flat rows. Padded: mask [B, T]. Packed: ``offsets`` (checked) and mask [n] or None."""
    dev = advantages.device
    if offsets is None:
        m = mask.to(dev, torch.float32)
        adv = advantages.float().repeat_interleave(m.shape[1])
        return m.reshape(-1), token_weights(m, cfg).reshape(-1), adv
    m = torch.ones(n, device=dev) if mask is None else mask.to(dev, torch.float32).reshape(-1)
    c = pack(token_weights(padded(m, offsets), cfg), offsets)
    return m, c, advantages.float()[to_device(sequence_ids(offsets), dev)]


# ---------------------------------------------------------------- GRPO loss


def resolve_cfg(cfg: dict) -> dict:
    """cfg with defaults filled in; unknown keys and bad values raise, naming the key."""
    unknown = set(cfg) - set(DEFAULTS)
    if unknown:
        raise TypeError(f"grpo_loss: unknown option(s) {sorted(unknown)} (known: {sorted(DEFAULTS)})")
    cfg = {**DEFAULTS, **cfg}
    if cfg["loss_type"] not in LOSS_TYPES:
        raise ValueError(f"grpo_loss: loss_type {cfg['loss_type']!r} is not one of {LOSS_TYPES}")
    if cfg["importance_sampling_level"] not in IS_LEVELS:
        raise ValueError(f"grpo_loss: importance_sampling_level {cfg['importance_sampling_level']!r} "
                         f"is not one of {IS_LEVELS}")
    if cfg["loss_type"] == "dr_grpo" and not cfg["max_completion_length"]:
        raise ValueError("grpo_loss: loss_type 'dr_grpo' needs max_completion_length")
    return cfg


def check_loss_shapes(logprobs: Tensor, mask: Tensor, advantages: Tensor, ref: Optional[Tensor],
                      old: Optional[Tensor]) -> None:
    """logprobs, mask, ref, old [B, T] and advantages [B], or a ValueError naming the argument."""
    if logprobs.dim() != 2:
        raise ValueError(f"grpo_loss: per-token log-probs must be [B, T], got {tuple(logprobs.shape)}")
    named = {"mask": mask, "ref_logprobs": ref, "old_logprobs": old}
    for name, t in named.items():
        if t is not None and t.shape != logprobs.shape:
            raise ValueError(f"grpo_loss: {name} has shape {tuple(t.shape)}, expected {tuple(logprobs.shape)}")
    if advantages.shape != logprobs.shape[:1]:
        raise ValueError(f"grpo_loss: advantages has shape {tuple(advantages.shape)}, "
                         f"expected ({logprobs.shape[0]},)")


def k3(logprobs: Tensor, ref_logprobs: Tensor, kl_clamp: Optional[float]) -> Tensor:
    """Per-token k3 KL estimate e^x - x - 1, x = ref - ℓ clamped to ±kl_clamp (no clamp when None)."""
    x = ref_logprobs - logprobs
    if kl_clamp is not None:
        x = x.clamp(-kl_clamp, kl_clamp)
    return torch.exp(x) - x - 1


def token_weights(mask: Tensor, cfg: dict) -> Tensor:
    """Aggregation weight c_t [B, T] of each token of a resolved cfg: loss = Σ_t c_t·L_t (module docstring;
    grpo's mean_i[Σ_t L·m / max(n_i, 1)] is Σ_t L·m / (B·max(n_i, 1))). The Triton loss kernel reads the same c_t."""
    B = mask.shape[0]
    loss_type = cfg["loss_type"]
    if loss_type == "grpo":
        return mask / (B * mask.sum(-1, keepdim=True).clamp(min=1))
    if loss_type == "bnpo":
        return mask / mask.sum().clamp(min=1)
    if loss_type == "dr_grpo":
        return mask / (B * cfg["max_completion_length"])
    return mask / (mask.sum().clamp(min=1) if cfg["num_items"] is None else cfg["num_items"])


def grpo_loss_from_logprobs(logprobs: Tensor, mask: Optional[Tensor], advantages: Tensor,
                            ref_logprobs: Optional[Tensor] = None, old_logprobs: Optional[Tensor] = None, *,
                            offsets: Optional[Tensor] = None, **cfg) -> tuple[Tensor, dict[str, Tensor]]:
    """GRPO loss and metrics on per-token log-probs ℓ [B, T], or packed [N] with ``offsets`` (module docstring has
    the maths, cfg keys and layouts).

    ``temperature`` is accepted and ignored here (it only matters where logits become log-probs).
    """
    if offsets is not None:
        offsets = check_offsets(offsets, logprobs.shape[0], advantages.shape[0])
        m = torch.ones_like(logprobs) if mask is None else mask.to(logprobs.dtype)
        pad = [None if t is None else padded(t.to(logprobs.dtype), offsets) for t in (ref_logprobs, old_logprobs)]
        return grpo_loss_from_logprobs(padded(logprobs, offsets), padded(m, offsets), advantages, *pad, **cfg)
    cfg = resolve_cfg(cfg)
    check_loss_shapes(logprobs, mask, advantages, ref_logprobs, old_logprobs)
    if cfg["beta"] != 0 and ref_logprobs is None:
        raise ValueError("grpo_loss: beta != 0 needs ref_logprobs")
    lp = logprobs
    m = mask.to(lp.dtype)
    adv = advantages.to(lp.dtype).unsqueeze(-1)
    old = lp.detach() if old_logprobs is None else old_logprobs.to(lp.dtype)
    log_w = lp - old
    if cfg["importance_sampling_level"] == "sequence":
        log_w = (log_w * m).sum(-1, keepdim=True) / m.sum(-1, keepdim=True).clamp(min=1)
    w = torch.exp(log_w)
    lo, hi = 1 - cfg["epsilon_low"], 1 + cfg["epsilon_high"]
    w1 = w if cfg["delta"] is None else w.clamp(max=cfg["delta"])
    per_token = -torch.minimum(w1 * adv, w.clamp(lo, hi) * adv).expand_as(lp)
    kl = None
    if ref_logprobs is not None:
        kl = k3(lp, ref_logprobs.to(lp.dtype), cfg["kl_clamp"])
        if cfg["beta"] != 0:
            per_token = per_token + cfg["beta"] * kl
    loss = (per_token * token_weights(m, cfg)).sum()
    return loss, _metrics(w.detach(), adv, m, lo, hi, kl)


def _metrics(w: Tensor, adv: Tensor, m: Tensor, lo: float, hi: float, kl: Optional[Tensor]) -> dict[str, Tensor]:
    count = m.sum().clamp(min=1)

    def mean(x: Tensor) -> Tensor:
        return (x.to(m.dtype).expand_as(m) * m).sum() / count

    low, high = (w < lo) & (adv < 0), (w > hi) & (adv > 0)
    out = {"ratio": mean(w), "clip_low": mean(low), "clip_high": mean(high), "clip_region": mean(low | high)}
    if kl is not None:
        out["kl"] = mean(kl.detach())
    return out


def grpo_loss(logits: Tensor, index: Tensor, mask: Tensor, advantages: Tensor,
              ref_logprobs: Optional[Tensor] = None, old_logprobs: Optional[Tensor] = None,
              **cfg) -> tuple[Tensor, dict[str, Tensor]]:
    """GRPO loss on logits [B, T, V] (tempered by cfg ``temperature``): (loss, metrics); see module docstring."""
    logp = selective_log_softmax(logits, index, cfg.get("temperature", DEFAULTS["temperature"]))
    return grpo_loss_from_logprobs(logp, mask, advantages, ref_logprobs, old_logprobs, **cfg)


def linear_grpo_loss(hidden: Tensor, weight: Tensor, index: Tensor, mask: Optional[Tensor], advantages: Tensor,
                     ref_logprobs: Optional[Tensor] = None, old_logprobs: Optional[Tensor] = None, *,
                     offsets: Optional[Tensor] = None, **cfg) -> tuple[Tensor, dict[str, Tensor]]:
    """GRPO loss on hidden [B, T, H] (or packed [N, H] with ``offsets``) through the LM head weight [V, H],
    chunked (see ``linear_logprobs``)."""
    logp = linear_logprobs(hidden, weight, index, cfg.get("temperature", DEFAULTS["temperature"]))
    return grpo_loss_from_logprobs(logp, mask, advantages, ref_logprobs, old_logprobs, offsets=offsets, **cfg)


# ---------------------------------------------------------------- patchify (Qwen2.5-VL pixel_values)

PATCHIFY_DTYPES = (torch.float32, torch.bfloat16)


def check_patchify(frames: Tensor, perm: Optional[Tensor], dtype: torch.dtype) -> None:
    """ValueError naming the argument unless frames is uint8 [T ≥ 1, H, W, 3] with H, W positive multiples of 28,
    perm None or an integer [T] tensor on the frames' device (a permutation of 0..T-1: checked on the CPU only, a
    GPU check would sync) and dtype one of PATCHIFY_DTYPES."""
    factor = PATCH_SIZE * MERGE_SIZE
    if frames.dtype != torch.uint8 or frames.dim() != 4 or frames.shape[-1] != 3 or frames.shape[0] == 0:
        raise ValueError(f"patchify: frames must be uint8 [T, H, W, 3], got {frames.dtype} {tuple(frames.shape)}")
    if frames.shape[1] == 0 or frames.shape[2] == 0 or frames.shape[1] % factor or frames.shape[2] % factor:
        raise ValueError(f"patchify: H and W must be positive multiples of {factor}, got {tuple(frames.shape)}")
    if dtype not in PATCHIFY_DTYPES:
        raise ValueError(f"patchify: dtype must be one of {PATCHIFY_DTYPES}, got {dtype}")
    if perm is None:
        return
    t = frames.shape[0]
    if perm.shape != (t,) or perm.dtype.is_floating_point or perm.device != frames.device:
        raise ValueError(f"patchify: perm must be an integer [{t}] tensor on {frames.device}, got {perm.dtype} "
                         f"{tuple(perm.shape)} on {perm.device}")
    if perm.device.type == "cpu" and not torch.equal(perm.sort().values, torch.arange(t, dtype=perm.dtype)):
        raise ValueError(f"patchify: perm is not a permutation of 0..{t - 1}: {perm.tolist()}")


def patchify_frames(frames: Tensor, perm: Optional[Tensor] = None, dtype: torch.dtype = torch.float32) -> Tensor:
    """uint8 frames [T, H, W, 3] → Qwen2.5-VL ``pixel_values`` [gt·gh·gw, 1176] in ``dtype``.

    Exactly ``vr1fast.data.processor.video_to_patches(frames[perm])`` (the Qwen2-VL processor: x/255, CLIP mean/std
    in fp32, 2×14×14 patches in 2×2 merge order; docs in that module), cast to ``dtype`` (round to nearest). Odd T:
    the last frame (of the permuted order) is repeated, as the HF processor pads, so gt = ⌈T/2⌉, gh = H/14,
    gw = W/14. perm: int [T] or None (identity); frame i of the output video is frames[perm[i]]."""
    check_patchify(frames, perm, dtype)
    t, h, w, c = frames.shape
    source = torch.arange(t, device=frames.device) if perm is None else perm.long()
    gt = -(-t // TEMPORAL_PATCH_SIZE)
    source = source[torch.arange(gt * TEMPORAL_PATCH_SIZE, device=frames.device).clamp(max=t - 1)]
    bh, bw = h // (PATCH_SIZE * MERGE_SIZE), w // (PATCH_SIZE * MERGE_SIZE)
    x = frames[source].reshape(gt, TEMPORAL_PATCH_SIZE, bh, MERGE_SIZE, PATCH_SIZE, bw, MERGE_SIZE, PATCH_SIZE, c)
    x = x.permute(0, 2, 5, 3, 6, 8, 1, 4, 7).reshape(-1, c, PATCH_DIM // c).to(torch.float32)
    mean = torch.tensor(CLIP_MEAN, dtype=torch.float32, device=x.device).view(1, c, 1)
    std = torch.tensor(CLIP_STD, dtype=torch.float32, device=x.device).view(1, c, 1)
    return x.div_(255.0).sub_(mean).div_(std).reshape(-1, PATCH_DIM).to(dtype)
