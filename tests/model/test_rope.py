"""Video-R1's (transformers 4.x) M-RoPE positions bound on the tiny Qwen2.5-VL (merge 2, tokens_per_second 2).

Expected positions are written out by hand from the 4.x rule: text counts on from the running start s; a vision
token (g, i, j) sits at (s + ⌊g·spg·2⌋, s + i, s + j), images with spg = 0; after an item s = its max + 1.
"""
import copy

import pytest
import torch
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLModel

from media import conversation
from vr1fast.data.processor import build_prompt_batch
from vr1fast.kernels.reference import selective_log_softmax
from vr1fast.model.forward import completion_hidden, completion_logprobs_reference
from vr1fast.model.load import load_model, reference_model, tiny_model
from vr1fast.model.rope import rope_positions_mode, use_rope_positions, videor1_rope_index
from vr1fast.model.tokenizer import TEXT_VOCAB_SIZE

# Row 0: 2 text, video grid (3,4,4) at spg 1.0 (3 groups of 2x2), 2 text, image grid (1,2,4) (1x2), 2 text.
# Row 1: 1 pad, 1 text, video grid (4,2,8) at spg 2.0 (4 groups of 1x4), 2 text.
TYPES = [[0, 0] + [2] * 12 + [0, 0] + [1] * 2 + [0, 0],
         [0, 0] + [2] * 16 + [0, 0]]
MASK = [[1] * 20, [0] + [1] * 19]
EXPECTED = [  # [axis][row] ; padding is 1 as in transformers 4.x
    [[0, 1, 2, 2, 2, 2, 4, 4, 4, 4, 6, 6, 6, 6, 7, 8, 9, 9, 11, 12],
     [1, 0, 1, 1, 1, 1, 5, 5, 5, 5, 9, 9, 9, 9, 13, 13, 13, 13, 14, 15]],
    [[0, 1, 2, 2, 3, 3, 2, 2, 3, 3, 2, 2, 3, 3, 7, 8, 9, 9, 11, 12],
     [1, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 14, 15]],
    [[0, 1, 2, 3, 2, 3, 2, 3, 2, 3, 2, 3, 2, 3, 7, 8, 9, 10, 11, 12],
     [1, 0, 1, 2, 3, 4, 1, 2, 3, 4, 1, 2, 3, 4, 1, 2, 3, 4, 14, 15]],
]
EXPECTED_DELTAS = [[13 - 20], [16 - 19]]  # max + 1 - real tokens
# transformers 5 resumes after a vision item at s + max(gh, gw): row 0 text 4,5 / image at 6 / text 8,9.
EXPECTED_5X_ROW0_T = [0, 1, 2, 2, 2, 2, 4, 4, 4, 4, 6, 6, 6, 6, 4, 5, 6, 6, 8, 9]


@pytest.fixture(scope="module")
def model_tok():
    model, tok = tiny_model(0, init_std=0.1)
    return model.eval(), tok


def hand_batch():
    types = torch.tensor(TYPES)
    return dict(input_ids=torch.where(types > 0, 7, 11), mm_token_type_ids=types,
                image_grid_thw=torch.tensor([[1, 2, 4]]), video_grid_thw=torch.tensor([[3, 4, 4], [4, 2, 8]]),
                second_per_grid_ts=torch.tensor([1.0, 2.0]), attention_mask=torch.tensor(MASK))


def test_hand_table_left_padded_batch(model_tok):
    inner = model_tok[0].model
    pos, deltas = inner.get_rope_index(**hand_batch())
    assert pos.dtype == deltas.dtype == torch.long and deltas.shape == (2, 1)
    assert pos.tolist() == EXPECTED and deltas.tolist() == EXPECTED_DELTAS
    pos5, _ = Qwen2_5_VLModel.get_rope_index(inner, **hand_batch())
    assert pos5[0, 0].tolist() == EXPECTED_5X_ROW0_T


def test_fractional_seconds_truncate_and_none_means_one(model_tok):
    inner = model_tok[0].model
    batch = dict(input_ids=torch.full((1, 7), 5), mm_token_type_ids=torch.tensor([[0, 2, 2, 2, 2, 0, 0]]),
                 video_grid_thw=torch.tensor([[4, 2, 2]]), second_per_grid_ts=torch.tensor([0.75]))
    pos, deltas = videor1_rope_index(inner, **batch)  # t offsets ⌊g·0.75·2⌋ = 0, 1, 3, 4
    assert pos[0, 0].tolist() == [0, 1, 2, 4, 5, 6, 7] and pos[1, 0].tolist() == [0, 1, 1, 1, 1, 6, 7]
    assert deltas.tolist() == [[8 - 7]]
    batch["second_per_grid_ts"] = None  # 1.0: offsets 0, 2, 4, 6
    pos, _ = videor1_rope_index(inner, **batch)
    assert pos[0, 0].tolist() == [0, 1, 3, 5, 7, 8, 9] and pos[2, 0].tolist() == [0, 1, 1, 1, 1, 8, 9]


def test_bad_grids_raise(model_tok):
    inner = model_tok[0].model
    batch = hand_batch()
    with pytest.raises(ValueError, match="row 1 has more video tokens"):
        inner.get_rope_index(**dict(batch, video_grid_thw=batch["video_grid_thw"][:1],
                                    second_per_grid_ts=batch["second_per_grid_ts"][:1]))
    with pytest.raises(ValueError, match=r"row 0: grid \[1, 4, 4\] needs 4 tokens but its run has 2"):
        inner.get_rope_index(**dict(batch, image_grid_thw=torch.tensor([[1, 4, 4]])))
    with pytest.raises(ValueError, match="unknown mode 'v4'"):
        use_rope_positions(model_tok[0], "v4")


