"""Simulator seeds. Data generation and evaluation draw from disjoint halves of the 31-bit seed space (bit 30
clear for data, set for evaluation), so an evaluation episode can never replay a training episode's traffic,
whatever seeds the user passes to either."""

from __future__ import annotations

import numpy as np

EVALUATION_BIT = 1 << 30


def _hash(*keys: int) -> int:
    return int(np.random.SeedSequence(list(keys)).generate_state(1)[0])


def data_seed(seed: int, index: int) -> int:
    """The simulator seed of episode `index` of a store generated with `seed` (independent of worker count)."""
    return _hash(seed, index) & (EVALUATION_BIT - 1)


def evaluation_seed(seed: int, scenario: int, episode: int) -> int:
    """The simulator seed of evaluation episode `episode` of the `scenario`-th scenario of a suite."""
    return (_hash(seed, scenario, episode) & (EVALUATION_BIT - 1)) | EVALUATION_BIT


def is_evaluation_seed(seed: int) -> bool:
    return bool(seed & EVALUATION_BIT)
