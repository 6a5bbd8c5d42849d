"""GPU tests: every test starts with the CUDA caching allocator's free blocks filled with NaN, so an output element
a kernel leaves unwritten (or a padding a GEMM reads) shows up as NaN instead of passing on stale values."""
import pytest
import torch

NAN_BLOCKS = (2**28, 2**26, 2**24, 2**22, 2**20, 2**16)  # fp32 elements: large- and small-pool blocks


@pytest.fixture(autouse=True)
def nan_filled_free_memory():
    blocks = [torch.full((n,), float("nan"), device="cuda") for n in NAN_BLOCKS]
    del blocks  # back to the allocator's pool: later allocations reuse these NaN-filled segments
    yield
    torch.cuda.empty_cache()
