"""Round trips (property-based), bad inputs and the fit -> eval chain of the tokenizers."""

import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from unified.tokenizers.action import BinActionTokenizer, FastActionTokenizer
from unified.tokenizers.image import FSQ, ImageTokenizer, ImageTokenizerConfig
from unified.tokenizers.text import TextTokenizer

from unified.errors import UnifiedError

STATS = {"names": ["acceleration", "steering"], "q01": [-5.0, -0.1], "q99": [2.0, 0.1]}
H = 8


def chunks_within(low, high):
    return st.integers(1, 4).flatmap(lambda b: arrays(
        np.float64, (b, H, 2),
        elements=st.floats(0, 1, allow_nan=False),
    ).map(lambda u: np.asarray(low) + u * (np.asarray(high) - np.asarray(low))))


@given(chunks_within(STATS["q01"], STATS["q99"]))
def test_bins_round_trip_within_half_a_bin(actions):
    tokenizer = BinActionTokenizer.from_stats(STATS, bins=256)
    ids = tokenizer.encode(actions)
    assert ids.shape == (len(actions), H * 2) and ids.min() >= 0 and ids.max() < 256
    error = np.abs(tokenizer.decode(ids) - actions)
    # The grid is shifted so that 0 is a bin centre: the end bins reach at most one bin past q01/q99.
    width = tokenizer.bin_width
    inner = (actions > np.asarray(STATS["q01"]) + width) & (actions < np.asarray(STATS["q99"]) - width)
    assert np.all(error[inner] <= np.broadcast_to(width / 2, error.shape)[inner] + 1e-9)
    assert np.all(error <= width + 1e-9)


def test_zero_is_a_bin_centre():
    """The most frequent action (wheel straight, speed held) decodes exactly: no bias to integrate into a drift."""
    for stats in (STATS, {"names": ["a", "s"], "q01": [-5.0, -0.0672], "q99": [1.6, 0.0619]}):
        tokenizer = BinActionTokenizer.from_stats(stats, bins=256)
        assert np.array_equal(tokenizer.decode(tokenizer.encode(np.zeros((1, 1, 2)))), np.zeros((1, 1, 2)))
    shifted = BinActionTokenizer.from_stats({"names": ["a"], "q01": [1.0], "q99": [3.0]}, bins=4)
    assert shifted.decode([[0, 3]]).ravel().tolist() == [1.25, 2.75]  # 0 outside the range: the plain grid


@given(chunks_within(STATS["q01"], STATS["q99"]))
def test_per_dimension_bins_give_each_dimension_its_own_ids(actions):
    shared = BinActionTokenizer.from_stats(STATS, bins=32)
    separate = BinActionTokenizer.from_stats(STATS, bins=32, per_dimension=True)
    assert separate.vocab_size == 64
    ids = separate.encode(actions)
    assert ids[:, 0::2].max() < 32 <= ids[:, 1::2].min()  # acceleration in [0, 32), steering in [32, 64)
    np.testing.assert_array_equal(ids - np.tile([0, 32], H), shared.encode(actions))
    np.testing.assert_allclose(separate.decode(ids), shared.decode(shared.encode(actions)))
    with pytest.raises(UnifiedError, match="another dimension"):
        separate.decode(ids[:, ::-1])


def test_bins_clip_outside_the_quantiles():
    tokenizer = BinActionTokenizer.from_stats(STATS, bins=256)
    ids = tokenizer.encode(np.array([[[-50.0, 3.0]]]))
    assert ids.tolist() == [[0, 255]]