def test_modes_copy_and_save(model_tok, tmp_path):
    model, tok = model_tok
    assert rope_positions_mode(model) == "videor1"  # tiny_model's default
    installed = Qwen2_5_VLModel.get_rope_index(model.model, **hand_batch())
    other = copy.deepcopy(model)
    assert other.model.get_rope_index.__self__ is other.model and rope_positions_mode(other) == "videor1"
    use_rope_positions(other, "transformers")
    for got, want in zip(other.model.get_rope_index(**hand_batch()), installed):
        assert torch.equal(got, want)
    assert rope_positions_mode(model) == "videor1"  # the original keeps its binding
    assert rope_positions_mode(reference_model(other, beta=0.04)) == "transformers"
    other.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    assert set(other.state_dict()) == set(model.state_dict())
    assert rope_positions_mode(load_model(tmp_path)[0]) == "videor1"
    plain = load_model(tmp_path, rope_positions="transformers")[0]
    assert rope_positions_mode(plain) == "transformers"
    assert rope_positions_mode(reference_model(tmp_path, beta=0.04, rope_positions="transformers")) == "transformers"


@pytest.fixture(scope="module")
def media_batch(model_tok):
    """Left-padded [video 8 frames 56x56 → grid (4,4,4), image 56x84 → grid (1,4,6)] prompts."""
    tok = model_tok[1]
    g = torch.Generator().manual_seed(0)
    video = torch.randint(0, 256, (8, 56, 56, 3), generator=g, dtype=torch.uint8)
    image = torch.randint(0, 256, (56, 84, 3), generator=g, dtype=torch.uint8)
    convs = [conversation("What moves first?", "video"),
             conversation("Count the red squares in the picture, please, and say how many.", "image")]
    inputs = build_prompt_batch(tok, convs, [video, image]).model_inputs()
    assert inputs["attention_mask"][0, 0] == 0 and inputs["video_grid_thw"].tolist() == [[4, 4, 4]]
    return inputs


def test_generate_equals_teacher_forced_argmax(model_tok, media_batch):
    model, tok = model_tok
    prompt_len = media_batch["input_ids"].shape[1]
    with torch.no_grad():
        out = model.generate(**media_batch, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
        # generate took its positions from the bound method: video 16 tokens resume at s + 7 (5.x: s + 2),
        # image 6 tokens at s + 3, so the deltas are 7 - 16 and 3 - 6
        assert model.model.rope_deltas.tolist() == [[-9], [-3]]
        completion = out[:, prompt_len:]
        full = dict(media_batch, input_ids=out,
                    attention_mask=torch.cat([media_batch["attention_mask"], torch.ones_like(completion)], 1),
                    mm_token_type_ids=torch.cat([media_batch["mm_token_type_ids"], torch.zeros_like(completion)], 1))
        logits = model(**full, use_cache=False).logits[:, prompt_len - 1: -1]
    eos = torch.tensor(model.generation_config.eos_token_id)
    for row in range(2):
        ends = torch.isin(completion[row], eos).nonzero()
        n = int(ends[0]) + 1 if len(ends) else completion.shape[1]
        assert n >= 3 and torch.equal(logits[row, :n].argmax(-1), completion[row, :n])


def test_decode_position_is_real_length_plus_delta(model_tok, media_batch):
    """One cached decode step at (real tokens) + delta gives the full forward's logits."""
    model, _ = model_tok
    inner = model.model
    _, deltas = inner.get_rope_index(**{k: v for k, v in media_batch.items() if "pixel" not in k})
    with torch.no_grad():
        prefill = model(**media_batch, use_cache=True)
        nxt = prefill.logits[:, -1].argmax(-1, keepdim=True)
        mask = torch.cat([media_batch["attention_mask"], torch.ones_like(nxt)], 1)
        pos = (media_batch["attention_mask"].sum(1, keepdim=True) + deltas)[None].expand(3, -1, -1)
        step = model(input_ids=nxt, attention_mask=mask, past_key_values=prefill.past_key_values, position_ids=pos)
        full = dict(media_batch, input_ids=torch.cat([media_batch["input_ids"], nxt], 1), attention_mask=mask,
                    mm_token_type_ids=torch.cat([media_batch["mm_token_type_ids"], torch.zeros_like(nxt)], 1))
        ref = model(**full, use_cache=False).logits[:, -1]
    torch.testing.assert_close(step.logits[:, -1], ref, atol=2e-5, rtol=0)


@pytest.mark.parametrize("share", [True, False], ids=["prompt_once", "repeated"])
def test_completion_hidden_equals_full_logits_reference(model_tok, media_batch, share):
    model, tok = model_tok
    G, L = 2, 6
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, TEXT_VOCAB_SIZE, (2 * G, L), generator=g)
    mask = (torch.arange(L)[None] < torch.tensor([[L], [3], [5], [L]])).long()
    ids = ids.masked_fill(mask == 0, tok.pad_token_id)
    with torch.no_grad():
        hidden, weight = completion_hidden(model, media_batch, ids, mask, num_samples=G, share_prompt=share)
        fast = selective_log_softmax(hidden @ weight.T, ids[mask.bool()])
        ref = completion_logprobs_reference(model, media_batch, ids, mask, num_samples=G)
        other = copy.deepcopy(model)
        use_rope_positions(other, "transformers")
        ref5 = completion_logprobs_reference(other, media_batch, ids, mask, num_samples=G)
    m = mask.bool()
    torch.testing.assert_close(fast, ref[m], atol=2e-5, rtol=0)
    assert (ref5[:G][m[:G]] - ref[:G][m[:G]]).abs().max() > 1e-2  # the video rows see other positions
    torch.testing.assert_close(ref5[G:][m[G:]], ref[G:][m[G:]], atol=2e-5, rtol=0)  # image rows: same rule
