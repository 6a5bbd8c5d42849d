"""On-device sampling against HF's warpers: the same support (ties at the top-k and top-p boundaries included),
sampled tokens distributed as softmax over that support (chi-square), never outside it, and log-probs of the
temperature-scaled distribution before truncation."""
import pytest
import torch
from transformers.generation.logits_process import (LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper,
                                                    TopPLogitsWarper)

from vr1fast.rollout.sampling import filter_logits, sample

SETTINGS = [(1.0, 0, 1.0), (0.7, 0, 0.9), (1.0, 5, 1.0), (1.3, 4, 0.5), (1.0, 50, 0.95), (0.5, 3, 0.3),
            (1.0, 0, 0.25), (2.0, 1, 0.95)]


def hf_filtered(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """HF generate's warpers in the order ``_get_logits_processor`` builds them (each only when active)."""
    warpers = LogitsProcessorList()
    if temperature != 1.0:
        warpers.append(TemperatureLogitsWarper(temperature))
    if top_k != 0:
        warpers.append(TopKLogitsWarper(top_k=top_k, min_tokens_to_keep=1))
    if top_p < 1.0:
        warpers.append(TopPLogitsWarper(top_p=top_p, min_tokens_to_keep=1))
    return warpers(None, logits.float())


def tied_logits() -> torch.Tensor:
    """Rows whose top-k / top-p boundaries fall inside runs of equal logits, plus random integer rows (many ties)."""
    g = torch.Generator().manual_seed(0)
    hand = torch.tensor([[0.0] * 8,                              # uniform: top-p 0.5 cuts exactly at cum = 0.5
                         [2.0, 2.0, 2.0, 1.0, 1.0, 1.0, 0.0, 0.0],  # top-k 2 and 4 end inside a tie
                         [5.0, 5.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]])
    ints = torch.randint(-3, 4, (200, 8), generator=g).float()
    return torch.cat([hand, ints])


@pytest.mark.parametrize("temperature,top_k,top_p", SETTINGS + [(1.0, 2, 0.5), (1.0, 4, 0.75), (1.0, 0, 0.5)])
def test_support_and_values_equal_hf(temperature, top_k, top_p):
    g = torch.Generator().manual_seed(1)
    for logits in (tied_logits(), torch.randn(300, 37, generator=g) * 3):
        ours = filter_logits(logits, temperature, top_k, top_p)
        theirs = hf_filtered(logits, temperature, top_k, top_p)
        assert torch.equal(torch.isfinite(ours), torch.isfinite(theirs))
        assert torch.equal(ours[torch.isfinite(ours)], theirs[torch.isfinite(theirs)])


def test_boundaries_by_hand():
    uniform = torch.zeros(1, 8)
    assert torch.isfinite(filter_logits(uniform, top_p=0.5)).sum() == 4      # cum ≤ 0.5 dropped: 4 of 8 kept
    assert torch.isfinite(filter_logits(uniform, top_p=0.51)).sum() == 5
    tied = torch.tensor([[2.0, 2.0, 2.0, 1.0, 1.0, 1.0, 0.0, 0.0]])
    assert torch.isfinite(filter_logits(tied, top_k=2)).tolist() == [[True] * 3 + [False] * 5]  # ties at k-th kept
    one = torch.tensor([[0.0, 10.0, 0.0]])
    assert torch.isfinite(filter_logits(one, top_p=1e-6)).tolist() == [[False, True, False]]   # the top always stays


def chi_square_pvalue(tokens: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson's chi-square p-value of token counts against ``probs`` over its support."""
    support = probs > 0
    counts = torch.bincount(tokens, minlength=probs.numel()).double()
    expected = probs.double() * tokens.numel()
    stat = ((counts - expected)[support] ** 2 / expected[support]).sum()
    dof = int(support.sum()) - 1
    return float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64), stat / 2))