def test_equal_count_bins_resolve_dense_values_that_uniform_bins_merge(tmp_path):
    # A heading within +-0.05 rad nine times in ten but reaching +-0.7 rad: uniform bins over min..max give the
    # dense part a handful of tokens, equal-count bins about nine in ten of them.
    rng = np.random.default_rng(0)
    heading = np.concatenate([rng.uniform(-0.05, 0.05, 9000), rng.uniform(-0.7, 0.7, 1000)])
    speed = rng.uniform(0, 30, 10000)
    samples = np.stack([heading, speed], 1)
    stats = {"names": ["heading", "speed"], "q01": list(samples.min(0)), "q99": list(samples.max(0))}
    equal = BinActionTokenizer.from_samples(samples, stats, bins=64)
    uniform = BinActionTokenizer.from_stats(stats, bins=64, per_dimension=True)
    dense = samples[np.abs(heading) < 0.05]
    assert len(np.unique(uniform.encode(dense[:, None])[:, 0])) <= 6
    assert len(np.unique(equal.encode(dense[:, None])[:, 0])) >= 50
    counts = np.bincount(equal.encode(samples[:, None])[:, 0], minlength=64)
    assert counts.min() > 0.8 * len(samples) / 64 and counts.max() < 1.2 * len(samples) / 64
    ids = equal.encode(samples[:, None])
    assert ids[:, 1].min() >= 64 and ids[:, 1].max() < 128  # each dimension its own ids
    # Ordered: a larger value never gets a smaller id; decoding lands inside the value's own bin.
    order = np.argsort(heading)
    assert np.all(np.diff(ids[order, 0]) >= 0)
    decoded = equal.decode(ids)[:, 0]
    lower = np.concatenate([[stats["q01"][0]], equal.edges[0]])[ids[:, 0]]
    upper = np.concatenate([equal.edges[0], [stats["q99"][0]]])[ids[:, 0]]
    assert np.all((decoded[:, 0] >= lower - 1e-9) & (decoded[:, 0] <= upper + 1e-9))
    equal.save_pretrained(tmp_path)
    assert np.array_equal(BinActionTokenizer.from_pretrained(tmp_path).encode(samples[:, None]), ids)
    with pytest.raises(UnifiedError, match="non-decreasing"):
        BinActionTokenizer(equal.q01, equal.q99, 64, equal.names, True, (equal.edges[0][::-1], equal.edges[1]))
    with pytest.raises(UnifiedError, match="samples"):
        BinActionTokenizer.from_samples(samples[:, :1], stats)

@pytest.fixture(scope="module")
def fast():
    rng = np.random.default_rng(0)
    t = np.linspace(0, 1, H)[None, :, None]
    smooth = np.concatenate([
        -5 + 7 * rng.random((400, 1, 1)) + rng.normal(0, 1, (400, 1, 1)) * t,
        0.1 * np.sin(rng.random((400, 1, 1)) * 6 + 3 * t),
    ], axis=2).clip(STATS["q01"], STATS["q99"])
    return FastActionTokenizer.fit(smooth, STATS, scale=10.0, vocab_size=700)


@settings(deadline=None, max_examples=60)
@given(chunks_within(STATS["q01"], STATS["q99"]))
def test_fast_round_trip_error_is_bounded_by_the_rounding(fast, actions):
    ids = fast.encode(actions)
    decoded = fast.decode(ids)
    # Orthonormal DCT: rounding each coefficient by at most 1/(2 scale) moves the chunk by at most
    # sqrt(H)/(2 scale) per dimension in normalised units, i.e. times (q99 - q01)/2 in the action's units.
    span = (np.asarray(STATS["q99"]) - np.asarray(STATS["q01"])) / 2
    assert np.all(np.abs(decoded - actions) <= np.sqrt(H) / (2 * fast.scale) * span + 1e-9)
    # The integer coefficients themselves survive BPE exactly.
    text = ["".join(fast._bpe.id_to_token(i) for i in row) for row in ids]
    assert text == fast._text(fast._coefficients(actions))


def test_fast_compresses_smooth_chunks(fast):
    ids = fast.encode(np.tile(np.array([[1.0, 0.02]]), (3, H, 1)))
    assert max(len(i) for i in ids) < H * 2


def test_fast_decodes_a_sequence_of_the_wrong_length(fast):
    assert fast.decode([[]]).shape == (1, H, 2)
    assert fast.decode([[5] * 100]).shape == (1, H, 2)


@pytest.mark.parametrize("tokenizer", [BinActionTokenizer.from_stats(STATS), "fast"])
def test_bad_actions(tokenizer, fast):
    tokenizer = fast if tokenizer == "fast" else tokenizer
    with pytest.raises(UnifiedError, match="NaN or inf"):
        tokenizer.encode(np.full((1, H, 2), np.nan))
    with pytest.raises(UnifiedError, match=r"shape \(B, H, 2\)"):
        tokenizer.encode(np.zeros((1, H, 3)))
    with pytest.raises(UnifiedError, match="outside this tokenizer's range"):
        tokenizer.decode(np.array([[10_000]]))


TEXTS = ["Drive along the highway safely.", "The car 18 m ahead is 4 m/s slower, so I change to the left lane.",
         "Is Marco taller than Sara?", "Marco > Sara. So Marco is taller than Sara. yes"] * 20


@pytest.fixture(scope="module")
def text():
    return TextTokenizer.fit(TEXTS, vocab_size=400)


