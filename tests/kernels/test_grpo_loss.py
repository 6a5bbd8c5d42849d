"""Triton grpo_loss (interpreter) against the float64 reference for every option, and its sm_90 AOT compile."""
import itertools
import zlib

import pytest
import torch
import triton

from vr1fast import kernels
from vr1fast.kernels import grpo
from vr1fast.kernels import reference as ref
from vr1fast.kernels._triton import aot_check

BF16_RTOL = 2.0 ** -7  # the interpreter truncates fp32 → bf16: < 1 bf16 ulp ≤ 2^-7 relative


def case(seed, B=3, T=5, V=301, dtype=torch.float32, with_ref=True, with_old=False, ref_shift=0.5):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(B, T, V, generator=g) * 2.5).to(dtype)
    index = torch.randint(0, V, (B, T), generator=g)
    mask = (torch.rand(B, T, generator=g) > 0.25).long()
    mask[0] = 0  # an all-masked row
    mask[-1, :2] = 1
    adv = torch.randn(B, generator=g)
    lp = ref.selective_log_softmax(logits.double(), index, 0.7)
    ref_lp = (lp + ref_shift * torch.randn(B, T, generator=g, dtype=torch.float64)).float() if with_ref else None
    old = (lp + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)).float() if with_old else None
    return logits, index, mask, adv, ref_lp, old


def check(logits, index, mask, adv, ref_lp, old, rtol=1e-5, **cfg):
    """Loss, metrics and dlogits of the Triton op against the float64 reference on the same inputs."""
    x = logits.clone().requires_grad_()
    loss, metrics = grpo.grpo_loss(x, index, mask, adv, ref_lp, old, **cfg)
    loss.backward()
    xd = logits.double().requires_grad_()
    d = (lambda t: None if t is None else t.double())
    want, want_m = ref.grpo_loss(xd, index, mask, adv.double(), d(ref_lp), d(old), **cfg)
    want.backward()
    assert loss.dtype == torch.float32 and set(metrics) == set(want_m)
    torch.testing.assert_close(loss.double(), want, rtol=1e-5, atol=1e-6)
    for k in want_m:
        torch.testing.assert_close(metrics[k].double(), want_m[k], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x.grad.double(), xd.grad, rtol=rtol, atol=1e-7)
    assert (x.grad[mask == 0] == 0).all()
    return metrics


@pytest.mark.parametrize("with_ref,with_old", list(itertools.product([False, True], [False, True])))
@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
def test_matches_float64_reference(loss_type, level, with_ref, with_old):
    seed = zlib.crc32(repr((loss_type, level, with_ref, with_old)).encode())
    inputs = case(seed, with_ref=with_ref, with_old=with_old)
    cfg = dict(loss_type=loss_type, importance_sampling_level=level, temperature=0.7, max_completion_length=9,
               beta=0.04 if with_ref else 0.0, delta=1.25 if with_old else None, epsilon_high=0.28)
    metrics = check(*inputs, **cfg)
    if with_old and level == "token":
        assert metrics["clip_region"].item() > 0


@pytest.mark.parametrize("old", [False, True])
def test_bf16_logits(old):
    # Video-R1 preset (on-policy) and an off-policy TRL setting on bf16 logits: fp32 loss, bf16 dlogits.
    inputs = case(11, V=1037, dtype=torch.bfloat16, with_old=old)
    check(*inputs, rtol=BF16_RTOL, temperature=1.0 if not old else 0.9, delta=1.3 if old else None)


@pytest.mark.parametrize("kl_clamp", [10.0, None])
def test_kl_clamp_saturated(kl_clamp):
    # |ref - ℓ| up to ~24: with the clamp most KL terms saturate (no KL gradient there); without it they do not.
    inputs = case(12, V=64, ref_shift=12.0)
    check(*inputs, rtol=1e-5, kl_clamp=kl_clamp, temperature=0.7)


@pytest.mark.parametrize("offset", [-1e4, 1e4])
def test_extreme_logits(offset):
    logits, *rest = case(13, V=200)
    x = logits.double() + offset
    lp = ref.selective_log_softmax(x, rest[0], 0.7)  # ref close to the policy so the KL stays moderate
    rest[3] = (lp + 0.1).float()
    loss, metrics = grpo.grpo_loss(x.float(), *rest, temperature=0.7)
    want, _ = ref.grpo_loss(x, rest[0], rest[1], rest[2].double(), rest[3].double(), temperature=0.7)
    assert torch.isfinite(loss) and all(torch.isfinite(v) for v in metrics.values())
    torch.testing.assert_close(loss.double(), want, rtol=1e-3, atol=1e-3)


