"""Prompts shared by the rollout engines' tests: a real mixed batch of the synthetic set (``batch`` uses each test
module's own ``model_tok`` fixture for the tokenizer)."""
import pytest

from vr1fast.data.dataset import load_records
from vr1fast.data.synthetic import generate_synthetic


@pytest.fixture(scope="module")
def picks(tmp_path_factory):
    samples = load_records(generate_synthetic(tmp_path_factory.mktemp("syn"), n=8, seed=0).rl_json)
    return [(samples[0], 8), (samples[6], 0), (samples[3], 4)]  # 8-frame video, image, 4-frame video


@pytest.fixture(scope="module")
def batch(model_tok, picks):
    from media import prompt_inputs  # here, not at the top: the GPU image has no PyAV, and test_sampling runs there

    return prompt_inputs(model_tok[1], picks)