@settings(deadline=None, max_examples=100)
@given(st.text(min_size=1).filter(lambda s: s.strip()))
def test_text_round_trip_of_any_string(text, s):
    ids = text.encode([s])
    assert text.decode(ids) == [s]  # byte fallback: even characters never seen in training


def test_text_errors_and_save_load(text, tmp_path):
    with pytest.raises(UnifiedError, match="could not train with vocab_size 100"):
        TextTokenizer.fit(TEXTS, vocab_size=100)  # byte fallback alone needs 256 pieces
    with pytest.raises(UnifiedError, match="text 1 is empty"):
        text.encode(["fine", "  "])
    with pytest.raises(UnifiedError, match="outside"):
        text.decode([[text.vocab_size]])
    text.save_pretrained(tmp_path / "t")
    again = TextTokenizer.from_pretrained(tmp_path / "t")
    assert again.encode(TEXTS[:2]) == text.encode(TEXTS[:2])


@given(arrays(np.float32, (3, 5, 4), elements=st.floats(-20, 20, width=32)))
def test_fsq_codes_and_latents_agree(z):
    fsq = FSQ((8, 8, 4, 4))
    quantised, codes = fsq(torch.from_numpy(z))
    assert codes.min() >= 0 and codes.max() < 1024
    torch.testing.assert_close(fsq.codes_to_latents(codes), quantised)


def test_fsq_reaches_every_code():
    fsq = FSQ((8, 5, 3))
    grid = torch.cartesian_prod(*[torch.linspace(-6, 6, 60)] * 3)
    assert fsq(grid)[1].unique().numel() == 8 * 5 * 3


TINY_IMAGE = ImageTokenizerConfig(image_size=(16, 16), codebook_size=256, downsample=4, channels=(8, 16),
                                  decoder_channels=(16, 8))


def test_image_shapes_dtypes_and_errors(tmp_path):
    tokenizer = ImageTokenizer(TINY_IMAGE).eval()
    frames = np.random.default_rng(0).integers(0, 256, (5, 16, 16, 3), dtype=np.uint8)
    codes = tokenizer.encode(frames)
    assert codes.shape == (5, 16) and codes.dtype == np.int64 and codes.max() < 256
    decoded = tokenizer.decode(codes)
    assert decoded.shape == frames.shape and decoded.dtype == np.uint8
    np.testing.assert_array_equal(tokenizer.encode(frames[0]), codes[:1])  # one frame or a batch
    with pytest.raises(UnifiedError, match=r"shape \(B, 16, 16, 3\)"):
        tokenizer.encode(np.zeros((2, 32, 32, 3), np.uint8))
    with pytest.raises(UnifiedError, match="uint8"):
        tokenizer.encode(np.zeros((2, 16, 16, 3), np.float32))
    with pytest.raises(UnifiedError, match="code 256 outside"):
        tokenizer.decode(np.full((1, 16), 256))
    tokenizer.save_pretrained(tmp_path / "image")
    np.testing.assert_array_equal(ImageTokenizer.from_pretrained(tmp_path / "image").encode(frames), codes)
    config = json.loads((tmp_path / "image" / "config.json").read_text())
    (tmp_path / "image" / "config.json").write_text(json.dumps(config | {"format_version": 0}))
    with pytest.raises(UnifiedError, match="incompatible version"):
        ImageTokenizer.from_pretrained(tmp_path / "image")


def test_tokenizer_of_a_local_pretrained_lm(tmp_path):
    from transformers import PreTrainedTokenizerFast
    from unified.tokenizers.text import PretrainedTextTokenizer

    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    # A local LM directory as `save_pretrained` writes it; nothing comes from a hub.
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel()
    bpe.train_from_iterator(TEXTS, trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    PreTrainedTokenizerFast(tokenizer_object=bpe, unk_token="<unk>").save_pretrained(tmp_path / "lm")
    lm = PretrainedTextTokenizer.from_lm(tmp_path / "lm")
    ids = lm.encode(TEXTS[:2])
    assert all(0 <= i < lm.vocab_size for row in ids for i in row)
    lm.save_pretrained(tmp_path / "text")
    again = TextTokenizer.from_pretrained(tmp_path / "text")
    assert again.encode(TEXTS[:2]) == ids
    with pytest.raises(UnifiedError, match="no tokenizer of a pretrained LM"):
        PretrainedTextTokenizer.from_lm(tmp_path / "missing")
