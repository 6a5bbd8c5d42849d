"""Qwen2.5-VL facts in one place: the vision patching (patch 14, temporal patch 2, 2×2 merge: every resized side a
multiple of 28), CLIP normalisation, the ``mm_token_type_ids`` values and media pad tokens, and the model shapes
vr1fast builds (the tiny random model of the tests and the demo; the 7B shape of the benchmarks). A leaf module:
it imports nothing, so the config, the data pipeline and the model code can all read it.
"""
from __future__ import annotations

PATCH_SIZE = 14
TEMPORAL_PATCH_SIZE = 2
MERGE_SIZE = 2
IMAGE_FACTOR = PATCH_SIZE * MERGE_SIZE  # 28: every resized side is a multiple of this
PATCH_DIM = 3 * TEMPORAL_PATCH_SIZE * PATCH_SIZE * PATCH_SIZE  # 1176
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

TEXT, IMAGE, VIDEO = 0, 1, 2  # mm_token_type_ids values
VIDEO_PAD, IMAGE_PAD = "<|video_pad|>", "<|image_pad|>"

# The tiny random Qwen2.5-VL (model.load.tiny_model): 0.3M parameters, the real architecture.
TINY_TEXT = dict(hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=32768, rms_norm_eps=1e-6,
                 rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]})
TINY_VISION = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, patch_size=14,
                   temporal_patch_size=2, spatial_merge_size=2, window_size=112, fullatt_block_indexes=[1],
                   tokens_per_second=2, in_channels=3)

# Qwen2.5-VL-7B's shape (benchmarks build it with random weights).
TEXT_7B = dict(hidden_size=3584, intermediate_size=18944, num_attention_heads=28, num_key_value_heads=4,
               vocab_size=152064, max_position_embeddings=128000, rms_norm_eps=1e-6,
               rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]})
VISION_7B = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584,
                 patch_size=14, temporal_patch_size=2, spatial_merge_size=2, window_size=112,
                 fullatt_block_indexes=[7, 15, 23, 31], tokens_per_second=2, in_channels=3)
