"""LM head fused with log-softmax-gather: per-token log-probs (and entropy) without ever holding N×V logits.

Maths (one token: hidden x [H], head W [V, H], target y, temperature T; z = W x, s = z / T, p = softmax(s)):
    logp    = s_y − lse(s)                 entropy = lse(s) − E_p[s]
    ∂logp/∂z_v    = (1[v=y] − p_v) / T     ∂entropy/∂z_v = −p_v (s_v − E_p[s]) / T
    dz = (g_ℓ·(1[v=y] − p) − g_H·p·(s − E_p[s])) / T,   dX = dz W,   dW = dzᵀ X
Matches ``reference.linear_logprobs`` (the float64 reference of the tests) with fp32 math and fp32 outputs.

Shapes and dtypes: hidden [..., H], weight [V, H] (both fp32, bf16 or fp16, same dtype), index [...] int in [0, V)
→ log-probs [...] fp32 (and entropy [...] fp32). Gradients flow to hidden and weight; a frozen weight
(``requires_grad=False``, e.g. LoRA) skips the dW GEMM. bf16/fp16 GEMMs accumulate in fp32 and the logits are never
rounded; fp32 inputs use 3xTF32 dots (≈fp32 accuracy on tensor cores; the model's head itself runs bf16).

Design (chosen over the alternatives in docs/kernels.md §7.2; no GPU was available while writing it, so the
choices rest on FLOP/byte counts and on the sm_90 compiler's output — registers, spills, shared memory, pipelined
loads — checked by the AOT test; the tile shape is autotuned on the GPU and benchmarks/ measures the rest):
* Forward: one Triton kernel over (token block × vocab split of SPLIT_V columns). Each program runs the bf16 tile
  GEMM z = X Wᵀ for its vocab tiles (fp32 accumulator) and keeps online per-row statistics (max m, Σe^{s−m},
  Σe^{s−m}·s, target logit); a few O(N·V/SPLIT_V) torch ops merge the splits into lse, logp and entropy.
  Splitting the vocab (verl's layout) rather than one program per token block looping over all of V gives 149
  programs per token block at Qwen's V=152064, so even N=2k fills an H100's 132 SMs; the partials are 12 bytes
  per (row, split) (~29 MB at N=16k). The grid is 1-D in grouped order (``_grouped``), so the token count has no
  65,535-block limit (Liger #1294) and the resident programs share hidden and weight blocks in L2. logp ≤ 0
  exactly: the target logit comes from the same fp32 tile as the maxima, and lse = m + log Σ ≥ m.
* Backward: recompute (8NHV in all), split over vocab chunks: a Triton kernel writes dz for one chunk [N, C] into
  a bounded buffer (input dtype, at most 1/DZ_FRACTION of the weight's bytes), then cuBLAS does dX += dz W_c
  (accumulated in fp32 across chunks) and dW_c = dzᵀ X (complete, written once). Two thirds of the backward FLOPs
  thus run at cuBLAS speed; a fully fused Triton backward would need N×H accumulators per program or atomics over
  V/BLOCK_N partial sums per dX element (CCE's way; cheap only with its approximate gradient filtering). The
  bound keeps the head's peak near 1.2× (inputs + dW) at Qwen's 8k-token shape; each chunk costs one fp32
  read-modify-write of dX (a few % of the chunk's time at ~10k columns), so chunks should not get much narrower.
* The GRPO loss is not fused: given per-token log-probs it is O(N) elementwise work, so ``linear_grpo_loss`` is
  ``reference.grpo_loss_from_logprobs`` on this module's log-probs and autograd feeds dLoss/dlogp back here.
  One loss implementation serves the reference, the logits-level kernel and this one.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from vr1fast.kernels import _gemm
from vr1fast.kernels._triton import INTERPRET, Launch, autocast_inputs, check_head, dot_operand
from vr1fast.kernels.reference import grpo_loss_from_logprobs, resolve_cfg

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
GROUP_M = 8  # token blocks per L2 group (see _grouped)
DZ_FRACTION = 6  # the backward's dz chunk buffer holds at most 1/DZ_FRACTION of the weight's bytes
# GPU tiles (H100, wgmma-sized), autotuned once per H and dtype; fp32 inputs get their own tile (4-byte operands:
# fewer stages fit the 227 KB of shared memory). The interpreter runs one small tile so the CPU tests stay fast.
# The forward's 128×256 tile spilled 117 registers at sm_90 (docs/kernel-audit.md F5), so the forward keeps
# 128×128 and needs no tuning; the backward's choice is cached on disk (``cache_results``), so only a machine's
# first run times the two tiles, not step 1 of every run on every rank (docs/kernel-audit.md F10).
TILES_16BIT = [
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64}, num_warps=8, num_stages=4),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 64}, num_warps=8, num_stages=3),
]
FWD_TILES_16BIT = TILES_16BIT[:1]
TILES_FP32 = [triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 32}, num_warps=8, num_stages=3)]
INTERPRET_CONFIGS = [triton.Config({"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 32})]
CONFIGS = INTERPRET_CONFIGS if INTERPRET else TILES_16BIT + TILES_FP32
FWD_CONFIGS = INTERPRET_CONFIGS if INTERPRET else FWD_TILES_16BIT + TILES_FP32


def tiles(kernel: str, dtype: torch.dtype) -> list:
    """The GPU tile configs the autotuner may pick for ``kernel`` ("fwd" or "dlogits") at input ``dtype``."""
    if dtype == torch.float32:
        return TILES_FP32
    return FWD_TILES_16BIT if kernel == "fwd" else TILES_16BIT


def _prune(kernel: str):
    def prune(configs: list, named_args: dict, **kwargs) -> list:
        keep = tiles(kernel, named_args["x_ptr"].dtype)
        return [c for c in configs if any(c is k for k in keep)] or configs
    return {"early_config_prune": prune}


# Vocab columns per forward program: a multiple of every BLOCK_N above (4 tiles of the widest).
SPLIT_V = 4 * max(c.kwargs["BLOCK_N"] for c in CONFIGS)


@triton.jit
def _logits_tile(x_ptr, w_ptr, rows, cols, N, V, H, stride_x, stride_w,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 UPCAST: tl.constexpr, F32: tl.constexpr):
    """fp32 tile z[rows, cols] = X[rows, :] · W[cols, :]ᵀ; rows ≥ N and cols ≥ V repeat the last row / column.

    The caller masks those; clamping instead of masking the loads leaves only the K mask (no register spills).
    """
    ks = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + tl.minimum(rows, N - 1)[:, None].to(tl.int64) * stride_x + ks[None, :]
    w_ptrs = w_ptr + tl.minimum(cols, V - 1)[None, :].to(tl.int64) * stride_w + ks[:, None]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K):
        x = tl.load(x_ptrs, mask=k0 + ks[None, :] < H, other=0.0)
        w = tl.load(w_ptrs, mask=k0 + ks[:, None] < H, other=0.0)
        x = dot_operand(x, UPCAST)  # fp32 under the interpreter (bf16 bit patterns otherwise); 16-bit on a GPU
        w = dot_operand(w, UPCAST)
        if F32:
            acc = tl.dot(x, w, acc, input_precision="tf32x3")
        else:
            acc = tl.dot(x, w, acc)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    return acc


@triton.jit
def _grouped(num_m, num_n, GROUP_M: tl.constexpr):
    """(token block, vocab block) of this program on a 1-D grid, token blocks in groups of GROUP_M sharing each vocab
    block: the ~132 programs resident at once then touch GROUP_M hidden blocks and a few weight blocks, which stay
    in L2 (token-block-major order would stream all of X from HBM once per vocab tile)."""
    pid = tl.program_id(0)
    group = pid // (GROUP_M * num_n)
    first_m = group * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    return first_m + pid % size_m, (pid % (GROUP_M * num_n)) // size_m


@triton.autotune(configs=FWD_CONFIGS, key=["H"], prune_configs_by=_prune("fwd"), cache_results=True)
@triton.jit
def _fwd_kernel(x_ptr, w_ptr, idx_ptr, pmax_ptr, psum_ptr, pdot_ptr, tgt_ptr,
                N, V, H, stride_x, stride_w, num_splits, split_v, inv_t,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                UPCAST: tl.constexpr, F32: tl.constexpr, GROUP_M: tl.constexpr, ENTROPY: tl.constexpr):
    """One (token block, vocab split): max, Σe^{s−m} (and Σe^{s−m}·s when ENTROPY) → partials [N, num_splits];
    s_y → tgt."""
    pid_m, split = _grouped(tl.cdiv(N, BLOCK_M), num_splits, GROUP_M)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < N
    y = tl.load(idx_ptr + rows, mask=row_ok, other=-1)
    m = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    sum_e = tl.zeros((BLOCK_M,), tl.float32)
    sum_es = tl.zeros((BLOCK_M,), tl.float32)
    s_y = tl.zeros((BLOCK_M,), tl.float32)
    v_lo = split * split_v
    v_hi = tl.minimum(v_lo + split_v, V)
    for v0 in range(v_lo, v_hi, BLOCK_N):
        cols = v0 + tl.arange(0, BLOCK_N)
        s = _logits_tile(x_ptr, w_ptr, rows, cols, N, V, H, stride_x, stride_w,
                         BLOCK_M, BLOCK_N, BLOCK_K, UPCAST, F32) * inv_t
        valid = cols[None, :] < V
        s = tl.where(valid, s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        e = tl.exp(s - m_new[:, None])
        alpha = tl.exp(m - m_new)
        sum_e = sum_e * alpha + tl.sum(e, axis=1)
        if ENTROPY:
            sum_es = sum_es * alpha + tl.sum(e * tl.where(valid, s, 0.0), axis=1)  # e = 0 where invalid
        m = m_new
        s_y += tl.sum(tl.where(cols[None, :] == y[:, None], s, 0.0), axis=1)
    out = rows.to(tl.int64) * num_splits + split
    tl.store(pmax_ptr + out, m, mask=row_ok)
    tl.store(psum_ptr + out, sum_e, mask=row_ok)
    if ENTROPY:
        tl.store(pdot_ptr + out, sum_es, mask=row_ok)
    tl.store(tgt_ptr + rows, s_y, mask=row_ok & (y >= v_lo) & (y < v_hi))


@triton.autotune(configs=CONFIGS, key=["H"], prune_configs_by=_prune("dlogits"), cache_results=True)
@triton.jit
def _dlogits_kernel(x_ptr, w_ptr, idx_ptr, lse_ptr, es_ptr, glogp_ptr, gent_ptr, dz_ptr,
                    N, V, H, stride_x, stride_w, stride_dz, v_lo, v_len, inv_t,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                    UPCAST: tl.constexpr, F32: tl.constexpr, GROUP_M: tl.constexpr, ENTROPY: tl.constexpr):
    """dz[:, c] for vocab columns v_lo + c, c < v_len: recompute s, p = e^{s−lse}, apply the module's dz formula
    (the entropy term only when ENTROPY)."""
    pid_m, pid_n = _grouped(tl.cdiv(N, BLOCK_M), tl.cdiv(v_len, BLOCK_N), GROUP_M)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    c = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    s = _logits_tile(x_ptr, w_ptr, rows, v_lo + c, N, V, H, stride_x, stride_w,
                     BLOCK_M, BLOCK_N, BLOCK_K, UPCAST, F32) * inv_t
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
    g = tl.load(glogp_ptr + rows, mask=row_ok, other=0.0)
    y = tl.load(idx_ptr + rows, mask=row_ok, other=-1)
    p = tl.exp(s - lse[:, None])
    dz = tl.where((v_lo + c)[None, :] == y[:, None], g[:, None], 0.0) - g[:, None] * p
    if ENTROPY:
        es = tl.load(es_ptr + rows, mask=row_ok, other=0.0)
        g_h = tl.load(gent_ptr + rows, mask=row_ok, other=0.0)
        dz -= g_h[:, None] * p * (s - es[:, None])
    dz_ptrs = dz_ptr + rows[:, None].to(tl.int64) * stride_dz + c[None, :]
    tl.store(dz_ptrs, dz * inv_t, mask=row_ok[:, None] & (c[None, :] < v_len))


def _constexprs(dtype: torch.dtype, entropy: bool, interpret: bool = INTERPRET) -> dict:
    """The launch's compile-time flags besides the tile sizes (which the autotuner picks)."""
    return dict(UPCAST=interpret and dtype != torch.float32, F32=dtype == torch.float32, GROUP_M=GROUP_M,
                ENTROPY=entropy)


