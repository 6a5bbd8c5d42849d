"""vision.BatchedVisionAttention: one SDPA call per vision layer, equal to HF's per-window loop (the reference: HF's own
``Qwen2_5_VLVisionAttention``, restored with ``use_batched_vision_attention(..., enable=False)``) in outputs, input
gradients and weight gradients; applied by every builder of model.load."""
import copy
import pickle

import pytest
import torch
from torch.nn import functional as F
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLVisionAttention

from vr1fast.config import ModelConfig
from vr1fast.model.load import (build_model, build_models, load_model, reference_model, save_tiny, set_checkpointing,
                                tiny_model)
from vr1fast.model.vision import (BatchedVisionAttention, pack_rows, packed_rows, use_batched_vision_attention,
                                  uses_batched_vision_attention)

# grid_thw rows (t, h, w in patches). "mixed": merged grids 5x7 and 3x5 (odd), windows of 4..64 patches, slices of
# 24..140 patches, so rows hold several sequences (block mask) in both layers; "apart": 64 and 36 tokens that never
# share a row (key-padding mask); "video": four equal slices (full layer: a plain view, no mask).
MEDIA = {"mixed": [[1, 10, 14], [2, 12, 8], [1, 4, 6], [3, 6, 10]], "apart": [[1, 8, 8], [1, 6, 6]],
         "video": [[4, 12, 16]]}
INIT_STD = 0.3  # peaked attention: a token that attends outside its window moves the output by ~10%
FLOOR = {torch.float32: 1e-6, torch.bfloat16: 1e-2}  # absolute floor, relative to the reference's largest entry


def towers(dtype):
    """(HF's vision tower, the batched one) with the same weights, in ``dtype``."""
    model, _ = tiny_model(0, dtype=dtype, init_std=INIT_STD)
    ours = model.model.visual
    return use_batched_vision_attention(copy.deepcopy(ours), enable=False), ours


def media(name, dtype, seed=0):
    grid = torch.tensor(MEDIA[name])
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randn(int(grid.prod(1).sum()), 1176, generator=g, dtype=torch.float64)
    return pixels.to(dtype), grid


def run(tower, pixels, grid, seed=1):
    """Merged output, d(pixels) and d(every parameter) of ``sum(out · w)`` for a fixed random w."""
    tower.zero_grad(set_to_none=True)
    x = pixels.clone().requires_grad_(True)
    out = tower(x, grid_thw=grid).pooler_output
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(out.dtype)
    (out * w).sum().backward()
    return {"out": out.detach(), "d_pixels": x.grad, **{n: p.grad for n, p in tower.named_parameters()}}


def max_err(a, b):
    return (a.double() - b.double()).abs().max().item()


@pytest.fixture(scope="module")
def float64_runs():
    hf, ours = towers(torch.float64)
    return {name: (run(hf, *media(name, torch.float64)), run(ours, *media(name, torch.float64))) for name in MEDIA}


@pytest.mark.parametrize("name", MEDIA)
def test_float64_equals_hf_loop(float64_runs, name):
    ref, got = float64_runs[name]
    assert ref.keys() == got.keys() and len(ref) > 10
    for key in ref:
        assert got[key] is not None and ref[key].abs().max() > 0, key
        assert max_err(got[key], ref[key]) <= 1e-12 * ref[key].abs().max().item(), key


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", MEDIA)
def test_low_precision_within_twice_hf_error(float64_runs, name, dtype):
    """Error vs HF's loop in float64 at most twice the error of HF's loop in the same dtype (DESIGN rule 3)."""
    ref = float64_runs[name][0]
    hf, ours = towers(dtype)
    pixels, grid = media(name, dtype)
    hf_low, ours_low = run(hf, pixels, grid), run(ours, pixels, grid)
    for key in ref:
        bar = 2 * max_err(hf_low[key], ref[key]) + FLOOR[dtype] * ref[key].abs().max().item()
        assert max_err(ours_low[key], ref[key]) <= bar, key


def attention_io(tower, pixels, grid):
    """Per vision layer: (cu_seqlens it was given, its output)."""
    seen = {}
    hooks = [blk.attn.register_forward_hook(
        lambda mod, args, kwargs, out, i=i: seen.__setitem__(i, (kwargs["cu_seqlens"], out.detach())),
        with_kwargs=True) for i, blk in enumerate(tower.blocks)]
    try:
        tower(pixels, grid_thw=grid)
    finally:
        for h in hooks:
            h.remove()
    return seen


