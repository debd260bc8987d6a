"""Action tokenizers over chunks of H continuous actions: uniform bins, and FAST (DCT + rounding + BPE).

Both normalise each dimension with a range taken from the episode store's statistics (bins: min..max of the
training actions by default, or their q01/q99 quantiles; FAST: q01/q99), clipping outside, so no statistics are
ever typed in; both decode to the simulator's units.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from scipy.fft import dct, idct
from unified.tokenizers.files import FORMAT_VERSION, read_config, write_config
from unified.tokenizers.normalization import QuantileNormalizer

from unified.errors import UnifiedError

# How a policy turns an action token's distribution over its bins into a value (`unified.policy.Policy.act`): the
# centre of the chosen bin ("mode", the default), or the mean or the median of the bin centres under the
# distribution. Against the mode the median measured +0.09 [+0.06, +0.11] success in distribution pooled over five
# trained models (planning every step), but cost success out of distribution (-0.09 [-0.12, -0.05] pooled over the
# three models driven there; README, "Sixth round"), so it is an option.
READOUTS = ("mode", "mean", "median")
READOUT = "mode"
# How a policy that writes FAST tokens decodes a chunk (`unified.policy.Policy.act`): "whole" allows at every step only
# the tokens that still fit the chunk's H * D DCT coefficients and stops when they are all written, so every chunk is
# whole; "free" lets the model choose among all FAST tokens until it writes `</act>`, as it was trained, and counts
# the chunks that come out short or long (`ActionResult.malformed`).
FAST_DECODINGS = ("whole", "free")
FAST_DECODING = "whole"


def _check_chunks(actions, dim: int, where: str) -> np.ndarray:
    actions = np.asarray(actions)
    if actions.ndim == 2:
        actions = actions[None]
    if actions.ndim != 3 or actions.shape[-1] != dim or actions.shape[1] == 0:
        raise UnifiedError(f"{where}: expected action chunks of shape (B, H, {dim}), got {actions.shape}")
    if not np.issubdtype(actions.dtype, np.number):
        raise UnifiedError(f"{where}: actions must be numbers, got dtype {actions.dtype}")
    if not np.all(np.isfinite(actions)):
        raise UnifiedError(f"{where}: actions contain NaN or inf")
    return actions.astype(np.float64)


def _check_ids(ids, vocab_size: int, where: str) -> np.ndarray:
    ids = np.asarray(ids)
    if not np.issubdtype(ids.dtype, np.integer):
        raise UnifiedError(f"{where}: ids must be integers, got dtype {ids.dtype}")
    bad = (ids < 0) | (ids >= vocab_size)
    if bad.any():
        raise UnifiedError(f"{where}: id {int(ids[bad][0])} outside this tokenizer's range [0, {vocab_size})")
    return ids


@dataclass
class BinActionTokenizer:
    """Each action dimension of each step -> one of `bins` uniform bins over [q01, q99]: H * D tokens a chunk.

    Where 0 lies inside [q01, q99] the grid is shifted (by less than a bin) so that 0 is a bin centre: the
    expert's most frequent action (wheel straight, speed held) decodes exactly, not as a small constant bias
    that a policy would integrate into a drift off the road.

    With `edges` (from `from_samples`) the bins are equal-count instead of equal-width: bin k of a dimension holds
    the values between its k-th and (k+1)-th edge, so each bin holds about as many training values as any other and
    the resolution is finest where the data is dense. The state may use them (`tokenizer fit --state-binning
    equal_count`): a heading that spans +-0.7 rad but is within +-0.05 rad nine steps in ten then gets about 50
    distinct tokens there, not 5.
    """

    q01: tuple[float, ...]
    q99: tuple[float, ...]
    bins: int = 256
    names: tuple[str, ...] = ()
    # Each dimension its own `bins` ids (vocabulary bins * D) instead of one set shared by all dimensions: a state
    # token then says which quantity it measures, not only where it lies in its range.
    per_dimension: bool = False
    # Per dimension, the bins - 1 inner edges of equal-count bins (non-decreasing); empty: uniform bins.
    edges: tuple[tuple[float, ...], ...] = ()
    format_version: int = FORMAT_VERSION

    def __post_init__(self):
        self.q01, self.q99, self.names = tuple(self.q01), tuple(self.q99), tuple(self.names)
        self.edges = tuple(tuple(map(float, e)) for e in self.edges)
        if self.bins < 2:
            raise UnifiedError(f"action bins must be at least 2, got {self.bins}")
        if self.edges and (len(self.edges) != len(self.q01) or any(len(e) != self.bins - 1 for e in self.edges)
                           or any(np.any(np.diff(e) < 0) for e in self.edges)):
            raise UnifiedError(f"bin tokenizer: edges must be {len(self.q01)} non-decreasing rows of {self.bins - 1}")
        self.normalizer = QuantileNormalizer(self.q01, self.q99, self.names)
        # Offset of the grid, in bins, per dimension: 0 falls on a bin centre where it is inside the range.
        zero = (self.normalizer.normalize(np.zeros(self.dim)) + 1) / 2 * self.bins  # in bins, may be a bin edge
        inside = (np.asarray(self.q01) < 0) & (np.asarray(self.q99) > 0)
        self.shift = np.where(inside, np.floor(zero) + 0.5 - zero, 0.0)

    @classmethod
    def from_stats(cls, stats: dict, bins: int = 256, per_dimension: bool = False) -> BinActionTokenizer:
        n = QuantileNormalizer.from_stats(stats, "action_stats")
        return cls(n.q01, n.q99, bins, n.names, per_dimension)

    @classmethod
    def from_samples(cls, samples: np.ndarray, stats: dict, bins: int = 64,
                     per_dimension: bool = True) -> BinActionTokenizer:
        """Equal-count bins: each dimension's edges at the k / bins quantiles (k = 1 .. bins - 1) of `samples`
        (N, D), its outer bins reaching to `stats`' q01/q99 (which name the dimensions)."""
        samples = np.asarray(samples, np.float64)
        n = QuantileNormalizer.from_stats(stats, "state_stats")
        if samples.ndim != 2 or samples.shape[1] != n.dim or not len(samples):
            raise UnifiedError(f"equal-count bins need (N, {n.dim}) samples, got shape {samples.shape}")
        edges = np.quantile(samples, np.arange(1, bins) / bins, axis=0).T  # (D, bins - 1)
        return cls(n.q01, n.q99, bins, n.names, per_dimension, tuple(map(tuple, edges)))

    @property
    def vocab_size(self) -> int:
        return self.bins * (self.dim if self.per_dimension else 1)

    def offsets(self) -> np.ndarray:
        """(D,) the first id of each dimension: 0 for all when the dimensions share their bins."""
        return np.arange(self.dim) * self.bins if self.per_dimension else np.zeros(self.dim, np.int64)

    @property
    def dim(self) -> int:
        return len(self.q01)

    @property
    def bin_width(self) -> np.ndarray:
        """(D,) width of one bin in the action's own units."""
        return (np.asarray(self.q99) - np.asarray(self.q01)) / self.bins

    def encode(self, actions) -> np.ndarray:
        """(B, H, D) or (H, D) actions in their units -> (B, H * D) int64 ids, step-major."""
        actions = _check_chunks(actions, self.dim, "bin action tokenizer")
        if self.edges:
            ids = np.stack([np.searchsorted(e, actions[..., d], side="right") for d, e in enumerate(self.edges)], -1)
        else:
            unit = (self.normalizer.normalize(actions) + 1) / 2  # [0, 1]
            ids = np.clip(np.floor(unit * self.bins + self.shift), 0, self.bins - 1).astype(np.int64)
        ids = ids.astype(np.int64) + self.offsets()
        return ids.reshape(len(ids), -1)

    def centres(self) -> np.ndarray:
        """(D, bins) the centre of every bin of every dimension, in normalised units [-1, 1]."""
        if self.edges:  # the middle of each bin's edges, the outer bins bounded by q01/q99
            bounds = np.concatenate([np.asarray(self.q01)[:, None], np.asarray(self.edges),
                                     np.asarray(self.q99)[:, None]], 1)
            bounds = np.maximum.accumulate(bounds, axis=1)
            return self.normalizer.normalize(((bounds[:, :-1] + bounds[:, 1:]) / 2).T).T
        unit = np.clip((np.arange(self.bins)[None] + 0.5 - self.shift[:, None]) / self.bins, 0, 1)
        return unit * 2 - 1

    def read_out(self, probs: np.ndarray, readout: str) -> np.ndarray:
        """probs (H, D, vocab_size): each step's and dimension's distribution over this tokenizer's ids -> (H, D)
        actions, the mean or the median (see READOUTS) of that dimension's bin centres under it."""
        if readout not in ("mean", "median"):
            raise UnifiedError(f"bin action tokenizer: read_out takes mean or median, got {readout!r} (the mode is "
                               "decode of the chosen ids)")
        centres, first = self.centres(), self.offsets()  # (D, bins) normalised
        out = np.zeros(probs.shape[:2])
        for d in range(self.dim):
            out[:, d] = read_bins(probs[:, d, first[d]:first[d] + self.bins], centres[d], readout)
        return self.normalizer.unnormalize(out)

    def decode(self, ids) -> np.ndarray:
        """(B, H * D) or (H * D,) ids -> (B, H, D) actions at the bin centres."""
        ids = _check_ids(ids, self.vocab_size, "bin action tokenizer")
        if ids.ndim == 1:
            ids = ids[None]
        if ids.shape[-1] % self.dim:
            raise UnifiedError(f"bin action tokenizer: {ids.shape[-1]} ids is not a whole number of {self.dim}-d steps")
        ids = ids.reshape(len(ids), -1, self.dim) - self.offsets()
        if ids.min() < 0 or ids.max() >= self.bins:
            raise UnifiedError("bin action tokenizer: an id belongs to another dimension than its position says")
        return self.normalizer.unnormalize(np.take_along_axis(self.centres().T, ids.reshape(-1, self.dim), 0)
                                           .reshape(ids.shape))

    def save_pretrained(self, directory: str | Path) -> None:
        write_config(directory, "action_bins", asdict(self))

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> BinActionTokenizer:
        return cls(**_settings(directory, "action_bins"))