def _fwd_args(x: Tensor, w: Tensor, idx: Tensor, partials: tuple[Tensor, Tensor, Tensor], s_y: Tensor,
              temperature: float) -> dict:
    pmax, psum, pdot = partials
    return dict(x_ptr=x, w_ptr=w, idx_ptr=idx, pmax_ptr=pmax, psum_ptr=psum, pdot_ptr=pdot, tgt_ptr=s_y,
                N=x.shape[0], V=w.shape[0], H=x.shape[1], stride_x=x.stride(0), stride_w=w.stride(0),
                num_splits=pmax.shape[1], split_v=SPLIT_V, inv_t=1.0 / temperature)


def _dlogits_args(x: Tensor, w: Tensor, idx: Tensor, stats: tuple[Tensor, Tensor], grads: tuple[Tensor, Tensor],
                  dz: Tensor, v_lo: int, temperature: float) -> dict:
    (lse, mean_s), (g_logp, g_ent) = stats, grads
    mean_s, g_ent = (lse if t is None else t for t in (mean_s, g_ent))  # unread without ENTROPY
    return dict(x_ptr=x, w_ptr=w, idx_ptr=idx, lse_ptr=lse, es_ptr=mean_s, glogp_ptr=g_logp, gent_ptr=g_ent,
                dz_ptr=dz, N=x.shape[0], V=w.shape[0], H=x.shape[1], stride_x=x.stride(0), stride_w=w.stride(0),
                stride_dz=dz.stride(0), v_lo=v_lo, v_len=dz.shape[1], inv_t=1.0 / temperature)