def test_each_layer_equals_hf_window_and_full():
    hf, ours = towers(torch.float64)
    pixels, grid = media("mixed", torch.float64)
    ref, got = attention_io(hf, pixels, grid), attention_io(ours, pixels, grid)
    full = ours.config.fullatt_block_indexes
    assert 0 not in full and 1 in full  # block 0 attends in windows, block 1 per temporal slice
    assert ref[0][0].numel() > ref[1][0].numel() > 2  # more windows than slices, several of each
    for i in ref:
        assert torch.equal(ref[i][0], got[i][0])
        assert max_err(got[i][1], ref[i][1]) <= 1e-12 * ref[i][1].abs().max().item(), i


def test_each_media_set_takes_its_mask_path():
    _, ours = towers(torch.float64)
    kinds = {}
    for name in MEDIA:
        pixels, grid = media(name, torch.float64)
        io = attention_io(ours, pixels, grid)
        layouts = [packed_rows(cu, pixels.shape[0], pixels.device) for cu, _ in io.values()]
        kinds[name] = [None if lay.mask is None else "block" if lay.mask.shape[2] > 1 else "keys" for lay in layouts]
    assert kinds == {"mixed": ["block", "block"],  # rows of several sequences: [R, 1, L, L]
                     "apart": ["keys", "keys"],     # one sequence per row, padded: [R, 1, 1, L]
                     "video": ["block", None]}      # equal slices in the full layer: a view, no mask


