"""The pure-torch references against hand-derived values, float64 gradcheck and liger's fused-linear GRPO loss."""
import math

import pytest
import torch

from vr1fast import kernels
from vr1fast.kernels import reference as ref

LOG_K = torch.log(torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64))  # softmax(LOG_K + c) = [.1, .2, .3, .4]


def k3(d: float) -> float:
    return math.exp(d) - d - 1


def leaf(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64, requires_grad=True)


# ---------------------------------------------------------------- log-probs


def test_selective_log_softmax_hand_values():
    # row 0: exp(logits) = [1, 2, 5] → p = [1/8, 2/8, 5/8]; target 2 → log(5/8).
    # row 1 at T = 2: logits / 2 = [ln 3, 0, ln 4] → p = [3/8, 1/8, 4/8]; target 0 → log(3/8).
    logits = torch.tensor([[0.0, math.log(2), math.log(5)], [2 * math.log(3), 0.0, 2 * math.log(4)]])
    lp, ent = ref.selective_log_softmax(logits[:1], torch.tensor([2]), return_entropy=True)
    assert lp.dtype == torch.float32
    assert lp.item() == pytest.approx(math.log(5 / 8), abs=1e-6)
    p = [1 / 8, 2 / 8, 5 / 8]
    assert ent.item() == pytest.approx(-sum(q * math.log(q) for q in p), abs=1e-6)
    lp_t = ref.selective_log_softmax(logits[1:], torch.tensor([0]), temperature=2.0)
    assert lp_t.item() == pytest.approx(math.log(3 / 8), abs=1e-6)


def test_selective_log_softmax_extreme_and_bf16():
    # Shifting a row by a constant changes nothing; bf16 logits give fp32 log-probs ≤ 0.
    base = torch.tensor([[0.5, -1.25, 3.0, 2.0]])
    idx = torch.tensor([1])
    want = math.log(math.exp(-1.25) / sum(math.exp(v) for v in [0.5, -1.25, 3.0, 2.0]))
    for shift in (-1e4, 0.0, 1e4):
        assert ref.selective_log_softmax(base.double() + shift, idx).item() == pytest.approx(want, abs=1e-9)
    lp = ref.selective_log_softmax(base.bfloat16() - 3e4, idx)
    assert lp.dtype == torch.float32 and torch.isfinite(lp).all() and (lp <= 0).all()


