"""rl.loss.policy_loss: the Video-R1 loss through the LM head on the packed completion tokens, from LossConfig."""
import math

import pytest
import torch

from vr1fast.config import LossConfig
from vr1fast.kernels.reference import pack
from vr1fast.model.forward import CompletionRows, offsets_of
from vr1fast.rl.loss import completion_logprobs, policy_loss


def _rows(hidden, weight, ids, mask) -> CompletionRows:
    offsets = offsets_of(mask.sum(1).long())
    return CompletionRows(pack(hidden, offsets), pack(ids, offsets), offsets, weight)


def test_policy_loss_video_r1_value_and_gradient():
    # Video-R1 (LossConfig defaults): L = -A + 0.04·k3(ref - ℓ), mean over a row's tokens, then over rows;
    # dLoss/dℓ = m/(B·n_i)·(-A_i + β(1 - e^d)) with d = ref - ℓ, chained through the head by hand below.
    g = torch.Generator().manual_seed(0)
    B, T, H, V = 2, 4, 6, 13
    hidden = torch.randn(B, T, H, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(V, H, generator=g, dtype=torch.float64, requires_grad=True)
    ids = torch.randint(0, V, (B, T), generator=g)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]], dtype=torch.float64)
    adv = torch.tensor([0.8, -1.1], dtype=torch.float64)
    cfg = LossConfig(impl="reference")
    rows = _rows(hidden, weight, ids, mask)
    lp = completion_logprobs(rows, cfg)
    d = torch.tensor([[0.3, -0.2, 0.1, 7.0], [0.25, -0.4, 0.6, -0.1]], dtype=torch.float64)
    assert lp.shape == (7,)  # the real tokens only
    loss, metrics = policy_loss(rows, adv, lp + pack(d, rows.offsets), cfg)
    k3 = d.exp() - d - 1
    want = sum((-adv[i] + 0.04 * k3[i][mask[i].bool()]).mean() for i in range(B)) / B
    assert loss.item() == pytest.approx(want.item(), abs=1e-12)
    assert metrics["ratio"].item() == pytest.approx(1.0, abs=1e-12)
    loss.backward()
    dl = mask / (B * mask.sum(1, keepdim=True)) * (-adv[:, None] + 0.04 * (1 - d.exp()))
    p = torch.softmax(hidden.detach() @ weight.detach().T, -1)
    dz = dl[..., None] * (torch.nn.functional.one_hot(ids, V) - p)
    torch.testing.assert_close(hidden.grad, dz @ weight.detach(), rtol=0, atol=1e-12)
    torch.testing.assert_close(weight.grad, torch.einsum("btv,bth->vh", dz, hidden.detach()), rtol=0, atol=1e-12)
    assert math.isfinite(loss.item())


def test_policy_loss_dr_grpo_uses_max_completion_length():
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(2, 3, 4, generator=g)
    weight = torch.randn(7, 4, generator=g)
    ids = torch.randint(0, 7, (2, 3), generator=g)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    adv = torch.tensor([1.0, 3.0])
    cfg = LossConfig(loss_type="dr_grpo", beta=0.0, impl="reference")
    loss, _ = policy_loss(_rows(hidden, weight, ids, mask), adv, None, cfg, max_completion_length=10)
    assert loss.item() == pytest.approx(-(1.0 * 2 + 3.0 * 3) / (2 * 10), abs=1e-6)