def test_gradient_in_place_for_intermediate_logits():
    # logits = 1.5·x is an autograd intermediate: its buffer receives dLoss/dlogits, x.grad = 1.5·that.
    logits, index, mask, adv, ref_lp, _ = case(14)
    x = logits.clone().requires_grad_()
    y = x * 1.5
    loss, _ = grpo.grpo_loss(y, index, mask, adv, ref_lp, temperature=0.7)
    loss.backward()
    yd = (logits.double() * 1.5).requires_grad_()
    want, _ = ref.grpo_loss(yd, index, mask, adv.double(), ref_lp.double(), temperature=0.7)
    want.backward()
    torch.testing.assert_close(y.detach().double(), yd.grad, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(x.grad.double(), 1.5 * yd.grad, rtol=1e-5, atol=1e-7)


def test_leaf_logits_untouched_and_misuse_detected():
    logits, index, mask, adv, ref_lp, _ = case(15)
    x = logits.clone().requires_grad_()
    grpo.grpo_loss(x, index, mask, adv, ref_lp)[0].backward()
    assert torch.equal(x.detach(), logits)
    padded = torch.cat([logits, logits[:, :1]], 1).requires_grad_()  # a slice of a leaf: still no overwrite
    grpo.grpo_loss(padded[:, :-1], index, mask, adv, ref_lp)[0].backward()
    assert torch.equal(padded.detach()[:, :-1], logits)
    torch.testing.assert_close(padded.grad[:, :-1], x.grad)
    # Another op that saved the intermediate logits runs its backward after ours: the bumped version makes it raise.
    y = logits.clone().requires_grad_() * 1.0
    other = (y * y).sum()
    loss, _ = grpo.grpo_loss(y, index, mask, adv, ref_lp)
    with pytest.raises(RuntimeError, match="inplace"):
        (loss + other).backward()


def test_forward_writes_every_output():
    logits, index, mask, adv, ref_lp, old = case(16, with_old=True)
    cfg = ref.resolve_cfg(dict(delta=1.4))
    launch = grpo.forward_launch(logits, index, mask, adv, ref_lp, old, cfg)
    for name in ("wloss", "dlogp", "lse", "stats"):
        launch.args[name].fill_(float("nan"))
    launch()
    for name in ("wloss", "dlogp", "lse", "stats"):
        assert torch.isfinite(launch.args[name]).all(), name
    m = mask.reshape(-1) == 0
    assert launch.args["wloss"][m].abs().max() == 0 and launch.args["dlogp"][m].abs().max() == 0


def test_long_sequence_one_dimensional_grid():
    # One 70,000-token completion (Liger's (B, L) grid crashes at L ≥ 65,536): a 1-D grid, right loss and grads.
    logits, index, mask, adv, ref_lp, _ = case(17, B=1, T=70_000, V=8)
    mask[0] = 1
    cfg = ref.resolve_cfg({})
    launch = grpo.forward_launch(logits, index, mask, adv, ref_lp, None, cfg)
    assert len(launch.grid) == 1 and launch.grid[0] == triton.cdiv(70_000, launch.constexprs["BLOCK_N"])
    check(logits, index, mask, adv, ref_lp, None, rtol=1e-4)


def test_dispatch_forced_triton(monkeypatch):
    logits, index, mask, adv, ref_lp, _ = case(18, V=50)
    monkeypatch.setenv("VR1FAST_IMPL", "triton")
    assert kernels.implementation("grpo_loss") is grpo.grpo_loss
    loss, _ = kernels.grpo_loss(logits, index, mask, adv, ref_lp)
    want, _ = ref.grpo_loss(logits.double(), index, mask, adv.double(), ref_lp.double())
    torch.testing.assert_close(loss.double(), want, rtol=1e-5, atol=1e-6)


def test_bad_inputs():
    logits, index, mask, adv, ref_lp, _ = case(19, V=20)
    with pytest.raises(ValueError, match="ref_logprobs"):
        grpo.grpo_loss(logits, index, mask, adv)
    with pytest.raises(ValueError, match="logits"):
        grpo.grpo_loss(logits[0], index, mask, adv, ref_lp)
    with pytest.raises(ValueError, match="mask"):
        grpo.grpo_loss(logits, index, mask[:, :2], adv, ref_lp)


def test_aot_compile_sm90():
    results = aot_check("vr1fast.kernels.grpo")
    assert len(results) == len(grpo.aot_variants())
    for r in results:
        assert r["cubin"] > 0 and r["shared"] <= 227 * 1024, r

