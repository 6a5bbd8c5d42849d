"""Fixtures the model tests share: the synthetic records and three mixed prompts (each test module defines its own
``model_tok``: the tiny model in the mode it needs, and its tokenizer)."""
import pytest

from media import prompt_inputs
from vr1fast.data.dataset import load_records
from vr1fast.data.synthetic import generate_synthetic


@pytest.fixture(scope="module")
def samples(tmp_path_factory):
    return load_records(generate_synthetic(tmp_path_factory.mktemp("syn"), n=8, seed=0).rl_json)


@pytest.fixture(scope="module")
def mixed(model_tok, samples):
    """Three prompts of different lengths: an 8-frame video, an image, a 4-frame video."""
    return prompt_inputs(model_tok[1], [(samples[0], 8), (samples[6], 0), (samples[3], 4)])
