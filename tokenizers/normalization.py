"""Per-dimension normalisation of actions and states to [-1, 1] over a range (`q01`..`q99`) an episode store computed:
its 1%/99% quantiles, or its min and max where the tokenizer fit asks for the whole range."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from unified.errors import UnifiedError


@dataclass(frozen=True)
class QuantileNormalizer:
    """Maps [q01, q99] of each dimension onto [-1, 1], clipping outside; `unnormalize` is its inverse inside."""

    q01: tuple[float, ...]
    q99: tuple[float, ...]
    names: tuple[str, ...] = ()

    def __post_init__(self):
        if len(self.q01) != len(self.q99) or not self.q01:
            raise UnifiedError(f"q01 and q99 need the same non-zero length, got {len(self.q01)} and {len(self.q99)}")
        if any(not np.isfinite(v) for v in (*self.q01, *self.q99)):
            raise UnifiedError(f"q01/q99 must be finite, got q01={self.q01} q99={self.q99}")

    @classmethod
    def from_stats(cls, stats: dict, where: str = "stats") -> QuantileNormalizer:
        """From a store's `action_stats` or `state_stats` (meta/info.json)."""
        if not stats or "q01" not in stats or "q99" not in stats:
            raise UnifiedError(f"{where}: no q01/q99 statistics (is the episode store empty?)")
        return cls(tuple(map(float, stats["q01"])), tuple(map(float, stats["q99"])), tuple(stats.get("names", ())))

    @property
    def dim(self) -> int:
        return len(self.q01)

    def _span(self) -> tuple[np.ndarray, np.ndarray]:
        low, high = np.asarray(self.q01, np.float64), np.asarray(self.q99, np.float64)
        # A dimension that never varies (e.g. steering in a straight-road-only store) keeps a unit span.
        return low, np.where(high - low > 1e-8, high - low, 1.0)

    def normalize(self, values: np.ndarray) -> np.ndarray:
        """(..., D) in the data's units -> (..., D) in [-1, 1]."""
        values = np.asarray(values, np.float64)
        if values.shape[-1:] != (self.dim,):
            raise UnifiedError(f"expected values with last dimension {self.dim}, got shape {values.shape}")
        if not np.all(np.isfinite(values)):
            raise UnifiedError("values contain NaN or inf")
        low, span = self._span()
        return np.clip(2.0 * (values - low) / span - 1.0, -1.0, 1.0)

    def unnormalize(self, values: np.ndarray) -> np.ndarray:
        """(..., D) in [-1, 1] -> (..., D) in the data's units."""
        low, span = self._span()
        return (np.asarray(values, np.float64) + 1.0) / 2.0 * span + low
