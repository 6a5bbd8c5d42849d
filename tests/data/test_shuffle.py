import itertools
from collections import Counter

import pytest
import torch

from media import conversation, random_frames
from vr1fast.data.processor import video_to_patches
from vr1fast.data.shuffle import build_shuffle_pair, pair_permutation, shuffle_frames
from vr1fast.model.load import tiny_model
from vr1fast.model.tokenizer import build_tiny_tokenizer


def gen(seed):
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def tok():
    return build_tiny_tokenizer()


@pytest.fixture(scope="module")
def rope_model(tok):
    """The tiny Qwen2.5-VL backbone: only its get_rope_index (merge 2, tokens_per_second 2) is used."""
    return tiny_model(0, tokenizer=tok)[0].model


def test_frame_shuffle_is_a_seeded_non_identity_permutation():
    frames = random_frames(8, 28, 28)
    shuffled, perm = shuffle_frames(frames, gen(1))
    assert sorted(perm.tolist()) == list(range(8)) and perm.tolist() != list(range(8))
    for i, j in enumerate(perm.tolist()):
        assert torch.equal(shuffled[i], frames[j])
    assert torch.equal(shuffle_frames(frames, gen(1))[1], perm)  # same seed, same permutation
    assert len({tuple(shuffle_frames(frames, gen(s))[1].tolist()) for s in range(20)}) > 15


def test_two_frames_never_identity_unless_allowed():
    frames = random_frames(2, 28, 28)
    g = gen(0)
    assert all(shuffle_frames(frames, g)[1].tolist() == [1, 0] for _ in range(200))
    # Video-R1's plain randperm: identity about half of the time for T = 2
    counts = Counter(tuple(shuffle_frames(frames, g, allow_identity=True)[1].tolist()) for _ in range(400))
    assert 150 < counts[(0, 1)] < 250


def test_redraw_is_uniform_over_non_identity_permutations():
    g = gen(7)
    counts = Counter(tuple(shuffle_frames(torch.arange(3), g)[1].tolist()) for _ in range(1500))
    expected = set(itertools.permutations(range(3))) - {(0, 1, 2)}
    assert set(counts) == expected
    assert all(240 < c < 360 for c in counts.values())  # 300 each; ±60 is > 4 sigma


def test_pair_shuffle_keeps_frame_pairs_intact():
    frames = random_frames(10, 28, 28, seed=4)
    shuffled, perm = shuffle_frames(frames, gen(2), mode="pair")
    assert perm.tolist() != list(range(10))
    originals = [frames[i] for i in range(10)]
    for g in range(5):  # by pixel content: slot pair g holds some original pair (2q, 2q+1) in order
        first = next(i for i, f in enumerate(originals) if torch.equal(f, shuffled[2 * g]))
        assert first % 2 == 0 and torch.equal(shuffled[2 * g + 1], frames[first + 1])
    q = pair_permutation(perm)
    assert q is not None and sorted(q.tolist()) == list(range(5)) and q.tolist() != list(range(5))
    assert pair_permutation(torch.tensor([1, 0, 2, 3])) is None
    # a single pair has no other pair order: the two frames are swapped
    assert shuffle_frames(frames[:2], gen(0), mode="pair")[1].tolist() == [1, 0]


def test_shuffle_rejects_bad_arguments():
    with pytest.raises(ValueError, match="even frame count, got T=5"):
        shuffle_frames(random_frames(5, 28, 28), gen(0), mode="pair")
    with pytest.raises(ValueError, match="'frame' or 'pair'"):
        shuffle_frames(random_frames(4, 28, 28), gen(0), mode="group")


@pytest.mark.parametrize("mode", ["frame", "pair"])
def test_ordered_and_shuffled_share_text_grid_and_positions(tok, rope_model, mode):
    videos = [random_frames(4, 56, 84, seed=10), random_frames(6, 28, 56, seed=11)]
    image = random_frames(1, 84, 84, seed=12)[0]  # the longest prompt: the video rows are padded in both batches
    convs = [conversation("What moves first?", "video"), conversation("Count the squares in the picture.", "image"),
             conversation("Does the ball turn left or right?Options:\nA. left\nB. right\n", "video")]
    pair = build_shuffle_pair(tok, convs, [videos[0], image, videos[1]], gen(3), mode=mode)
    ordered, shuffled = pair.ordered, pair.shuffled
    assert pair.video_rows == (0, 2) and len(pair.permutations) == 2
    rows = list(pair.video_rows)
    assert torch.equal(shuffled.input_ids, ordered.input_ids[rows])
    assert torch.equal(shuffled.attention_mask, ordered.attention_mask[rows])
    assert torch.equal(shuffled.mm_token_type_ids, ordered.mm_token_type_ids[rows])
    assert torch.equal(shuffled.video_grid_thw, ordered.video_grid_thw)
    assert torch.equal(shuffled.second_per_grid_ts, ordered.second_per_grid_ts)
    assert shuffled.pixel_values is None and shuffled.pixel_values_videos.shape == ordered.pixel_values_videos.shape

    def positions(batch):
        return rope_model.get_rope_index(batch.input_ids, batch.mm_token_type_ids, image_grid_thw=batch.image_grid_thw,
                                         video_grid_thw=batch.video_grid_thw,
                                         second_per_grid_ts=batch.second_per_grid_ts,
                                         attention_mask=batch.attention_mask)

    pos_o, delta_o = positions(ordered)
    pos_s, delta_s = positions(shuffled)
    assert torch.equal(pos_s, pos_o[:, rows]) and torch.equal(delta_s, delta_o[rows])
    assert not torch.equal(pos_o[0], pos_o[1])  # real 3-D positions, not the 1-D fallback

    offset = 0
    for video, perm in zip(videos, pair.permutations):
        expected, grid = video_to_patches(video[perm])
        n = int(grid.prod())
        got_s = shuffled.pixel_values_videos[offset:offset + n]
        got_o = ordered.pixel_values_videos[offset:offset + n]
        assert torch.equal(got_s, expected) and torch.equal(got_o, video_to_patches(video)[0])
        assert not torch.equal(got_s, got_o)  # the shuffled branch really sees shuffled frames
        if mode == "pair":  # whole temporal patches move: vision input rows are a block permutation
            q = pair_permutation(perm)
            block = n // int(grid[0])
            assert torch.equal(got_s.reshape(-1, block, 1176), got_o.reshape(-1, block, 1176)[q])
        offset += n


def test_batch_without_video_has_no_shuffled_branch(tok):
    pair = build_shuffle_pair(tok, [conversation("Count.", "image")], [random_frames(1, 28, 28)[0]], gen(0))
    assert pair.shuffled is None and pair.video_rows == () and pair.permutations == ()
    assert pair.ordered.pixel_values is not None
