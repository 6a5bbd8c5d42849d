"""The kernels inside the training step: on the tiny Qwen2.5-VL with real synthetic media and real rollouts, the
policy loss and the reference log-probs of ``train_step`` give the same values and gradients whichever
implementation runs them (``loss.impl``: the pure-torch reference, or the Triton kernels under the interpreter),
and both equal Video-R1's own path (full logits over prompt + completion, pixels repeated per completion)."""
import dataclasses

import pytest
import torch

from vr1fast.config import demo
from vr1fast.data.dataset import load_records
from vr1fast.data.processor import build_prompt_batch
from vr1fast.data.prompts import build_messages
from vr1fast.data.synthetic import generate_synthetic
from vr1fast.data.video import load_image, load_video
from vr1fast.kernels.reference import grpo_loss_from_logprobs
from vr1fast.model.forward import completion_logprobs_reference
from vr1fast.model.load import tiny_model
from vr1fast.model.tokenizer import TEXT_VOCAB_SIZE
from vr1fast.rollout import generate
from vr1fast.train import _logprobs, _policy_loss

G = 3


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    data = generate_synthetic(tmp_path_factory.mktemp("synthetic"), n=8, seed=0)
    cfg = demo()
    cfg.rollout.num_generations, cfg.rollout.max_new_tokens = G, 10
    records = load_records(data.rl_json, cfg.data)
    samples = [next(s for s in records if s.data_type == "video"), next(s for s in records if s.data_type == "image")]
    media = [load_video(s.path, cfg.video) if s.data_type == "video" else load_image(s.path, cfg.video)
             for s in samples]
    policy, tok = tiny_model(0, init_std=0.1)
    ref, _ = tiny_model(1, tokenizer=tok, init_std=0.1)
    inputs = build_prompt_batch(tok, [build_messages(s) for s in samples], media).model_inputs()
    out = generate(policy, inputs, num_samples=G, max_new_tokens=cfg.rollout.max_new_tokens, temperature=1.0,
                   top_p=0.95, seed=3)
    # Video-R1's full forward rejects sampled media pad tokens (a count mismatch): keep completions in the text range
    ids = torch.where(out.ids >= TEXT_VOCAB_SIZE, out.ids % TEXT_VOCAB_SIZE, out.ids)
    lengths = torch.tensor([3, 10, 6, 10, 1, 8])  # a random model rarely stops: end some
    for row, n in enumerate(lengths.tolist()):                      # completions early, as an EOS would
        ids[row, n - 1], ids[row, n:] = tok.eos_token_id, tok.pad_token_id
    mask = (torch.arange(ids.shape[1]) < lengths[:, None]).long()
    advantages = torch.randn(len(samples) * G, generator=torch.Generator().manual_seed(5))
    return cfg, policy, ref, inputs, ids, mask, advantages


def _with_head(cfg, impl: str, head: str = "chunked"):
    return dataclasses.replace(cfg, loss=dataclasses.replace(cfg.loss, impl=impl, head=head))


def _loss_and_grads(policy, fn):
    policy.zero_grad(set_to_none=True)
    loss, metrics = fn()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in policy.named_parameters() if p.grad is not None}
    return loss.detach(), metrics, grads


@pytest.mark.parametrize("head", ["chunked", "fused"])
def test_reference_and_triton_paths_agree_in_the_step(setup, head):
    cfg, policy, ref, inputs, ids, mask, adv = setup
    lengths = mask.sum(1).tolist()
    results = {}
    for impl in ("reference", "triton"):
        c = _with_head(cfg, impl, head)
        ref_lp = _logprobs(ref, inputs, ids, lengths, c)
        results[impl] = (ref_lp, *_loss_and_grads(policy, lambda: _policy_loss(policy, inputs, ids, lengths, adv,
                                                                                 ref_lp, c)))
    (ref_a, loss_a, met_a, grad_a), (ref_b, loss_b, met_b, grad_b) = results["reference"], results["triton"]
    assert ref_a.shape == (sum(lengths),)  # the head ran on the real tokens only
    assert (ref_a <= 0).all() and torch.isfinite(ref_a).all()
    torch.testing.assert_close(ref_b, ref_a, rtol=0, atol=2e-5)
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-5, atol=1e-6)
    assert met_a["kl"] > 1e-3  # two different models: the KL term is really exercised
    for key in met_a:
        torch.testing.assert_close(met_b[key], met_a[key], rtol=1e-5, atol=1e-6)
    assert grad_a.keys() == grad_b.keys() and any("visual" in n for n in grad_a)
    for name in grad_a:
        torch.testing.assert_close(grad_b[name], grad_a[name], rtol=1e-4, atol=1e-6, msg=name)


def test_fast_step_equals_video_r1_full_logits_path(setup):
    cfg, policy, ref, inputs, ids, mask, adv = setup
    c = _with_head(cfg, "triton")
    lengths = mask.sum(1).tolist()
    ref_lp = _logprobs(ref, inputs, ids, lengths, c)
    loss, _, grads = _loss_and_grads(policy, lambda: _policy_loss(policy, inputs, ids, lengths, adv, ref_lp, c))

    def video_r1():  # pixels repeated G times, logits over every position, log-softmax + gather, then the slice
        with torch.no_grad():
            ref_full = completion_logprobs_reference(ref, inputs, ids, mask, num_samples=G)
        torch.testing.assert_close(ref_lp, ref_full[mask.bool()], rtol=0, atol=2e-5)
        logp = completion_logprobs_reference(policy, inputs, ids, mask, num_samples=G)
        return grpo_loss_from_logprobs(logp, mask, adv, ref_full, **cfg.loss.kernel_kwargs())

    want_loss, _, want_grads = _loss_and_grads(policy, video_r1)
    torch.testing.assert_close(loss, want_loss, rtol=1e-5, atol=1e-6)
    for name in want_grads:
        torch.testing.assert_close(grads[name], want_grads[name], rtol=1e-4, atol=1e-6, msg=name)