def aot_variants(n: int = 8192, h: int = 3584, v: int = 152064) -> list[Launch]:
    """Every (kernel, tile config, dtype, constexpr) combination the launchers can run on a GPU, as :class:`Launch`
    records for an AOT compile. The arguments are meta tensors of the given head shape (default Qwen2.5-7B's) and
    the ints the launchers would pass for it, so a compile can specialise alignment as the JIT would."""
    out = []
    for dtype in DTYPES:
        meta = dict(device="meta")
        x, w = torch.empty(n, h, dtype=dtype, **meta), torch.empty(v, h, dtype=dtype, **meta)
        idx, rows = torch.empty(n, dtype=torch.int64, **meta), torch.empty(n, **meta)
        fwd = _fwd_args(x, w, idx, [torch.empty(n, triton.cdiv(v, SPLIT_V), **meta)] * 3, rows, 1.0)
        dz_dtype = torch.float32 if dtype == torch.float16 else dtype
        dz = torch.empty(n, _vocab_chunk(n, v, h, None), dtype=dz_dtype, **meta)
        bwd = _dlogits_args(x, w, idx, (rows, rows), (rows, rows), dz, 0, 1.0)
        for name, kernel, args in (("fwd", _fwd_kernel, fwd), ("dlogits", _dlogits_kernel, bwd)):
            for cfg, entropy in ((c, e) for c in tiles(name, dtype) for e in (False, True)):
                flags = dict(cfg.kwargs, **_constexprs(dtype, entropy, interpret=False))
                out.append(Launch(kernel.fn, (1, 1), args, flags, num_warps=cfg.num_warps,
                                  num_stages=cfg.num_stages))
    return out


