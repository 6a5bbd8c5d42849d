"""model.shared: each prompt computed once per group (prompt ‖ completion₁ ‖ … ‖ completion_G in one packed row)
against the repeated layout (``share_prompt=False``) — loss, metrics, every parameter gradient and the reference
log-probs — plus the layout and mask rule by hand, the FlexAttention mask against the dense one, and refusals.

Tolerance (float32, tiny model with init std 0.1 so logits are peaked and position-sensitive): the two layouts
sum the same terms in different orders (one attention call over a packed row with a mask vs a padded batch), so
values agree to ~1e-6 relative; the bars are 2e-5 absolute on log-probs and losses and 1e-4 relative (against
each tensor's largest entry) on gradients, about 100× the observed differences and far below the ~0.3 a wrong
position or a leaked key moves a log-prob.
"""
import copy

import pytest
import torch

from vr1fast.config import LossConfig
from vr1fast.model.forward import completion_rows, offsets_of
from vr1fast.model.load import set_checkpointing, tiny_model
from vr1fast.model.shared import PromptOnceMask, _mask_mod, allowed, shared_layout
from vr1fast.model.tokenizer import TEXT_VOCAB_SIZE
from vr1fast.rl.loss import completion_logprobs, policy_loss

L = 9
LOSS = LossConfig(impl="reference")


@pytest.fixture(scope="module")
def model_tok():
    model, tok = tiny_model(0, init_std=0.1)
    return model.train(), tok


def draw(batch, G, seed):
    """Random text completions [B·G, L] and lengths: some full, some empty (0), some EOS-first (1)."""
    g = torch.Generator().manual_seed(seed)
    n = batch["input_ids"].shape[0] * G
    ids = torch.randint(0, TEXT_VOCAB_SIZE, (n, L), generator=g)
    lengths = torch.randint(0, L + 1, (n,), generator=g)
    lengths[0], lengths[1], lengths[-1] = L, 1, 0
    return ids, lengths.tolist()


def loss_and_grads(model, batch, ids, lengths, G, share, seed=0):
    rows = completion_rows(model, batch, ids, lengths, num_samples=G, share_prompt=share)
    g = torch.Generator().manual_seed(seed)
    advantages = torch.randn(len(lengths), generator=g)
    ref = rows.hidden.new_tensor(torch.randn(len(rows.ids), generator=g).mul(0.3).sub(2.0).tolist())
    model.zero_grad(set_to_none=True)
    loss, metrics = policy_loss(rows, advantages, ref, LOSS, max_completion_length=L)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return loss.detach(), {k: v.detach() for k, v in metrics.items()}, grads


def assert_same_step(a, b):
    (loss_a, met_a, grad_a), (loss_b, met_b, grad_b) = a, b
    torch.testing.assert_close(loss_a, loss_b, atol=2e-5, rtol=0)
    assert met_a.keys() == met_b.keys()
    for k in met_a:
        torch.testing.assert_close(met_a[k], met_b[k], atol=2e-5, rtol=1e-5, msg=k)
    assert grad_a.keys() == grad_b.keys() and len(grad_a) > 20  # every parameter, vision tower included
    for name in grad_a:
        scale = grad_b[name].abs().max().item()
        assert scale > 0, name
        assert (grad_a[name] - grad_b[name]).abs().max().item() <= 1e-4 * scale, name


@pytest.mark.parametrize("G", [2, 4, 8])
def test_loss_metrics_and_every_gradient_equal_the_repeated_layout(model_tok, mixed, G):
    model, _ = model_tok
    ids, lengths = draw(mixed, G, seed=G)
    assert_same_step(loss_and_grads(model, mixed, ids, lengths, G, True),
                     loss_and_grads(model, mixed, ids, lengths, G, False))


def test_reference_logprobs_equal_the_repeated_layout(model_tok, mixed):
    model, _ = model_tok
    ids, lengths = draw(mixed, 4, seed=11)
    with torch.no_grad():
        shared, repeated = (completion_logprobs(completion_rows(model, mixed, ids, lengths, num_samples=4,
                                                                share_prompt=s), LOSS) for s in (True, False))
    assert shared.shape == (sum(lengths),) and repeated.std() > 0.5
    torch.testing.assert_close(shared, repeated, atol=2e-5, rtol=0)


def test_gradient_checkpointing_keeps_the_gradients(model_tok, mixed):
    """Checkpointing recomputes each layer in the backward, after the forward returned: the mask object itself
    routes the recomputed attention, so the gradients equal the repeated layout's."""
    model = copy.deepcopy(model_tok[0])
    set_checkpointing(model, True)
    ids, lengths = draw(mixed, 2, seed=5)
    assert_same_step(loss_and_grads(model, mixed, ids, lengths, 2, True),
                     loss_and_grads(model_tok[0], mixed, ids, lengths, 2, False))


def test_decoder_sees_each_prompt_once(model_tok, mixed):
    """Decoder tokens: Σ real prompt tokens + Σ (l − 1) in one row, vs B·G rows of P + L."""
    model, _ = model_tok
    G = 4
    ids, lengths = draw(mixed, G, seed=3)
    seen = []
    hook = model.model.language_model.register_forward_pre_hook(
        lambda mod, args, kw: seen.append(tuple(kw["inputs_embeds"].shape[:2])), with_kwargs=True)
    try:
        with torch.no_grad():
            for share in (True, False):
                completion_rows(model, mixed, ids, lengths, num_samples=G, share_prompt=share)
    finally:
        hook.remove()
    B, P = mixed["input_ids"].shape
    real = int(mixed["attention_mask"].sum())
    assert seen == [(1, real + sum(max(n - 1, 0) for n in lengths)), (B * G, P + L)]


