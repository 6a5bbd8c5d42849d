import numpy as np
import PIL.Image
import pytest
import torch
from transformers import Qwen2VLImageProcessorPil

from media import conversation, random_frames
from vr1fast.data.processor import build_prompt_batch, image_to_patches, video_to_patches
from vr1fast.model.load import tiny_model
from vr1fast.model.tokenizer import token_ids

MEAN = [0.48145466, 0.4578275, 0.40821073]
STD = [0.26862954, 0.26130258, 0.27577711]


@pytest.fixture(scope="module")
def model_and_tok():
    return tiny_model(0)


@pytest.fixture(scope="module")
def tok(model_and_tok):
    return model_and_tok[1]


@pytest.fixture(scope="module")
def model(model_and_tok):
    return model_and_tok[0].eval()


def test_video_layout_matches_closed_form_gather():
    t, h, w = 4, 56, 84
    frames = random_frames(t, h, w)
    pv, grid = video_to_patches(frames)
    gt, gh, gw = t // 2, h // 14, w // 14
    assert grid.tolist() == [gt, gh, gw] and pv.shape == (gt * gh * gw, 1176) and pv.dtype == torch.float32
    # every (row, col) from the closed form of docs/video-decoding.md §2, in float64
    r = np.arange(pv.shape[0])[:, None]
    k = np.arange(1176)[None, :]
    mw, mh, bw, bh, tt = r % 2, (r // 2) % 2, (r // 4) % (gw // 2), (r // (4 * (gw // 2))) % (gh // 2), r // (gh * gw)
    px, py, dt, c = k % 14, (k // 14) % 14, (k // 196) % 2, k // 392
    f = frames.numpy().astype(np.float64)
    src = f[2 * tt + dt, (2 * bh + mh) * 14 + py, (2 * bw + mw) * 14 + px, c]
    expected = (src / 255 - np.array(MEAN)[c]) / np.array(STD)[c]
    np.testing.assert_allclose(pv.numpy(), expected, rtol=0, atol=2e-6)


def test_video_layout_single_entries_by_loops():
    frames = random_frames(6, 28, 56, seed=3)
    pv, _ = video_to_patches(frames)
    # (temporal patch, merge block row, block col, mh, mw) → row; (c, dt, py, px) → col, counted by loops
    gh, gw = 2, 4
    for (t, bh, bw, mh, mw, c, dt, py, px) in [(0, 0, 0, 0, 0, 0, 0, 0, 0), (2, 0, 1, 1, 0, 2, 1, 13, 5),
                                               (1, 0, 0, 0, 1, 1, 0, 7, 13), (2, 0, 1, 1, 1, 2, 1, 13, 13)]:
        row = 0
        for _t in range(t):
            row += gh * gw
        row += (bh * (gw // 2) + bw) * 4 + mh * 2 + mw
        col = ((c * 2 + dt) * 14 + py) * 14 + px
        value = float(frames[2 * t + dt, (2 * bh + mh) * 14 + py, (2 * bw + mw) * 14 + px, c])
        assert abs(float(pv[row, col]) - (value / 255 - MEAN[c]) / STD[c]) < 2e-6


@pytest.mark.parametrize("h,w", [(84, 112), (28, 28), (140, 56)])
def test_image_equals_hf_pil_processor(h, w):
    image = random_frames(1, h, w, seed=h + w)[0]
    ours, grid = image_to_patches(image)
    proc = Qwen2VLImageProcessorPil()
    # HF's own resize keeps a size that is on the 28-grid and within its pixel bounds (min 56*56)
    for do_resize in (False, True) if h * w >= 56 * 56 else (False,):
        hf = proc(images=[PIL.Image.fromarray(image.numpy())], do_resize=do_resize, return_tensors="pt")
        assert torch.equal(hf["image_grid_thw"][0], grid)
        assert torch.equal(hf["pixel_values"], ours)  # bit-identical


def test_bad_frames_raise_clear_errors():
    with pytest.raises(ValueError, match="frame count.*T=3"):
        video_to_patches(random_frames(3, 28, 28))
    with pytest.raises(ValueError, match="multiples of 28.*H=30"):
        video_to_patches(random_frames(2, 30, 28))
    with pytest.raises(ValueError, match="uint8"):
        video_to_patches(random_frames(2, 28, 28).float())
    with pytest.raises(ValueError, match=r"image: expected uint8 \[H, W, 3\]"):
        image_to_patches(random_frames(1, 28, 28)[0, :, :, :2])
    with pytest.raises(ValueError, match="image: .*W=42"):
        image_to_patches(random_frames(1, 28, 42)[0])


def test_prompt_batch_expands_pads_and_left_pads(tok):
    video, image = random_frames(4, 56, 84, seed=1), random_frames(1, 28, 56, seed=2)[0]
    questions = ["What moves first?Options:\nA. red\nB. blue\n", "How many?"]
    batch = build_prompt_batch(tok, [conversation(questions[0], "video"), conversation(questions[1], "image")],
                               [video, image])
    ids = token_ids(tok)
    n_video, n_image = 2 * 4 * 6 // 4, 1 * 2 * 4 // 4
    # independent: string-level expansion as HF's processor does, then tokenise
    rows = []
    for q, kind, n in [(questions[0], "video", n_video), (questions[1], "image", n_image)]:
        text = tok.apply_chat_template(conversation(q, kind), tokenize=False, add_generation_prompt=True)
        pad = f"<|{kind}_pad|>"
        rows.append(tok(text.replace(pad, pad * n), add_special_tokens=False)["input_ids"])
    length = max(map(len, rows))
    assert batch.input_ids.shape == (2, length)
    for i, row in enumerate(rows):
        n_pad = length - len(row)
        assert batch.input_ids[i].tolist() == [ids.pad] * n_pad + row
        assert batch.attention_mask[i].tolist() == [0] * n_pad + [1] * len(row)
    assert len(rows[1]) < length  # the image prompt really is padded
    type_ids = batch.mm_token_type_ids
    assert torch.equal(type_ids == 2, batch.input_ids == ids.video)
    assert torch.equal(type_ids == 1, batch.input_ids == ids.image)
    assert int((type_ids == 2).sum()) == n_video and int((type_ids == 1).sum()) == n_image
    assert torch.equal(batch.pixel_values_videos, video_to_patches(video)[0])
    assert torch.equal(batch.pixel_values, image_to_patches(image)[0])
    assert batch.video_grid_thw.tolist() == [[2, 4, 6]] and batch.image_grid_thw.tolist() == [[1, 2, 4]]
    assert batch.second_per_grid_ts.tolist() == [1.0]
    assert batch.prompt_lengths.tolist() == [len(r) for r in rows]
    assert set(batch.model_inputs()) == {"input_ids", "attention_mask", "mm_token_type_ids", "pixel_values_videos",
                                         "video_grid_thw", "second_per_grid_ts", "pixel_values", "image_grid_thw"}


def test_prompt_batch_options_and_errors(tok):
    videos = [random_frames(2, 28, 28, seed=s) for s in range(2)]
    convs = [conversation("a", "video"), conversation("b", "video")]
    batch = build_prompt_batch(tok, convs, videos, second_per_grid_ts=[0.5, 2.0], pad_to=200)
    assert batch.second_per_grid_ts.tolist() == [0.5, 2.0] and batch.input_ids.shape[1] == 200
    assert batch.pixel_values is None and "pixel_values" not in batch.model_inputs()
    with pytest.raises(ValueError, match="one value per video"):
        build_prompt_batch(tok, convs, videos, second_per_grid_ts=[1.0])
    with pytest.raises(ValueError, match="prompt 1: media 0 is a image"):
        build_prompt_batch(tok, convs, [videos[0], videos[1][0]])
    with pytest.raises(ValueError, match="prompt 0: 2 media given but the text has 1"):
        build_prompt_batch(tok, convs, [videos, videos[1]])
    with pytest.raises(ValueError, match="prompt 1: the chat template has more media placeholders"):
        build_prompt_batch(tok, convs, [videos[0], None])
    with pytest.raises(ValueError, match="prompt 1: frames: .*T=3"):
        build_prompt_batch(tok, convs, [videos[0], random_frames(3, 28, 28)])
    with pytest.raises(ValueError, match="media_list has 1"):
        build_prompt_batch(tok, convs, videos[:1])


def test_tiny_model_accepts_left_padded_mixed_batch(tok, model):
    video, image = random_frames(4, 56, 56, seed=5), random_frames(1, 56, 28, seed=6)[0]
    convs = [conversation("What moves first?", "video"), conversation("Count the red squares, please.", "image")]
    batch = build_prompt_batch(tok, convs, [video, image])
    assert batch.attention_mask[0, 0] == 0  # the video prompt is the shorter one here: left-padded
    with torch.no_grad():
        logits = model(**batch.model_inputs()).logits
        # each prompt alone (no padding) gives the same logits on its real positions
        for row, (conv, media) in enumerate(zip(convs, [video, image])):
            alone = build_prompt_batch(tok, [conv], [media])
            ref = model(**alone.model_inputs()).logits[0]
            torch.testing.assert_close(logits[row, -ref.shape[0]:], ref, rtol=1e-4, atol=1e-5)
        # without mm_token_type_ids transformers 5 silently falls back to 1-D positions: different logits
        inputs = batch.model_inputs()
        inputs.pop("mm_token_type_ids")
        model.model.rope_deltas = None
        assert not torch.allclose(model(**inputs).logits, logits, atol=1e-4)
        out = model.generate(**batch.model_inputs(), max_new_tokens=4, do_sample=False,
                             pad_token_id=tok.pad_token_id)
    assert out.shape == (2, batch.input_ids.shape[1] + 4)
    assert torch.equal(out[:, :batch.input_ids.shape[1]], batch.input_ids)
