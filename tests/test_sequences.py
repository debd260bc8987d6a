"""Sequence builders, packing and the attention mask against a brute-force reference."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from unified.errors import UnifiedError
from unified.layout import TokenLayout
from unified.packing import attention_mask, collate, first_fit, pack
from unified.sequences import IGNORE, Sample, build, dump

LAYOUT = TokenLayout.build(text=50, image=32, action=16, state=8)
H, D, TOKENS = 3, 2, 4


def g(modality, ids):
    return LAYOUT.to_global(modality, ids)


def make(task, rng, n_reason=5):
    if task == "text":
        return Sample("text", question=g("text", rng.integers(0, 50, 6)), steps=g("text", rng.integers(0, 50, 4)),
                      answer=g("text", [7]), id="op")
    return Sample(
        task, frames=g("image", rng.integers(0, 32, (1, TOKENS))), actions=g("action", rng.integers(0, 16, (H, D))),
        instruction=g("text", rng.integers(0, 50, 3)), state=g("state", rng.integers(0, 8, 3)),
        reason=g("text", rng.integers(0, 50, n_reason)), next_frame=g("image", rng.integers(0, 32, TOKENS)),
        id=f"{task} sample",
    )


def test_policy_reason_layout_and_targets():
    sample = make("policy_reason", np.random.default_rng(0))
    b = build(sample, LAYOUT)
    names = [LAYOUT.specials[i] if i < len(LAYOUT.specials) else None for i in b.ids.tolist()]
    assert names[0] == "<bos>" and names[-1] == "</act>"
    assert [n for n in names if n] == ["<bos>", "<img>", "</img>", "<state>", "</state>", "<reason>", "</reason>",
                                       *["<act>"] * H, "</act>"]  # one <act> marker per step of the chunk
    predicted = b.ids[1:][b.targets[:-1] != IGNORE]
    # Exactly the reasoning, its closing marker, the action tokens and </act> are predicted.
    expected = np.concatenate([sample.reason, [LAYOUT.special("</reason>")], sample.actions.reshape(-1),
                               [LAYOUT.special("</act>")]])
    np.testing.assert_array_equal(predicted, expected)
    assert b.targets[-1] == IGNORE and np.all(b.weights[b.targets == IGNORE] == 0)
    blocks = b.action_block[b.action_block >= 0]
    np.testing.assert_array_equal(blocks, np.repeat(np.arange(H), D + 1))  # each step: its marker and D tokens
    markers = b.ids == LAYOUT.special("<act>")
    assert np.all(b.targets[:-1][markers[1:]] == IGNORE)  # markers are given, never predicted


def test_world_targets_are_the_next_frame_at_image_weight():
    b = build(make("world", np.random.default_rng(1)), LAYOUT, image_weight=0.04)
    predicted = b.targets[b.targets != IGNORE]
    assert len(predicted) == TOKENS + 1  # the frame and </img>
    assert np.allclose(b.weights[b.targets != IGNORE], [0.04] * TOKENS + [1.0])


def test_policy_without_reason_and_text_task():
    rng = np.random.default_rng(2)
    policy = build(make("policy", rng), LAYOUT)
    assert LAYOUT.special("<reason>") not in policy.ids
    assert (policy.targets != IGNORE).sum() == H * D + 1
    text = build(make("text", rng), LAYOUT)
    assert text.ids[-1] == LAYOUT.special("<eos>") and (text.targets != IGNORE).sum() == 4 + 1 + 1 + 1
    assert "[" in dump(text, LAYOUT)


def test_missing_fields_and_empty_instruction():
    sample = make("policy", np.random.default_rng(3))
    sample.instruction = np.zeros(0, np.int64)
    with pytest.raises(UnifiedError, match="instruction has no tokens"):
        build(sample, LAYOUT)
    with pytest.raises(UnifiedError, match="missing next_frame"):
        build(Sample("world", frames=sample.frames, actions=sample.actions, id="x"), LAYOUT)


def brute_force_mask(segment, block):
    t = len(segment)
    mask = np.zeros((t, t), bool)
    for i in range(t):
        for j in range(t):
            if i == j:
                mask[i, j] = True
            elif segment[i] < 0 or segment[i] != segment[j] or j > i:
                mask[i, j] = False
            elif block[i] >= 0 and block[j] >= 0 and block[j] < block[i]:
                mask[i, j] = False  # an action block never sees an earlier block of its chunk
            else:
                mask[i, j] = True
    return mask


@given(st.lists(st.sampled_from(["policy_reason", "policy", "world", "text"]), min_size=1, max_size=5),
       st.integers(0, 2**31))
def test_packed_mask_matches_brute_force(tasks, seed):
    rng = np.random.default_rng(seed)
    built = [build(make(t, rng, n_reason=int(rng.integers(1, 6))), LAYOUT) for t in tasks]
    seq_len = sum(len(b) for b in built) + int(rng.integers(0, 5))
    batch = collate([built], seq_len, LAYOUT)
    padding = np.full(seq_len - sum(map(len, built)), -1)
    segment = np.concatenate([np.full(len(b), k) for k, b in enumerate(built)] + [padding])
    block = np.concatenate([b.action_block for b in built] + [padding])
    np.testing.assert_array_equal(batch.attention_mask[0, 0], brute_force_mask(segment, block))
    np.testing.assert_array_equal(attention_mask(segment, block), brute_force_mask(segment, block))
    # Positions restart in every sample.
    starts = np.cumsum([0] + [len(b) for b in built[:-1]])
    assert all(batch.position_ids[0, s] == 0 for s in starts)


def test_first_fit_packs_densely():
    rng = np.random.default_rng(0)
    lengths = rng.integers(60, 160, 400).tolist()
    bins = first_fit(lengths, 1024)
    assert sorted(i for b in bins for i in b) == list(range(400))
    assert all(sum(lengths[i] for i in b) <= 1024 for b in bins)
    assert sum(lengths) / (len(bins) * 1024) > 0.95


def test_pack_refuses_a_sample_longer_than_the_sequence():
    b = build(make("world", np.random.default_rng(0)), LAYOUT)
    with pytest.raises(UnifiedError, match="longer than seq_len 8"):
        list(pack([b], 8, 1, LAYOUT))