@pytest.mark.parametrize("temperature,top_k,top_p", [(0.8, 7, 0.9), (1.0, 0, 0.95), (1.5, 4, 1.0)])
def test_sampled_tokens_follow_the_filtered_distribution(temperature, top_k, top_p):
    # 60,000 draws over 12 tokens; a p-value < 1e-3 fails (the correct sampler: 0.68, 0.54, 0.52). Checked when this
    # test was written, with wrong samplers: ignoring the temperature gives p = 0 (where T != 1); a top-p boundary
    # one token too far up gives p = 0, one token too far down ~1200 draws outside the support (and p < 1e-5);
    # inverse-CDF sampling over the masked but not renormalised probabilities ~3000 draws outside (p < 1e-28).
    logits = torch.randn(12, generator=torch.Generator().manual_seed(7)) * 2
    probs = hf_filtered(logits[None], temperature, top_k, top_p).softmax(-1)[0]
    n = 60_000
    tokens, _ = sample(logits.expand(n, -1), torch.Generator().manual_seed(11), temperature=temperature,
                       top_k=top_k, top_p=top_p)
    assert (probs[tokens] > 0).all(), "a token outside the top-k/top-p support was sampled"
    assert chi_square_pvalue(tokens, probs) > 1e-3


@pytest.mark.parametrize("temperature,top_k,top_p", SETTINGS)
def test_never_outside_support_and_logprobs_before_truncation(temperature, top_k, top_p):
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(500, 50, generator=g, dtype=torch.float64) * 4
    tokens, logprobs = sample(logits, torch.Generator().manual_seed(4), temperature=temperature, top_k=top_k,
                              top_p=top_p)
    allowed = torch.isfinite(hf_filtered(logits, temperature, top_k, top_p))
    assert allowed.gather(1, tokens[:, None]).all()
    assert logprobs.dtype == torch.float64
    want = torch.log_softmax(logits / temperature, -1).gather(1, tokens[:, None])[:, 0]
    torch.testing.assert_close(logprobs, want, rtol=0, atol=1e-12)
    if top_k or top_p < 1:  # the truncated distribution would give larger log-probs: they are not those
        truncated = torch.log_softmax(filter_logits(logits, temperature, top_k, top_p), -1)
        assert (truncated.gather(1, tokens[:, None])[:, 0] > logprobs + 1e-9).all()


def test_greedy_seeds_and_low_precision():
    g = torch.Generator().manual_seed(5)
    logits = (torch.randn(64, 300, generator=g) * 3).bfloat16()
    tokens, logprobs = sample(logits, greedy=True, temperature=0.7)
    assert torch.equal(tokens, logits.float().argmax(-1))
    assert logprobs.dtype == torch.float32
    want = torch.log_softmax(logits.double() / 0.7, -1).gather(1, tokens[:, None])[:, 0]
    torch.testing.assert_close(logprobs.double(), want, rtol=0, atol=1e-5)
    draws = [sample(logits, torch.Generator().manual_seed(s), top_p=0.95)[0] for s in (1, 1, 2)]
    assert torch.equal(draws[0], draws[1]) and not torch.equal(draws[0], draws[2])


def test_bad_settings_name_themselves():
    logits = torch.zeros(2, 5)
    for kwargs, name in ((dict(temperature=0.0), "temperature"), (dict(top_k=-1), "top_k"),
                         (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p")):
        with pytest.raises(ValueError, match=name):
            sample(logits, **kwargs)
    with pytest.raises(ValueError, match=r"\[S, V\]"):
        sample(torch.zeros(5))


@pytest.mark.gpu
def test_no_host_sync_on_cuda():
    logits = torch.randn(96, 152064, device="cuda")
    gen = torch.Generator("cuda").manual_seed(0)
    torch.cuda.set_sync_debug_mode("error")
    try:
        sample(logits, gen, temperature=1.0, top_k=50, top_p=0.95)
        sample(logits, gen, greedy=True)
    finally:
        torch.cuda.set_sync_debug_mode("default")
