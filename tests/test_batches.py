"""How training batches draw the policy tasks: decision balance, turn weight, image dropout, state noise."""

import numpy as np
import pytest

from unified.batches import MixtureBatches
from unified.data.shards import TokenShards


@pytest.fixture(scope="module")
def shards(model_data):
    return TokenShards(model_data / "shards")


def sample_rows(shards):
    """The shard row of each sample id ("episode E step S")."""
    a = shards.arrays
    row_of = {(int(e), int(t)): r for r, (e, t) in enumerate(zip(a["episode"], a["step"]))}
    return lambda sample_id: row_of[int(sample_id.split()[1]), int(sample_id.split()[3])]


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
    row_of = sample_rows(shards)
    drawn = [row_of(i) for step in range(30) for row in batches.batch(step).sample_ids for i in row]
    decisions = np.asarray(shards.arrays["decision"], np.int64)[drawn]
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


def test_image_dropout_leaves_the_frame_out_of_that_share_of_policy_prompts(shards):
    """`data.image_dropout` p: a policy sample's prompt is built without its frame with probability p; the other
    tasks keep theirs, and p = 0 draws exactly the batches a run without the option draws."""
    from unified.errors import UnifiedError
    from unified.packing import TASKS
    from unified.train_config import load_recipe

    image = shards.layout.mask("image")
    tasks = {"policy": 1.0, "policy_reason": 1.0, "world": 1.0}

    def image_tokens_per_task(batch):
        counts = {}
        for task, name in enumerate(TASKS):
            counts[name] = int((image[batch.input_ids] & (batch.task_ids == task)).sum())
        return counts

    plain = [MixtureBatches(shards, tasks, 256, 2, seed=0).batch(s) for s in range(4)]
    zero = [MixtureBatches(shards, tasks, 256, 2, seed=0, image_dropout=0.0).batch(s) for s in range(4)]
    assert all(np.array_equal(a.input_ids, b.input_ids) for a, b in zip(plain, zero))
    every = [MixtureBatches(shards, tasks, 256, 2, seed=0, image_dropout=1.0).batch(s) for s in range(4)]
    counts = [image_tokens_per_task(b) for b in every]
    assert all(c["policy"] == c["policy_reason"] == 0 for c in counts) and sum(c["world"] for c in counts) > 0
    assert all(image_tokens_per_task(b)["policy"] > 0 for b in plain[:1])
    # Half: over many samples about half of the policy prompts keep their frame.
    half = MixtureBatches(shards, {"policy": 1.0}, 256, 2, seed=0, image_dropout=0.5)
    open_marker = shards.layout.special("<img>")
    framed, total = 0, 0
    for s in range(20):
        b = half.batch(s)
        framed += int((b.input_ids == open_marker).sum())
        total += sum(len(row) for row in b.sample_ids)
    assert 0.3 < framed / total < 0.7, (framed, total)
    with pytest.raises(UnifiedError, match=r"data.image_dropout .* in \[0, 1\]; got 1.5"):
        load_recipe("recipes/debug.yaml", ["data.image_dropout=1.5"])


def test_state_noise_shifts_each_state_token_within_its_dimension(shards):
    """`data.state_noise` k: every state token of a policy prompt moves by at most k bins, stays within the ids its
    dimension takes in training, and over many prompts both directions and no shift all occur; the action targets
    and every other token stay as recorded, and k = 0 draws exactly the batches a run without the option draws."""
    from unified.errors import UnifiedError
    from unified.train_config import load_recipe

    state = shards.layout.mask("state")
    rows = shards.index("policy")
    recorded = np.asarray(shards.arrays["state"], np.int64)
    low, high = recorded[rows].min(0), recorded[rows].max(0)
    assert (high - low > 2).any(), "the tiny store needs a state dimension spanning several bins"
    tasks = {"policy": 1.0, "policy_reason": 1.0, "world": 1.0}
    plain = [MixtureBatches(shards, tasks, 256, 2, seed=0).batch(s) for s in range(3)]
    zero = [MixtureBatches(shards, tasks, 256, 2, seed=0, state_noise=0).batch(s) for s in range(3)]
    assert all(np.array_equal(a.input_ids, b.input_ids) for a, b in zip(plain, zero))

    noisy = MixtureBatches(shards, {"policy": 1.0}, 256, 2, seed=0, state_noise=2)
    without = MixtureBatches(shards, {"policy": 1.0}, 256, 2, seed=0)
    row_of = sample_rows(shards)
    shifts = []
    for step in range(10):
        clean, batch = without.batch(step), noisy.batch(step)
        # The noise has its own generator, so the same samples land in the same rows; only state tokens differ.
        assert batch.sample_ids == clean.sample_ids
        differ = batch.input_ids != clean.input_ids
        assert not (differ & ~state[batch.input_ids]).any()
        assert np.array_equal(batch.weights, clean.weights)
        assert not ((batch.targets != clean.targets) & (batch.weights > 0)).any()  # no trained target moves
        for r, ids in enumerate(batch.sample_ids):
            tokens = batch.input_ids[r][state[batch.input_ids[r]]].reshape(len(ids), -1)
            for i, got in zip(ids, tokens):
                shift = got - recorded[row_of(i)]
                assert np.abs(shift).max() <= 2
                assert ((got >= low) & (got <= high)).all()
                shifts.append(shift)
    shifts = np.concatenate(shifts)
    assert (shifts < 0).any() and (shifts > 0).any() and (shifts == 0).any()
    assert 0.5 < np.mean(shifts != 0) < 0.95  # 4 of 5 draws shift, less where a dimension's edge clips them

    with pytest.raises(UnifiedError, match=r"data.state_noise is a number of bins"):
        load_recipe("recipes/debug.yaml", ["data.state_noise=-1"])
    with pytest.raises(UnifiedError, match=r"data.state_noise shifts the state tokens"):
        load_recipe("recipes/debug.yaml", ["data.state_noise=1", "model.state_value_embedding=true"])


def test_dataloader_workers_build_the_same_batches_ahead(model_data):
    """data.workers > 0: a DataLoader's worker processes build each step's micro-batches; they are the batches the
    training process would have built (the same ids, masks and targets), in step order, from any start step."""
    from unified.batches import step_batches

    shards = TokenShards(model_data / "shards")
    batches = MixtureBatches(shards, {"world": 1.0, "policy_reason": 1.0, "policy": 1.0}, 256, 2, seed=3)
    here = list(step_batches(batches, rank=1, accum=2, start=3, stop=7))
    ahead = list(step_batches(batches, rank=1, accum=2, start=3, stop=7, workers=2, prefetch=2))
    assert [s for s, _ in ahead] == [3, 4, 5, 6] == [s for s, _ in here]
    for (_, mine), (_, theirs) in zip(here, ahead):
        assert len(mine) == len(theirs) == 2
        for a, b in zip(mine, theirs):
            for field in ("input_ids", "targets", "weights", "position_ids", "attention_mask", "task_ids"):
                np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
            assert a.sample_ids == b.sample_ids
    # Part rank x accum + micro of a step: rank 1's second micro step is part 3.
    assert batches.batch(4, 2 * 1 + 1).sample_ids == here[1][1][1].sample_ids