def test_layout_by_hand():
    """Two prompts (3 and 2 real tokens, left-padded to 4), G = 2, lengths [3, 0, 1, 2]."""
    prompt_mask = torch.tensor([[0, 1, 1, 1], [0, 0, 1, 1]])
    ids = torch.arange(100, 112).reshape(4, 3)
    lay = shared_layout(prompt_mask, ids, [3, 0, 1, 2], 2, torch.device("cpu"))
    # row: p0 p0 p0 | c00 c01 | p1 p1 | c30      (c10 empty; c20 has 1 token: no input, predicted by p1's last)
    assert lay.source.tolist() == [1, 2, 3, 8, 9, 6, 7, 10]
    assert lay.input_ids.tolist() == [100, 101, 109]
    assert lay.member.tolist() == [0, 0, 0, 1, 1, 0, 0, 2]
    assert lay.prompt_of.tolist() == [0, 0, 0, 0, 0, 1, 1, 1]
    assert lay.step.tolist() == [-1, -1, -1, 0, 1, -1, -1, 0]
    assert lay.predict.tolist() == [2, 3, 4, 6, 6, 7]  # c00 ← p0 last, c01 ← c00, c02 ← c01; c20 ← p1; c30, c31
    want = torch.zeros(8, 8, dtype=torch.bool)
    for q, ks in {0: [0], 1: [0, 1], 2: [0, 1, 2], 3: [0, 1, 2, 3], 4: [0, 1, 2, 3, 4], 5: [5], 6: [5, 6],
                  7: [5, 6, 7]}.items():
        want[q, ks] = True
    assert torch.equal(allowed(lay), want)


def test_siblings_never_see_each_other():
    """Random layouts: a completion token sees its prompt and its own earlier tokens, nothing else."""
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        B, G = int(torch.randint(1, 4, (1,), generator=g)), int(torch.randint(1, 5, (1,), generator=g))
        real = torch.randint(1, 7, (B,), generator=g)
        mask = (torch.arange(6)[None] >= 6 - real[:, None]).long()
        lengths = torch.randint(0, 5, (B * G,), generator=g).tolist()
        lay = shared_layout(mask, torch.zeros(B * G, 4, dtype=torch.long), lengths, G, torch.device("cpu"))
        a = allowed(lay)
        for q in range(lay.tokens):
            for k in range(lay.tokens):
                same = lay.prompt_of[q] == lay.prompt_of[k]
                ok = same and k <= q and (lay.member[k] == 0 or lay.member[k] == lay.member[q])
                assert bool(a[q, k]) == bool(ok)
        assert lay.tokens == int(real.sum()) + sum(max(n - 1, 0) for n in lengths)
        assert lay.predict.numel() == sum(lengths)


def test_flex_block_mask_is_the_dense_rule():
    """The CUDA path's mask_mod, materialised on the CPU, is the dense mask."""
    from torch.nn.attention.flex_attention import create_mask
    lay = shared_layout(torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]]), torch.zeros(6, 5, dtype=torch.long),
                        [5, 2, 0, 1, 4, 3], 3, torch.device("cpu"))
    T = lay.tokens
    assert torch.equal(create_mask(_mask_mod(lay), None, None, T, T, device="cpu")[0, 0], allowed(lay))
    assert PromptOnceMask.build(lay).dense is not None  # auto on the CPU: dense
    with pytest.raises(ValueError, match="one of"):
        PromptOnceMask.build(lay, "sparse")


def test_eager_attention_is_refused(model_tok, mixed):
    model = copy.deepcopy(model_tok[0])
    model.model.language_model.config._attn_implementation = "eager"
    ids, lengths = draw(mixed, 2, seed=1)
    with pytest.raises(ValueError, match="model.share_prompt needs"):
        completion_rows(model, mixed, ids, lengths, num_samples=2, share_prompt=True)
    rows = completion_rows(model, mixed, ids, lengths, num_samples=2, share_prompt=False)
    assert rows.hidden.shape[0] == sum(lengths)


def test_other_masks_reach_the_original_attention(model_tok, mixed):
    """The wrapped registry entries pass any mask but ours to the original function: HF's own forward is
    unchanged (logits of a plain forward equal those of a model whose sdpa entry was never wrapped)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    wrapped = ALL_ATTENTION_FUNCTIONS["sdpa"]
    assert wrapped is not sdpa_attention_forward and wrapped._vr1fast_prompt_once is sdpa_attention_forward
    model, _ = model_tok
    batch = {k: v for k, v in mixed.items()}
    with torch.no_grad():
        ours = model(**batch, use_cache=False).logits
        ALL_ATTENTION_FUNCTIONS["sdpa"] = sdpa_attention_forward
        try:
            plain = model(**batch, use_cache=False).logits
        finally:
            del ALL_ATTENTION_FUNCTIONS["sdpa"]
    assert ALL_ATTENTION_FUNCTIONS["sdpa"] is wrapped
    assert torch.equal(ours, plain)


def test_offsets_match_the_packed_order(model_tok, mixed):
    model, _ = model_tok
    ids, lengths = draw(mixed, 2, seed=9)
    rows = completion_rows(model, mixed, ids, lengths, num_samples=2)
    assert rows.offsets.tolist() == offsets_of(lengths).tolist()
    assert torch.equal(rows.ids, torch.cat([ids[i, :n] for i, n in enumerate(lengths)]))