def test_linear_logprobs_chunked_equals_logits_path():
    g = torch.Generator().manual_seed(0)
    h = torch.randn(2, 7, 6, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(11, 6, generator=g, dtype=torch.float64, requires_grad=True)
    idx = torch.randint(0, 11, (2, 7), generator=g)
    lp, ent = ref.linear_logprobs(h, w, idx, 0.7, return_entropy=True, chunk_size=3)
    lp2, ent2 = ref.selective_log_softmax(h @ w.T, idx, 0.7, return_entropy=True)
    torch.testing.assert_close(lp, lp2, rtol=0, atol=1e-12)
    torch.testing.assert_close(ent, ent2, rtol=0, atol=1e-12)
    dy = torch.randn(2, 7, generator=g, dtype=torch.float64)
    grads = torch.autograd.grad((lp * dy).sum() + ent.sum(), (h, w))
    grads2 = torch.autograd.grad((lp2 * dy).sum() + ent2.sum(), (h, w))
    for a, b in zip(grads, grads2):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_linear_logprobs_gradcheck_with_entropy():
    g = torch.Generator().manual_seed(1)
    h = torch.randn(5, 4, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(6, 4, generator=g, dtype=torch.float64, requires_grad=True)
    idx = torch.randint(0, 6, (5,), generator=g)

    def f(h, w):
        lp, ent = ref.linear_logprobs(h, w, idx, 1.3, return_entropy=True, chunk_size=2)
        return lp, ent

    assert torch.autograd.gradcheck(f, (h, w))


# ---------------------------------------------------------------- GRPO loss: hand-derived values


def test_on_policy_grpo_value_and_logit_gradient():
    # Video-R1 mode: ratio exp(ℓ - sg ℓ) = 1, so L = -A + β·k3 and the loss is
    # mean_i mean_{t: m=1} (-A_i + β·k3(d_it)) with d = ref - ℓ; dLoss/dℓ = m/(B·n_i)·(-A_i + β(1 - e^d)),
    # dLoss/dz_v = dLoss/dℓ · (1[v=y] - p_v) / T.
    T, beta = 0.7, 0.04
    shift = torch.tensor([[0.3, -1.0, 2.0], [0.5, 0.0, -0.7]], dtype=torch.float64)
    logits = (T * (LOG_K + shift[..., None])).requires_grad_()
    idx = torch.tensor([[3, 1, 2], [0, 3, 3]])
    p_y = torch.tensor([[0.4, 0.2, 0.3], [0.1, 0.4, 0.4]], dtype=torch.float64)
    d = torch.tensor([[0.2, -0.3, 0.4], [0.1, -0.2, 0.5]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    adv = torch.tensor([1.5, -0.5], dtype=torch.float64)
    loss, metrics = ref.grpo_loss(logits, idx, mask, adv, ref_logprobs=p_y.log() + d, beta=beta, temperature=T)
    want = 0.5 * ((-1.5 + beta * (k3(0.2) + k3(-0.3)) / 2) + (0.5 + beta * (k3(0.1) + k3(-0.2) + k3(0.5)) / 3))
    assert loss.item() == pytest.approx(want, abs=1e-12)
    assert metrics["ratio"].item() == pytest.approx(1.0, abs=1e-12)
    assert metrics["kl"].item() == pytest.approx((k3(0.2) + k3(-0.3) + k3(0.1) + k3(-0.2) + k3(0.5)) / 5, abs=1e-12)
    assert metrics["clip_region"].item() == 0.0
    loss.backward()
    n = torch.tensor([[2.0], [3.0]], dtype=torch.float64)
    dl = mask / (2 * n) * (-adv[:, None] + beta * (1 - d.exp()))
    onehot = torch.nn.functional.one_hot(idx, 4).double()
    want_grad = dl[..., None] * (onehot - torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64)) / T
    torch.testing.assert_close(logits.grad, want_grad, rtol=0, atol=1e-12)


@pytest.mark.parametrize("loss_type,cfg,want", [
    # β = 0, on-policy: L = -A_i on every token. A = [1.5, -0.5, 2.0], n = [3, 1, 2], B = 3, Σn = 6.
    ("grpo", {}, (-1.5 + 0.5 - 2.0) / 3),                              # -1
    ("bnpo", {}, (-1.5 * 3 + 0.5 * 1 - 2.0 * 2) / 6),                  # -4/3
    ("dr_grpo", {"max_completion_length": 8}, -8.0 / (3 * 8)),         # -1/3
    ("dapo", {}, -8.0 / 6),                                            # Σn of this batch
    ("dapo", {"num_items": 16}, -8.0 / 16),                            # a larger generation batch
])
def test_loss_type_normalisers(loss_type, cfg, want):
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(3, 4, 5, generator=g, dtype=torch.float64)
    idx = torch.randint(0, 5, (3, 4), generator=g)
    mask = torch.tensor([[1, 1, 1, 0], [0, 1, 0, 0], [1, 0, 1, 0]])
    adv = torch.tensor([1.5, -0.5, 2.0], dtype=torch.float64)
    loss, _ = ref.grpo_loss(logits, idx, mask, adv, beta=0.0, loss_type=loss_type, **cfg)
    assert loss.item() == pytest.approx(want, abs=1e-12)


def test_all_masked_row_contributes_zero():
    # TRL's max(n_i, 1): the empty middle row adds 0 but counts in B → (-1.5 - 2.0) / 3; Video-R1 would give NaN.
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(3, 4, 5, generator=g, dtype=torch.float64, requires_grad=True)
    idx = torch.randint(0, 5, (3, 4), generator=g)
    mask = torch.tensor([[1, 1, 1, 0], [0, 0, 0, 0], [1, 0, 1, 0]])
    adv = torch.tensor([1.5, -0.5, 2.0], dtype=torch.float64)
    ref_lp = ref.selective_log_softmax(logits.detach(), idx) + 0.3
    loss, metrics = ref.grpo_loss(logits, idx, mask, adv, ref_logprobs=ref_lp, beta=0.04)
    assert loss.item() == pytest.approx((-1.5 - 2.0) / 3 + 0.04 * k3(0.3) * 2 / 3, abs=1e-12)
    loss.backward()
    assert logits.grad[1].abs().max().item() == 0.0
    assert logits.grad[0].abs().max().item() > 0
    assert all(torch.isfinite(v) for v in metrics.values())


@pytest.mark.parametrize("d", [12.0, -12.0])
def test_kl_clamp_on_and_off(d):
    # One token, on-policy, A = 0.5, β = 0.04, x = ref - ℓ = ±12. Clamp 10 → x = ±10 and no KL gradient;
    # None → the raw k3 and dLoss/dℓ = -A + β(1 - e^x).
    lp = leaf([[-0.9]])
    args = (torch.ones(1, 1), torch.tensor([0.5], dtype=torch.float64), lp.detach() + d)
    loss, _ = ref.grpo_loss_from_logprobs(lp, *args, beta=0.04, kl_clamp=10.0)
    assert loss.item() == pytest.approx(-0.5 + 0.04 * k3(math.copysign(10.0, d)), rel=1e-12)
    (g,) = torch.autograd.grad(loss, lp)
    assert g.item() == pytest.approx(-0.5, abs=1e-12)
    loss, _ = ref.grpo_loss_from_logprobs(lp, *args, beta=0.04, kl_clamp=None)
    assert loss.item() == pytest.approx(-0.5 + 0.04 * k3(d), rel=1e-12)
    (g,) = torch.autograd.grad(loss, lp)
    assert g.item() == pytest.approx(-0.5 + 0.04 * (1 - math.exp(d)), rel=1e-12)


def clip_case():
    # Row 0: A = +2, ratios [1.5, 1.1]; row 1: A = -1, ratios [1.5, 0.5]; ε = 0.2 → [0.8, 1.2], β = 0.
    lp = leaf([[-1.0, -2.0], [-0.5, -1.5]])
    old = lp.detach() - torch.tensor([[1.5, 1.1], [1.5, 0.5]], dtype=torch.float64).log()
    return lp, torch.ones(2, 2), torch.tensor([2.0, -1.0], dtype=torch.float64), old


def test_old_logprobs_clipping():
    # Per-token L = -min(w·A, clamp(w)·A): row 0 [-2.4 (clipped high: no grad), -2.2]; row 1 [1.5, 0.8 (clipped
    # low: no grad)]. grpo loss = ½[(-2.4 - 2.2)/2 + (1.5 + 0.8)/2] = -0.575; dLoss/dℓ = -A·w/(B·n).
    lp, mask, adv, old = clip_case()
    loss, m = ref.grpo_loss_from_logprobs(lp, mask, adv, old_logprobs=old, beta=0.0)
    assert loss.item() == pytest.approx(-0.575, abs=1e-12)
    (g,) = torch.autograd.grad(loss, lp)
    torch.testing.assert_close(g, torch.tensor([[0.0, -0.55], [0.375, 0.0]], dtype=torch.float64), rtol=0, atol=1e-12)
    assert (m["clip_high"].item(), m["clip_low"].item(), m["clip_region"].item()) == (0.25, 0.25, 0.5)
    assert m["ratio"].item() == pytest.approx((1.5 + 1.1 + 1.5 + 0.5) / 4, abs=1e-12)


def test_epsilon_high_and_delta():
    lp, mask, adv, old = clip_case()
    # ε_high = 0.6: ratio 1.5 with A = +2 is inside [0.8, 1.6] → L = -3.0 with gradient -3.0/4.
    loss, m = ref.grpo_loss_from_logprobs(lp, mask, adv, old_logprobs=old, beta=0.0, epsilon_high=0.6)
    assert loss.item() == pytest.approx(0.5 * ((-3.0 - 2.2) / 2 + (1.5 + 0.8) / 2), abs=1e-12)
    (g,) = torch.autograd.grad(loss, lp)
    assert g[0, 0].item() == pytest.approx(-0.75, abs=1e-12)
    assert m["clip_high"].item() == 0.0
    # δ = 1.3 caps the unclipped branch: row 1 token 0 (A = -1, w = 1.5) → -min(-1.3, -1.2) = 1.3, no gradient.
    loss, _ = ref.grpo_loss_from_logprobs(lp, mask, adv, old_logprobs=old, beta=0.0, delta=1.3)
    assert loss.item() == pytest.approx(0.5 * ((-2.4 - 2.2) / 2 + (1.3 + 0.8) / 2), abs=1e-12)
    (g,) = torch.autograd.grad(loss, lp)
    assert g[1, 0].item() == 0.0


def test_sequence_importance_sampling():
    # log w_i = masked mean of ℓ - ℓ_old: row 0 mean(0.3, -0.1) = 0.1, A = 2 → L = -2e^0.1 on every token;
    # row 1 mean(0.5, 0.4) = 0.45, A = -1 → w = e^0.45 > 1.2 but A < 0 → unclipped, L = e^0.45;
    # row 2 same ratio, A = +1 → clipped high, L = -1.2, no gradient. The masked third token (r = 5) is ignored.
    lp = leaf([[-1.0, -2.0, -0.3], [-0.5, -1.5, -0.2], [-0.7, -0.4, -2.5]])
    r = torch.tensor([[0.3, -0.1, 5.0], [0.5, 0.4, 5.0], [0.5, 0.4, 5.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 0]] * 3)
    adv = torch.tensor([2.0, -1.0, 1.0], dtype=torch.float64)
    loss, m = ref.grpo_loss_from_logprobs(lp, mask, adv, old_logprobs=lp.detach() - r, beta=0.0,
                                          importance_sampling_level="sequence")
    w0, w1 = math.exp(0.1), math.exp(0.45)
    assert loss.item() == pytest.approx((-2 * w0 + w1 - 1.2) / 3, abs=1e-12)
    (g,) = torch.autograd.grad(loss, lp)
    # dLoss/dℓ_t = -A·w·m_t/n_i / B
    want = torch.tensor([[-2 * w0 / 2, -2 * w0 / 2, 0], [w1 / 2, w1 / 2, 0], [0, 0, 0]], dtype=torch.float64) / 3
    torch.testing.assert_close(g, want, rtol=0, atol=1e-12)
    assert m["clip_high"].item() == pytest.approx(2 / 6, abs=1e-12)


def test_bad_options_raise():
    lp, mask, adv, old = clip_case()
    with pytest.raises(ValueError, match="loss_type"):
        ref.grpo_loss_from_logprobs(lp, mask, adv, beta=0.0, loss_type="ppo")
    with pytest.raises(ValueError, match="max_completion_length"):
        ref.grpo_loss_from_logprobs(lp, mask, adv, beta=0.0, loss_type="dr_grpo")
    with pytest.raises(ValueError, match="ref_logprobs"):
        ref.grpo_loss_from_logprobs(lp, mask, adv, beta=0.04)
    with pytest.raises(TypeError, match="epsilon"):
        ref.grpo_loss_from_logprobs(lp, mask, adv, beta=0.0, epsilon=0.2)
    with pytest.raises(ValueError, match="advantages"):
        ref.grpo_loss_from_logprobs(lp, mask, adv[:1], beta=0.0)


# ---------------------------------------------------------------- gradcheck and linear == logits path


def random_case(seed, B=2, T=3, V=5, H=None):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, H or V, generator=g, dtype=torch.float64, requires_grad=True)
    idx = torch.randint(0, V, (B, T), generator=g)
    mask = torch.tensor([[1] * T, [1] * (T - 1) + [0]] + [[1] * T] * (B - 2))
    adv = torch.randn(B, generator=g, dtype=torch.float64)
    lp_ref = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3
    lp_old = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3
    return g, x, idx, mask, adv, lp_ref, lp_old


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
def test_grpo_loss_gradcheck(loss_type, level):
    # With old log-probs the loss is a true function of the logits (the on-policy sg trick is not, so it is
    # checked against the hand formula above instead).
    _, logits, idx, mask, adv, lp_ref, _ = random_case(4)
    old = ref.selective_log_softmax(logits.detach(), idx, 0.8) + 0.05 * torch.randn(logits.shape[:2],
                                                                                    dtype=torch.float64)
    cfg = dict(loss_type=loss_type, importance_sampling_level=level, temperature=0.8, max_completion_length=7)
    assert torch.autograd.gradcheck(lambda z: ref.grpo_loss(z, idx, mask, adv, lp_ref, old, **cfg)[0], (logits,))


def test_linear_grpo_loss_gradcheck():
    g, h, idx, mask, adv, lp_ref, lp_old = random_case(5, H=4)
    w = torch.randn(5, 4, generator=g, dtype=torch.float64, requires_grad=True)
    cfg = dict(temperature=1.3, kl_clamp=None)
    assert torch.autograd.gradcheck(
        lambda h, w: ref.linear_grpo_loss(h, w, idx, mask, adv, lp_ref, lp_old, **cfg)[0], (h, w))


@pytest.mark.parametrize("old", [False, True])
def test_linear_equals_logits_path(old):
    g, h, idx, mask, adv, lp_ref, lp_old = random_case(6, B=3, T=5, V=9, H=4)
    w = torch.randn(9, 4, generator=g, dtype=torch.float64, requires_grad=True)
    old_lp = lp_old if old else None
    cfg = dict(temperature=0.7, loss_type="bnpo", epsilon_high=0.28)
    loss, m = ref.linear_grpo_loss(h, w, idx, mask, adv, lp_ref, old_lp, **cfg)
    loss2, m2 = ref.grpo_loss(h @ w.T, idx, mask, adv, lp_ref, old_lp, **cfg)
    torch.testing.assert_close(loss, loss2, rtol=0, atol=1e-12)
    for k in m2:
        torch.testing.assert_close(m[k], m2[k], rtol=0, atol=1e-12)
    for a, b in zip(torch.autograd.grad(loss, (h, w)), torch.autograd.grad(loss2, (h, w))):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_dispatch(monkeypatch):
    monkeypatch.setenv("VR1FAST_IMPL", "reference")
    assert kernels.implementation("grpo_loss", device="cuda") is ref.grpo_loss
    monkeypatch.setenv("VR1FAST_IMPL", "auto")
    assert kernels.implementation("linear_grpo_loss", device="cpu") is ref.linear_grpo_loss
    monkeypatch.setenv("VR1FAST_IMPL", "fast")
    with pytest.raises(ValueError, match="VR1FAST_IMPL"):
        kernels.implementation("grpo_loss")


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
@pytest.mark.parametrize("with_old", [False, True])
def test_parity_with_liger(loss_type, level, with_old):
    # liger's LigerFusedLinearGRPOLoss mirrors TRL's _compute_loss (unclamped k3 → kl_clamp=None here).
    from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

    g = torch.Generator().manual_seed(7)
    B, T, H, V = 3, 5, 8, 11
    h = torch.randn(B, T, H, generator=g, requires_grad=True)
    w = torch.randn(V, H, generator=g, requires_grad=True)
    idx = torch.randint(0, V, (B, T), generator=g)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 1, 1, 1, 0]])
    adv = torch.randn(B, generator=g)
    with torch.no_grad():
        lp = ref.linear_logprobs(h, w, idx, 0.7)
    lp_ref = lp + 0.5 * torch.randn(B, T, generator=g)
    shift = torch.tensor([[0.4], [-0.3], [0.1]])  # per-row offsets so sequence-level ratios clip too
    old = lp + shift + 0.3 * torch.randn(B, T, generator=g) if with_old else None
    cfg = dict(beta=0.04, epsilon_low=0.2, epsilon_high=0.28, loss_type=loss_type, max_completion_length=7,
               importance_sampling_level=level, temperature=0.7)
    liger = LigerFusedLinearGRPOLoss(compiled=False, use_ref_model=True, **cfg)
    loss_l, (kl_l, clip_l) = liger(h, w, idx, mask, adv, ref_per_token_logps=lp_ref, old_per_token_logps=old)
    grads_l = torch.autograd.grad(loss_l, (h, w))
    loss, m = ref.linear_grpo_loss(h, w, idx, mask, adv, lp_ref, old, kl_clamp=None, **cfg)
    grads = torch.autograd.grad(loss, (h, w))
    torch.testing.assert_close(loss, loss_l, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(m["kl"], kl_l, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(m["clip_region"], clip_l, rtol=1e-5, atol=1e-6)
    for a, b in zip(grads, grads_l):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    if with_old:
        assert m["clip_region"].item() > 0  # the case exercises clipping