def _forward(x: Tensor, w: Tensor, idx: Tensor, temperature: float,
             entropy: bool) -> tuple[Tensor, Optional[Tensor], Tensor, Optional[Tensor]]:
    """x [N, H], w [V, H], idx [N] → (logp, entropy, lse, E_p[s]), each fp32 [N]; entropy and E_p[s] None unless
    ``entropy`` (the kernel then skips their statistic)."""
    n = x.shape[0]
    if n == 0:
        empty = torch.zeros(0, device=x.device)
        return empty, (empty if entropy else None), empty, (empty if entropy else None)
    num_splits = triton.cdiv(w.shape[0], SPLIT_V)
    partials = tuple(torch.empty(n, num_splits, device=x.device, dtype=torch.float32) for _ in range(3))
    s_y = torch.full((n,), float("nan"), device=x.device, dtype=torch.float32)

    def grid(meta):
        return (triton.cdiv(n, meta["BLOCK_M"]) * num_splits,)

    _fwd_kernel[grid](**_fwd_args(x, w, idx, partials, s_y, temperature), **_constexprs(x.dtype, entropy))
    pmax, psum, pdot = partials
    m = pmax.max(dim=1).values
    scale = torch.exp(pmax - m[:, None])
    sum_e = (psum * scale).sum(dim=1)
    lse = m + torch.log(sum_e)
    if not entropy:
        return s_y - lse, None, lse, None
    mean_s = (pdot * scale).sum(dim=1) / sum_e
    return s_y - lse, lse - mean_s, lse, mean_s