def count_attention_calls(tower, pixels, grid, monkeypatch):
    """SDPA calls made inside each vision layer's attention."""
    current, calls = [None], {}
    real = F.scaled_dot_product_attention

    def counting(*args, **kwargs):
        calls[current[0]] = calls.get(current[0], 0) + 1
        return real(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", counting)
    hooks = [blk.attn.register_forward_pre_hook(lambda mod, args, i=i: current.__setitem__(0, i))
             for i, blk in enumerate(tower.blocks)]
    try:
        tower(pixels, grid_thw=grid)
    finally:
        for h in hooks:
            h.remove()
    return calls


def test_one_attention_call_per_layer(monkeypatch):
    hf, ours = towers(torch.float32)
    pixels, grid = media("mixed", torch.float32)
    sequences = {i: cu.numel() - 1 for i, (cu, _) in attention_io(hf, pixels, grid).items()}
    assert count_attention_calls(hf, pixels, grid, monkeypatch) == sequences  # the counter sees HF's loop
    assert count_attention_calls(ours, pixels, grid, monkeypatch) == {i: 1 for i in sequences}


def test_gradient_checkpointing_and_train_mode_equal_hf():
    model, _ = tiny_model(0, dtype=torch.float64, init_std=INIT_STD)
    hf = use_batched_vision_attention(copy.deepcopy(model.model.visual), enable=False)
    set_checkpointing(model, True)
    model.train()
    assert model.model.visual.gradient_checkpointing
    pixels, grid = media("mixed", torch.float64)
    ref, got = run(hf, pixels, grid), run(model.model.visual, pixels, grid)
    for key in ref:
        assert max_err(got[key], ref[key]) <= 1e-12 * ref[key].abs().max().item(), key


def test_empty_windows_and_layer_call_equal_hf():
    """cu_seqlens with empty sequences (also the last; HF's loop fails on them, and its tower never makes them) on
    one layer: the batched forward equals HF's on the same boundaries without the empty sequences."""
    _, ours = towers(torch.float64)
    layer = ours.blocks[0].attn
    g = torch.Generator().manual_seed(3)
    n, head_dim = 23, layer.head_dim
    hidden = torch.randn(n, layer.dim, generator=g, dtype=torch.float64)
    cos, sin = (torch.randn(n, head_dim, generator=g, dtype=torch.float64) for _ in range(2))
    cu = torch.tensor([0, 5, 5, 12, 13, 20, 23, 23], dtype=torch.int32)
    ref = Qwen2_5_VLVisionAttention.forward(layer, hidden, cu_seqlens=cu.unique_consecutive(),
                                            position_embeddings=(cos, sin))
    got = layer(hidden, cu_seqlens=cu, position_embeddings=(cos, sin))
    assert isinstance(layer, BatchedVisionAttention)
    assert max_err(got, ref) <= 1e-12 * ref.abs().max().item()


def test_layout_cached_per_tensor_and_rebuilt_after_in_place_change():
    cu = torch.tensor([0, 3, 7, 8], dtype=torch.int32)
    first = packed_rows(cu, 8, torch.device("cpu"))
    assert packed_rows(cu, 8, torch.device("cpu")) is first
    assert packed_rows(cu.clone(), 8, torch.device("cpu")) is not first
    cu[1] = 4
    again = packed_rows(cu, 8, torch.device("cpu"))
    assert again is not first and not torch.equal(again.scatter, first.scatter)


@pytest.mark.parametrize("cu, n, match", [
    ([0, 3, 7], 8, "rise from 0 to 8"), ([1, 3, 8], 8, "rise from 0 to 8"), ([0, 5, 3, 8], 8, "smallest step"),
    ([[0, 8]], 8, "1-D"), ([0], 0, "at least 2")])
def test_bad_cu_seqlens_is_one_clear_error(cu, n, match):
    with pytest.raises(ValueError, match=match):
        packed_rows(torch.tensor(cu), n, torch.device("cpu"))


def test_pack_rows_places_every_sequence_whole_without_overlap():
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        lengths = torch.randint(0, 40, (int(torch.randint(1, 30, (1,), generator=g)),), generator=g).tolist()
        row_of, start_of, rows, width = pack_rows(lengths)
        assert width == max(max(lengths), 1) and rows <= max(sum(n > 0 for n in lengths), 1)
        taken = set()
        for r, s, n in zip(row_of, start_of, lengths):
            slots = {r * width + s + j for j in range(n)}
            assert 0 <= r < rows and s + n <= width and not taken & slots
            taken |= slots
    video_windows = [64, 64, 64, 16, 64, 64, 64, 16, 32, 32, 32, 8] * 8  # 16 frames of 280x364
    assert pack_rows(video_windows)[2:] == (65, 64)  # 4160 patches fill 65 rows exactly
    assert pack_rows([520] * 8 + [5120])[2:] == (2, 5120)  # a big image and a video's slices: 2 rows, not 9


def test_flash_attention_config_defers_to_hf_forward(monkeypatch):
    _, ours = towers(torch.float32)
    seen = []
    monkeypatch.setattr(Qwen2_5_VLVisionAttention, "forward", lambda self, *a, **k: seen.append(self) or a[0])
    pixels, grid = media("apart", torch.float32)
    ours.config._attn_implementation = "flash_attention_2"
    ours(pixels, grid_thw=grid)
    assert seen == [blk.attn for blk in ours.blocks]


def test_deepcopy_and_pickle_stay_batched():
    model, _ = tiny_model(0)
    tower = pickle.loads(pickle.dumps(model.model.visual))
    assert uses_batched_vision_attention(tower) and uses_batched_vision_attention(copy.deepcopy(model))
    assert not uses_batched_vision_attention(use_batched_vision_attention(copy.deepcopy(model), enable=False))
    pixels, grid = media("apart", torch.float32)
    assert torch.equal(tower(pixels, grid_thw=grid).pooler_output, model.model.visual(pixels, grid_thw=grid).pooler_output)
    with pytest.raises(ValueError, match="no Qwen2.5-VL vision attention"):
        use_batched_vision_attention(torch.nn.Linear(2, 2))


def test_every_builder_applies_it(tmp_path):
    saved = save_tiny(tmp_path / "tiny")
    tiny_cfg = ModelConfig(dtype="float32", attn_implementation="sdpa")
    path_cfg = ModelConfig(path=str(saved), dtype="float32", attn_implementation="sdpa")
    policy, ref, _ = build_models(tiny_cfg, beta=0.04, dtype="float32", attn="sdpa")
    path_policy, path_ref, _ = build_models(path_cfg, beta=0.04, dtype="float32", attn="sdpa")
    models = {"tiny_model": tiny_model(0)[0], "load_model": load_model(saved, device="cpu")[0],
              "build_model tiny": build_model(tiny_cfg)[0], "build_model path": build_model(path_cfg)[0],
              "build_models policy": policy, "build_models reference": ref,
              "build_models path policy": path_policy, "build_models path reference": path_ref,
              "reference_model copy": reference_model(policy, beta=0.04),
              "reference_model path": reference_model(saved, beta=0.04, device="cpu")}
    assert {name: uses_batched_vision_attention(m) for name, m in models.items()} == {name: True for name in models}


def test_inference_mode_tensors_have_no_version_and_still_cache():
    """Under ``torch.inference_mode`` (rollouts, the reference forward) cu_seqlens has no version counter: the layout is
    still built once per tensor and the tower's output equals HF's."""
    hf, ours = towers(torch.float32)
    pixels, grid = media("mixed", torch.float32)
    with torch.inference_mode():
        cu = torch.tensor([0, 3, 7, 8], dtype=torch.int32)
        first = packed_rows(cu, 8, torch.device("cpu"))
        assert first.source_version == -1 and packed_rows(cu, 8, torch.device("cpu")) is first
        ref, got = hf(pixels, grid_thw=grid).pooler_output, ours(pixels, grid_thw=grid).pooler_output
    assert max_err(got, ref) <= 1e-5 * ref.abs().max().item()