def read_bins(probs: np.ndarray, centres: np.ndarray, readout: str) -> np.ndarray:
    """probs (..., bins), a distribution over one dimension's bins (normalised here), and the bins' centres ->
    (...) values: the centre of the most likely bin (mode), the probability-weighted mean of the centres, or the
    centre of the bin where the cumulative probability passes one half (median)."""
    if readout not in READOUTS:
        raise UnifiedError(f"readout: {readout!r} is not one of {', '.join(READOUTS)}")
    probs = probs / probs.sum(-1, keepdims=True)
    if readout == "mode":
        return centres[probs.argmax(-1)]
    if readout == "mean":
        return probs @ centres
    return centres[np.minimum((probs.cumsum(-1) < 0.5).sum(-1), len(centres) - 1)]


@dataclass
class FastActionTokenizer:
    """FAST: per-dimension DCT over the normalised chunk, scaled and rounded, then BPE over the integers.

    Smooth chunks concentrate in a few low-frequency coefficients, most others round to 0, and BPE merges the
    frequent patterns, so a chunk takes far fewer tokens than H * D bins.
    """

    q01: tuple[float, ...]
    q99: tuple[float, ...]
    horizon: int  # H, the chunk length it was fitted for
    scale: float = 10.0  # DCT coefficients are multiplied by this before rounding: larger = finer, more tokens
    vocab_size: int = 1024
    names: tuple[str, ...] = ()
    bpe: str = ""  # the trained BPE model, Hugging Face `tokenizers` JSON
    format_version: int = FORMAT_VERSION

    # Integers are written as characters for BPE; MIN_COEFFICIENT maps to OFFSET.
    OFFSET = 0x4E00
    MIN_COEFFICIENT = -256
    MAX_COEFFICIENT = 256

    def __post_init__(self):
        self.q01, self.q99, self.names = tuple(self.q01), tuple(self.q99), tuple(self.names)
        self.normalizer = QuantileNormalizer(self.q01, self.q99, self.names)
        self._bpe = None
        if self.bpe:
            from tokenizers import Tokenizer

            self._bpe = Tokenizer.from_str(self.bpe)

    @property
    def dim(self) -> int:
        return len(self.q01)

    def _coefficients(self, actions: np.ndarray) -> np.ndarray:  # (B, H, D) -> (B, H, D) int, by frequency
        normalised = self.normalizer.normalize(actions)
        coefficients = dct(normalised, axis=1, norm="ortho")
        rounded = np.rint(coefficients * self.scale).astype(np.int64)
        return np.clip(rounded, self.MIN_COEFFICIENT, self.MAX_COEFFICIENT)

    def _text(self, coefficients: np.ndarray) -> list[str]:
        # Frequency-major (all dimensions' lowest frequency first), so that a cut sequence loses detail only.
        flat = coefficients.reshape(len(coefficients), -1) - self.MIN_COEFFICIENT + self.OFFSET
        return ["".join(map(chr, row)) for row in flat]

    @classmethod
    def fit(
        cls, chunks: np.ndarray, stats: dict, scale: float = 10.0, vocab_size: int = 1024
    ) -> FastActionTokenizer:
        """Train the BPE on (N, H, D) action chunks in their units."""
        from tokenizers import Tokenizer, models, trainers

        chunks = _check_chunks(chunks, len(stats["q01"]), "FAST fit")
        n = QuantileNormalizer.from_stats(stats, "action_stats")
        tokenizer = cls(n.q01, n.q99, chunks.shape[1], scale, vocab_size, n.names)
        alphabet = [chr(cls.OFFSET + i) for i in range(cls.MAX_COEFFICIENT - cls.MIN_COEFFICIENT + 1)]
        if vocab_size <= len(alphabet):
            raise UnifiedError(
                f"FAST vocab_size {vocab_size} leaves no room for merges: the {len(alphabet)} possible coefficients "
                "each need a token; choose more"
            )
        bpe = Tokenizer(models.BPE())
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size, initial_alphabet=alphabet, special_tokens=[], show_progress=False,
            limit_alphabet=len(alphabet), max_token_length=64,
        )
        bpe.train_from_iterator(tokenizer._text(tokenizer._coefficients(chunks)), trainer=trainer)
        tokenizer.bpe = bpe.to_str()
        tokenizer._bpe = bpe
        return tokenizer

    def _require_bpe(self):
        if self._bpe is None:
            raise UnifiedError("FAST action tokenizer: not fitted (no BPE); use FastActionTokenizer.fit")
        return self._bpe

    @property
    def bpe_vocab_size(self) -> int:
        return self._require_bpe().get_vocab_size()

    def encode(self, actions) -> list[list[int]]:
        """(B, H, D) or (H, D) actions -> B lists of ids (lengths vary with the chunk's complexity)."""
        actions = _check_chunks(actions, self.dim, "FAST action tokenizer")
        if actions.shape[1] != self.horizon:
            raise UnifiedError(
                f"FAST action tokenizer: fitted for chunks of {self.horizon} steps, got {actions.shape[1]}"
            )
        bpe = self._require_bpe()
        return [e.ids for e in bpe.encode_batch(self._text(self._coefficients(actions)))]

    def _values(self, sequence) -> np.ndarray:
        bpe = self._require_bpe()
        sequence = _check_ids(np.asarray(sequence, np.int64), bpe.get_vocab_size(), "FAST action tokenizer")
        text = "".join(bpe.id_to_token(int(i)) for i in sequence)
        return np.array([ord(c) - self.OFFSET + self.MIN_COEFFICIENT for c in text], np.float64)

    def token_lengths(self) -> np.ndarray:
        """(bpe_vocab_size,) how many DCT coefficients each token stands for (at least 1): what a decoder that
        writes only whole chunks counts (`unified.generation.Decoder.generate_counted`)."""
        bpe = self._require_bpe()
        return np.array([len(bpe.id_to_token(i)) for i in range(bpe.get_vocab_size())], np.int64)

    def problem(self, sequence) -> str | None:
        """None when `sequence` (ids) decodes to exactly H * D coefficients, a whole chunk; else what is wrong
        with it, in words. A model's malformed output is reported with this, never decoded silently."""
        count, expected = len(self._values(sequence)), self.dim * self.horizon
        if count == expected:
            return None
        return f"{count} of the chunk's {expected} DCT coefficients" if count < expected else \
            f"{count} DCT coefficients, {count - expected} more than the chunk's {expected}"

    def decode(self, ids: list[list[int]]) -> np.ndarray:
        """B lists of ids -> (B, H, D) actions. A sequence of the wrong length (a model's mistake, which
        `problem` names) is padded with zero coefficients (no detail at the missing frequencies) or cut, so that
        decoding always yields a chunk; callers that decode a model's output check `problem` first."""
        out = np.zeros((len(ids), self.dim * self.horizon), np.float64)
        for row, sequence in enumerate(ids):
            values = self._values(sequence)[: self.dim * self.horizon]
            out[row, : len(values)] = values
        coefficients = out.reshape(len(ids), self.horizon, self.dim) / self.scale
        return self.normalizer.unnormalize(np.clip(idct(coefficients, axis=1, norm="ortho"), -1, 1))

    def save_pretrained(self, directory: str | Path) -> None:
        write_config(directory, "action_fast", asdict(self))

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> FastActionTokenizer:
        return cls(**_settings(directory, "action_fast"))


def _settings(directory: str | Path, kind: str) -> dict:
    config = read_config(directory, kind)
    del config["type"]
    return config
