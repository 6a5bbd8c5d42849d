"""The prompt-once training forward on a CUDA GPU: the compiled FlexAttention path (``model.shared``, a BlockMask from
the prompt-once rule) against the dense path (SDPA with the explicit bool mask) and the repeated layout.

The tiny Qwen2.5-VL (init std 0.1: peaked, position-sensitive logits) on three mixed prompts built as
tests/model/test_shared.py's ``mixed`` (an 8-frame video, an image, a 4-frame video; random frames here, the GPU
image has no PyAV), G = 4, completions of random text tokens with some full, one EOS-first (length 1) and one empty.
One step = ``shared_hidden(..., attention=flex|dense)`` → ``CompletionRows`` → ``rl.loss.policy_loss`` (β = 0.04,
reference log-probs given) → backward: the hidden states [N, H], the loss and the gradient of every parameter
(vision tower and LM head included) are compared.

Tolerances. float32 (TF32 off for matmuls and cuDNN): the paths sum the same terms in different orders (FlexAttention's
online softmax over blocks vs SDPA over the dense mask; one packed row vs a padded batch), ~1e-6 relative; the bars
are test_shared.py's: 2e-5 absolute on the loss, 1e-4 relative (to each tensor's largest entry) on hidden states
and gradients — about 100× the reordering error and far below what a leaked key or a wrong position moves.
bfloat16 (house rule 3): against the float64 dense step on the same (bf16-valued) weights, flex's error is at most
twice the dense bf16 path's error plus 2⁻⁸ of the tensor's largest entry (half a bf16 ulp at that scale, where
both errors are rounding-level).
Run by scripts/gpu_validate.sh (``--only train``); skipped elsewhere.
"""
from __future__ import annotations

import copy

import pytest
import torch

from gpu_util import mixed_prompts
from vr1fast.config import LossConfig
from vr1fast.model.forward import CompletionRows, completion_rows, offsets_of, prompt_embeds, prompt_positions
from vr1fast.model.load import tiny_model
from vr1fast.model.shared import shared_hidden
from vr1fast.model.tokenizer import TEXT_VOCAB_SIZE
from vr1fast.rl.loss import policy_loss

pytestmark = pytest.mark.gpu
G, L = 4, 11
LOSS = LossConfig()  # Triton head on CUDA, as training runs it; the same on every side of a comparison


@pytest.fixture(autouse=True)
def no_tf32():
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.fixture(scope="module")
def mixed():
    """(tokenizer, CUDA model inputs of three prompts: an 8-frame video, an image, a 4-frame video)."""
    _, tok = tiny_model(0)
    return tok, mixed_prompts(tok, ((8, 84, 112, 3), (84, 112, 3), (4, 112, 84, 3)))


def draw(batch, seed: int = 0):
    """Completions [B·G, L] on CUDA and host lengths: some full, one EOS-first (1), one empty (0)."""
    g = torch.Generator().manual_seed(seed)
    n = batch["input_ids"].shape[0] * G
    ids = torch.randint(0, TEXT_VOCAB_SIZE, (n, L), generator=g)
    lengths = torch.randint(2, L + 1, (n,), generator=g)
    lengths[0], lengths[1], lengths[-1] = L, 1, 0
    return ids.cuda(), lengths.tolist()


def step(model, inputs, ids, lengths, how: str, seed: int = 0, loss_cfg: LossConfig = LOSS):
    """(hidden [N, H], loss, {parameter: gradient}) of one policy step, all float64 and detached; ``how``: flex,
    dense (prompt-once, that attention) or repeated (``share_prompt=False``)."""
    if how == "repeated":
        rows = completion_rows(model, inputs, ids, lengths, num_samples=G, share_prompt=False)
    else:
        hidden = shared_hidden(model, prompt_embeds(model, inputs), prompt_positions(model, inputs), inputs, ids,
                               lengths, num_samples=G, attention=how)
        packed = torch.cat([ids[i, :n] for i, n in enumerate(lengths)])
        rows = CompletionRows(hidden, packed, offsets_of(lengths), model.lm_head.weight)
    g = torch.Generator().manual_seed(seed)
    advantages = torch.randn(len(lengths), generator=g).cuda()
    ref = (torch.randn(len(rows.ids), generator=g) * 0.3 - 2.0).cuda()
    model.zero_grad(set_to_none=True)
    loss, _ = policy_loss(rows, advantages, ref, loss_cfg, max_completion_length=L)
    loss.backward()
    grads = {n: p.grad.detach().double() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return rows.hidden.detach().double(), loss.detach().double(), grads


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got - want).abs().max() / want.abs().max().clamp_min(1e-30)).item()