def _vocab_chunk(n: int, v: int, h: int, vocab_chunk: Optional[int]) -> int:
    """dz columns per backward chunk: N·C ≤ V·H / DZ_FRACTION, a multiple of SPLIT_V, never more than V."""
    if vocab_chunk is not None:
        return max(1, min(vocab_chunk, v))
    cols = v * h // DZ_FRACTION // max(1, n)
    return min(v, max(SPLIT_V, cols // SPLIT_V * SPLIT_V))


def _backward(x: Tensor, w: Tensor, idx: Tensor, lse: Tensor, mean_s: Tensor, g_logp: Tensor,
              g_ent: Optional[Tensor], temperature: float, need_dx: bool, need_dw: bool,
              vocab_chunk: Optional[int]) -> tuple[Optional[Tensor], Optional[Tensor]]:
    """dX [N, H] (x's dtype) and dW [V, H] (w's dtype) by vocab chunks; None where not needed.

    Each chunk's dz is a dense [N, v_len] view of one flat buffer (never a column slice of a wider one: a BLAS
    may read the gap, and the last chunk is narrower). dX is accumulated across chunks in fp32 by the GEMM itself
    (``_gemm.addmm_``), not rounded to the input dtype per chunk. fp16 inputs keep dz in fp32 (g·p of the
    non-target columns, ~1e-10, underflows fp16) and run the two GEMMs on fp32 operands (dz and the chunk's W
    rows in fp32: about twice the DZ_FRACTION bound)."""
    (n, h), v = x.shape, w.shape[0]
    if n == 0:
        return (torch.zeros_like(x) if need_dx else None), (torch.zeros_like(w) if need_dw else None)
    chunk = _vocab_chunk(n, v, h, vocab_chunk)
    dz_dtype = torch.float32 if x.dtype == torch.float16 else x.dtype
    xg = x.float() if dz_dtype != x.dtype else x
    dz_flat = torch.empty(n * chunk, device=x.device, dtype=dz_dtype)
    dx = torch.zeros(n, h, device=x.device, dtype=torch.float32) if need_dx else None
    dw = torch.empty_like(w) if need_dw else None
    for v_lo in range(0, v, chunk):
        v_len = min(chunk, v - v_lo)
        dz = dz_flat[:n * v_len].view(n, v_len)
        w_c = w[v_lo:v_lo + v_len].to(dz_dtype)

        def grid(meta):
            return (triton.cdiv(n, meta["BLOCK_M"]) * triton.cdiv(v_len, meta["BLOCK_N"]),)

        _dlogits_kernel[grid](**_dlogits_args(x, w, idx, (lse, mean_s), (g_logp, g_ent), dz, v_lo, temperature),
                              **_constexprs(x.dtype, entropy=g_ent is not None))
        if need_dx:
            _gemm.addmm_(dx, dz, w_c)
        if need_dw:
            if dz_dtype != x.dtype:
                dw[v_lo:v_lo + v_len] = torch.mm(dz.t(), xg)
            else:
                torch.mm(dz.t(), x, out=dw[v_lo:v_lo + v_len])  # a contiguous row block: no temporary
    del dz_flat, dz
    return (dx.to(x.dtype) if need_dx else None), dw


class LinearLogprob(torch.autograd.Function):
    """(x [N, H], w [V, H], idx [N], T, vocab_chunk, entropy) → (logp [N], entropy [N] or [0]) fp32; grads for x
    and w. Without ``entropy`` the second output is an empty non-differentiable tensor and no entropy statistic
    is computed in the forward or applied in the backward."""

    @staticmethod
    def forward(ctx, x: Tensor, w: Tensor, idx: Tensor, temperature: float, vocab_chunk: Optional[int],
                entropy: bool):
        logp, ent, lse, mean_s = _forward(x, w, idx, temperature, entropy)
        ctx.save_for_backward(x, w, idx, lse, mean_s)
        ctx.temperature, ctx.vocab_chunk = temperature, vocab_chunk
        ctx.set_materialize_grads(False)
        if ent is None:
            ent = logp.new_empty(0)
            ctx.mark_non_differentiable(ent)
        return logp, ent

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_logp: Optional[Tensor], g_ent: Optional[Tensor]):
        x, w, idx, lse, mean_s = ctx.saved_tensors
        g_logp = torch.zeros_like(lse) if g_logp is None else g_logp.float().contiguous()
        g_ent = None if g_ent is None or mean_s is None else g_ent.float().contiguous()
        dx, dw = _backward(x, w, idx, lse, mean_s, g_logp, g_ent, ctx.temperature, ctx.needs_input_grad[0],
                           ctx.needs_input_grad[1], ctx.vocab_chunk)
        return dx, dw, None, None, None, None


def linear_logprobs(hidden: Tensor, weight: Tensor, index: Tensor, temperature: float = 1.0,
                    return_entropy: bool = False, *, vocab_chunk: Optional[int] = None):
    """Log-probs (and entropy) of ``index`` under softmax(hidden @ weight.T / T) without N×V logits.

    hidden [..., H], weight [V, H], index [...] → fp32 log-probs [...] (and entropy [...]); differentiable w.r.t.
    hidden and weight. ``vocab_chunk`` overrides the backward's dz chunk width (default: see DZ_FRACTION). Under
    autocast the inputs are cast to its dtype first (``_triton.autocast_inputs``).
    """
    hidden, weight = autocast_inputs(hidden, weight)
    check_head(hidden, weight, index, temperature, DTYPES)
    x = hidden.reshape(-1, hidden.shape[-1])
    x = x if x.stride(-1) == 1 else x.contiguous()
    w = weight if weight.stride(-1) == 1 else weight.contiguous()
    logp, entropy = LinearLogprob.apply(x, w, index.reshape(-1).long(), float(temperature), vocab_chunk,
                                        return_entropy)
    if not return_entropy:
        return logp.reshape(index.shape)
    return logp.reshape(index.shape), entropy.reshape(index.shape)


def linear_grpo_loss(hidden: Tensor, weight: Tensor, index: Tensor, mask: Optional[Tensor], advantages: Tensor,
                     ref_logprobs: Optional[Tensor] = None, old_logprobs: Optional[Tensor] = None, *,
                     offsets: Optional[Tensor] = None, **cfg) -> tuple[Tensor, dict[str, Tensor]]:
    """GRPO loss on hidden [B, T, H] (or packed [N, H] with ``offsets``) through the head weight [V, H]:
    ``reference.grpo_loss_from_logprobs`` (maths, cfg keys, metrics) on this module's fused log-probs; gradients
    reach hidden and weight through them."""
    temperature = resolve_cfg(cfg)["temperature"]  # also rejects a bad cfg before the head runs
    logp = linear_logprobs(hidden, weight, index, temperature)
    return grpo_loss_from_logprobs(logp, mask, advantages, ref_logprobs, old_logprobs, offsets=offsets, **cfg)
