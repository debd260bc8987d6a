"""Decision-balanced sampling of the policy tasks (`data.balance`)."""

import numpy as np
import pytest

from unified.batches import MixtureBatches
from unified.data.tokenize import TokenShards


@pytest.fixture(scope="module")
def shards(model_data):
    return TokenShards(model_data / "shards")


def decision_shares(shards, p):
    decisions = np.asarray(shards.arrays["decision"][shards.index("policy")], np.int64)
    return {int(d): float(p[decisions == d].sum()) for d in np.unique(decisions)}


def test_balance_draws_rare_decisions_more_often(shards):
    uniform = MixtureBatches(shards, {"policy": 1.0}, 256, 2, seed=0)
    assert uniform.probabilities_of("policy") is None  # balance 0: uniform over samples
    n = len(shards.index("policy"))
    natural = decision_shares(shards, np.full(n, 1 / n))
    assert len(natural) >= 2, "the tiny store needs at least two decisions"
    # balance 1: every decision the same share of the draws.
    full = decision_shares(shards, MixtureBatches(shards, {"policy": 1.0}, 256, 2, seed=0, balance=1.0)
                           .probabilities_of("policy"))
    assert np.allclose(list(full.values()), 1 / len(natural))
    # balance 0.5: in between, the rarest decision drawn more often than its share and the commonest less often.
    half = decision_shares(shards, MixtureBatches(shards, {"policy": 1.0}, 256, 2, seed=0, balance=0.5)
                           .probabilities_of("policy"))
    rarest, commonest = min(natural, key=natural.get), max(natural, key=natural.get)
    assert natural[rarest] < half[rarest] < full[rarest] and natural[commonest] > half[commonest] > full[commonest]
    # The batches really draw with those probabilities: over many draws the rarest decision's share follows.
    batches = MixtureBatches(shards, {"policy": 1.0}, 256, 2, seed=0, balance=1.0)
    a = shards.arrays
    row_of = {(int(e), int(t)): r for r, (e, t) in enumerate(zip(a["episode"], a["step"]))}
    drawn = [row_of[int(i.split()[1]), int(i.split()[3])]  # "episode E step S"
             for step in range(30) for row in batches.batch(step).sample_ids for i in row]
    decisions = np.asarray(a["decision"], np.int64)[drawn]
    assert np.mean(decisions == rarest) > natural[rarest] + 0.1


def test_turn_weight_draws_the_chunks_that_steer_more_often(shards):
    """`data.turn_weight` k: a policy sample whose action chunk steers beyond TURN_RAD somewhere is drawn k times as
    often as one that does not, computed from the recorded actions of the chunk itself."""
    from unified.batches import TURN_RAD

    rows = shards.index("policy")
    turning = np.array([np.abs(shards.action_values(int(r))[:, 1]).max() > TURN_RAD for r in rows])
    assert 0 < turning.sum() < len(rows), "the tiny store needs chunks that steer and chunks that do not"
    batches = MixtureBatches(shards, {"policy": 1.0}, 256, 2, seed=0, turn_weight=4.0)
    assert np.array_equal(batches.turning(rows), turning)
    p = batches.probabilities_of("policy")
    assert np.isclose(p.sum(), 1.0)
    assert np.allclose(p[turning] / p[~turning].max(), 4.0) and np.allclose(p[~turning], p[~turning][0])
    assert MixtureBatches(shards, {"policy": 1.0}, 256, 2, seed=0, turn_weight=1.0).probabilities_of("policy") is None
