import os
import sys

# Triton kernels run in the interpreter on CPU tensors; the knob is read lazily, so setting it before any
# kernel module is imported is enough.
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("DS_ACCELERATOR", "cpu")

# tests/ on sys.path so test modules share helpers (``from media import ...``).
sys.path.insert(0, os.path.dirname(__file__))

import pytest  # noqa: E402
import torch  # noqa: E402

# Under pytest-xdist each worker gets one intra-op thread: with 2 workers on 2 cores, torch's default threads
# oversubscribe the machine (a small matmul measured 10x slower at load ~6).
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    """``@pytest.mark.gpu`` tests need a CUDA device and compiled Triton kernels: they run only with
    ``TRITON_INTERPRET=0`` on a GPU machine (``TRITON_INTERPRET=0 pytest -m gpu``, as scripts/gpu_validate.sh runs
    them) and are skipped elsewhere, saying why."""
    if torch.cuda.is_available() and os.environ["TRITON_INTERPRET"] == "0":
        return
    reason = "needs TRITON_INTERPRET=0 (compiled kernels)" if torch.cuda.is_available() else "needs a CUDA device"
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(scope="session")
def synthetic(tmp_path_factory):
    """The synthetic set (8 records, seed 0) the training-loop tests share."""
    from vr1fast.data.synthetic import generate_synthetic

    out = tmp_path_factory.mktemp("synthetic")
    generate_synthetic(out, n=8, seed=0)
    return out
