"""Triton selective_log_softmax (interpreter) against the float64 reference, and its sm_90 AOT compile."""
import pytest
import torch
import triton

from vr1fast import kernels
from vr1fast.kernels import logprob
from vr1fast.kernels import reference as ref
from vr1fast.kernels._triton import aot_check

BF16_RTOL = 2.0 ** -7  # the interpreter truncates fp32 → bf16: < 1 bf16 ulp ≤ 2^-7 relative


def make(seed, shape, dtype, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(*shape, generator=g) * scale).to(dtype)
    index = torch.randint(0, shape[-1], shape[:-1], generator=g)
    return g, logits, index


def run_poisoned(launch):
    for name in ("logp", "lse", "entropy"):
        launch.args[name].fill_(float("nan"))
    launch()
    return launch.args


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape,temperature", [((3, 7, 1000), 1.0), ((2, 5, 3001), 0.7), ((13, 37), 1.3)])
def test_forward_matches_float64(shape, temperature, dtype):
    _, logits, index = make(0, shape, dtype)
    a = run_poisoned(logprob.forward_launch(logits, index, temperature, True))
    want_lp, want_h = ref.selective_log_softmax(logits.double(), index, temperature, return_entropy=True)
    torch_lp, torch_h = ref.selective_log_softmax(logits.float(), index, temperature, return_entropy=True)
    lp, h = a["logp"].reshape(index.shape), a["entropy"].reshape(index.shape)
    for got, want, torch_got in ((lp, want_lp, torch_lp), (h, want_h, torch_h)):
        err = (got.double() - want).abs().max().item()
        assert err <= 2 * (torch_got.double() - want).abs().max().item() + 2e-6
    assert torch.isfinite(lp).all() and (lp <= 0).all()
    lse = torch.logsumexp(logits.double() / temperature, -1)
    torch.testing.assert_close(a["lse"].reshape(index.shape).double(), lse, rtol=0, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("offset", [-1e4, 1e4, "spike"])
def test_extreme_logits(offset, dtype):
    _, logits, index = make(1, (4, 6, 777), torch.float32, scale=1.0)
    if offset == "spike":  # one token far above the rest: its logp ≈ 0, the others ≈ -160
        logits = logits - 80.0
        logits[..., 5] = 80.0
        index[:, ::2] = 5
    else:
        logits = logits + offset
    logits = logits.to(dtype)
    lp = logprob.selective_log_softmax(logits, index)
    want = ref.selective_log_softmax(logits.double(), index)
    assert torch.isfinite(lp).all() and (lp <= 0).all()
    # At |z| ~ 1e4 an fp32 ulp is ~1e-3: the bar is twice the error of fp32 torch on the same logits.
    torch_err = (ref.selective_log_softmax(logits.float(), index).double() - want).abs().max().item()
    assert (lp.double() - want).abs().max().item() <= 2 * torch_err + 2e-6


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("entropy", [False, True])
def test_backward_matches_float64(entropy, dtype):
    # A [B, T+1, V] buffer read through the [:, :-1] slice, as logits of completion positions are.
    g, full, index = make(2, (3, 6, 517), dtype)
    index = index[:, :-1]
    x = full.clone().requires_grad_()
    out = logprob.selective_log_softmax(x[:, :-1], index, 0.8, return_entropy=entropy)
    xd = full.double().requires_grad_()
    want = ref.selective_log_softmax(xd[:, :-1], index, 0.8, return_entropy=entropy)
    outs, wants = (out, want) if entropy else ((out,), (want,))
    ups = [torch.randn(index.shape, generator=g, dtype=torch.float64) for _ in outs]
    ups[0][1, 2] = 0.0  # a row with zero upstream gradient is written as zeros without reading it
    sum(u.float() * o for u, o in zip(ups, outs)).sum().backward()
    sum(u * w for u, w in zip(ups, wants)).sum().backward()
    rtol, atol = (BF16_RTOL, 1e-6) if dtype == torch.bfloat16 else (1e-5, 1e-6)
    torch.testing.assert_close(x.grad.double(), xd.grad, rtol=rtol, atol=atol)
    assert x.grad[:, -1].abs().max().item() == 0.0
    if not entropy:
        assert x.grad[1, 2].abs().max().item() == 0.0


def test_backward_launch_writes_every_element():
    _, logits, index = make(3, (2, 5, 300), torch.float32)
    fwd = run_poisoned(logprob.forward_launch(logits, index, 1.0, False))
    g = torch.randn(10, dtype=torch.float32)
    g[3] = 0.0
    dlogits = torch.full_like(logits, float("nan"))
    logprob.backward_launch(dlogits, logits, index, fwd["lse"], g, 1.0)()
    p = torch.softmax(logits.double(), -1).reshape(10, 300)
    want = g.double()[:, None] * (torch.nn.functional.one_hot(index.reshape(-1), 300) - p)
    torch.testing.assert_close(dlogits.reshape(10, 300).double(), want, rtol=1e-5, atol=1e-7)


def test_no_grad_path():
    _, logits, index = make(4, (2, 3, 50), torch.float32)
    x = logits.requires_grad_()
    with torch.no_grad():
        lp = logprob.selective_log_softmax(x, index)
    assert lp.grad_fn is None and lp.dtype == torch.float32
    assert logprob.selective_log_softmax(logits.detach(), index).grad_fn is None


def test_long_sequence_one_dimensional_grid():
    # 70,000 rows of one sequence: Liger's (B, L) grid would put 70,000 programs on CUDA's y axis (max 65,535).
    _, logits, index = make(5, (1, 70_000, 8), torch.float32)
    launch = logprob.forward_launch(logits, index, 1.0, False)
    assert len(launch.grid) == 1 and launch.grid[0] == triton.cdiv(70_000, launch.constexprs["BLOCK_N"])
    a = run_poisoned(launch)
    want = ref.selective_log_softmax(logits.double(), index).reshape(-1)
    torch.testing.assert_close(a["logp"].double(), want, rtol=0, atol=2e-6)


def test_dispatch_forced_triton(monkeypatch):
    _, logits, index = make(6, (2, 3, 40), torch.float32)
    monkeypatch.setenv("VR1FAST_IMPL", "triton")
    assert kernels.implementation("selective_log_softmax") is logprob.selective_log_softmax
    lp, h = kernels.selective_log_softmax(logits, index, 0.9, return_entropy=True)
    want_lp, want_h = ref.selective_log_softmax(logits.double(), index, 0.9, return_entropy=True)
    torch.testing.assert_close(lp.double(), want_lp, rtol=0, atol=1e-5)
    torch.testing.assert_close(h.double(), want_h, rtol=0, atol=1e-5)


def test_bad_index_shape():
    _, logits, index = make(7, (2, 3, 40), torch.float32)
    with pytest.raises(ValueError, match="index shape"):
        logprob.selective_log_softmax(logits, index[:, :2])


def test_aot_compile_sm90():
    results = aot_check("vr1fast.kernels.logprob")
    assert len(results) == len(logprob.aot_variants())
    for r in results:
        assert r["cubin"] > 0 and r["shared"] <= 227 * 1024, r