def assert_close_fp32(a, b, what: str) -> None:
    (hid_a, loss_a, grad_a), (hid_b, loss_b, grad_b) = a, b
    assert hid_a.shape == hid_b.shape and hid_a.isfinite().all(), what
    assert rel_err(hid_a, hid_b) <= 1e-4, f"{what}: hidden {rel_err(hid_a, hid_b):.3g}"
    assert abs(loss_a.item() - loss_b.item()) <= 2e-5, f"{what}: loss {loss_a.item()} vs {loss_b.item()}"
    assert grad_a.keys() == grad_b.keys() and len(grad_a) > 20, what  # every parameter, vision tower included
    for name in grad_a:
        assert grad_b[name].abs().max() > 0, f"{what}: {name} has no gradient"
        assert rel_err(grad_a[name], grad_b[name]) <= 1e-4, f"{what}: {name} {rel_err(grad_a[name], grad_b[name]):.3g}"


@pytest.fixture(scope="module")
def fp32_model():
    return tiny_model(0, init_std=0.1, device="cuda")[0].train()


def test_flex_equals_dense_fp32(fp32_model, mixed):
    _, inputs = mixed
    ids, lengths = draw(inputs, seed=1)
    flex = step(fp32_model, inputs, ids, lengths, "flex")
    assert flex[0].shape[0] == sum(lengths)
    assert_close_fp32(flex, step(fp32_model, inputs, ids, lengths, "dense"), "flex vs dense")


def test_flex_equals_the_repeated_layout_fp32(fp32_model, mixed):
    _, inputs = mixed
    ids, lengths = draw(inputs, seed=2)
    assert_close_fp32(step(fp32_model, inputs, ids, lengths, "flex"),
                      step(fp32_model, inputs, ids, lengths, "repeated"), "flex vs repeated")


def test_auto_is_flex_on_cuda(fp32_model, mixed):
    """``completion_rows`` (attention "auto", what training calls) takes the flex path on CUDA: equal bit for bit."""
    _, inputs = mixed
    ids, lengths = draw(inputs, seed=3)
    with torch.no_grad():
        auto = completion_rows(fp32_model, inputs, ids, lengths, num_samples=G).hidden
        flex = shared_hidden(fp32_model, prompt_embeds(fp32_model, inputs), prompt_positions(fp32_model, inputs),
                             inputs, ids, lengths, num_samples=G, attention="flex")
    assert torch.equal(auto, flex)


def test_flex_bf16_within_twice_the_dense_error(mixed):
    """bf16 flex and bf16 dense against the float64 dense step on the same bf16 weights, its loss the pure-torch
    reference (house rule 3)."""
    _, inputs = mixed
    ids, lengths = draw(inputs, seed=4)
    model = tiny_model(0, init_std=0.1, dtype=torch.bfloat16, device="cuda")[0].train()
    exact = step(copy.deepcopy(model).double(), inputs, ids, lengths, "dense", loss_cfg=LossConfig(impl="reference"))
    flex, dense = (step(model, inputs, ids, lengths, how) for how in ("flex", "dense"))
    names = ["hidden", "loss"] + sorted(exact[2])
    flat = [lambda r: r[0], lambda r: r[1]] + [lambda r, n=n: r[2][n] for n in sorted(exact[2])]
    assert flex[2].keys() == dense[2].keys() == exact[2].keys() and len(exact[2]) > 20
    for name, get in zip(names, flat):
        want, ours, torch_bf16 = get(exact), get(flex), get(dense)
        assert ours.isfinite().all(), name
        scale = want.abs().max().item()
        err, base = (ours - want).abs().max().item(), (torch_bf16 - want).abs().max().item()
        assert err <= 2 * base + 2**-8 * scale, f"{name}: flex error {err:.3g} > 2 x dense's {base:.3g} + floor"
