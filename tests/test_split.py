"""The held-out split: stratified per scenario, recorded in the store, stable as the store grows, honoured by
everything that trains (no held-out episode reaches a training batch) and read by everything that reports
"held out"; simulator seeds of data and evaluation that can never coincide."""

import json

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from unified.batches import MixtureBatches
from unified.data.generate import generate
from unified.data.shards import TokenShards
from unified.data.split import HeldOutRule
from unified.data.store import EpisodeStore
from unified.data.tokenize import tokenize
from unified.errors import UnifiedError
from unified.sim.seeds import EVALUATION_BIT, data_seed, evaluation_seed, is_evaluation_seed
from unified.sim.suite import load_suite

# Three scenarios that alternate (a rule on the index alone, index % 10 == 9, picks one scenario of two that alternate).
ALTERNATING = """\
name: alternating
image_size: [32, 32]
scenarios:
  highway:
    env: highway-v0
    config: {lanes_count: 2, vehicles_count: 5, duration: 20}
    max_steps: 8
  merge:
    env: merge-v0
    max_steps: 8
  two_way:
    env: two-way-v0
    max_steps: 8
"""


@pytest.fixture(scope="module")
def alternating(tmp_path_factory):
    """12 episodes (4 per scenario), every 2nd of each scenario held out; tokenizers fitted, shards written."""
    from unified.tokenizers.fit import fit

    root = tmp_path_factory.mktemp("split")
    (root / "suite.yaml").write_text(ALTERNATING)
    generate(suite=root / "suite.yaml", episodes=12, out=root / "store", held_out_every=2, progress=False)
    fit(data=root / "store", out=root / "tok", image_steps=20, horizon=4, text_vocab=300, fast_vocab=600,
        progress=False)
    tokenize(data=root / "store", tokenizer=root / "tok", out=root / "shards", horizon=4,
             tasks="policy_reason,policy,world", progress=False)
    return root


def test_every_scenario_contributes_held_out_episodes(alternating):
    store = EpisodeStore(alternating / "store")
    held = store.held_out_indices()
    scenarios = {store.episode_meta(i)["scenario"] for i in held}
    assert scenarios == {"highway", "merge", "two_way"}
    assert held == [3, 4, 5, 9, 10, 11]  # the 2nd and 4th episode of each scenario
    split = json.loads((alternating / "store" / "meta" / "info.json").read_text())["split"]
    assert split["held_out"] == {"highway": [3, 9], "merge": [4, 10], "two_way": [5, 11]}
    assert split["train_episodes"] == 6 and split["held_out_episodes"] == 6
    assert store.held_out_indices(stratified=True)[:3] == [3, 4, 5]  # the first three cover every scenario


def test_no_held_out_episode_reaches_a_training_batch(alternating):
    store = EpisodeStore(alternating / "store")
    held = set(store.held_out_indices())
    shards = TokenShards(alternating / "shards")
    # The shards carry the held-out episodes (for a validation loss), flagged; no training row comes from them.
    assert set(shards.meta["held_out_episodes"]) == held
    for task in ("policy_reason", "policy", "world"):
        rows = shards.index(task)
        assert len(rows) and not set(shards.arrays["episode"][rows].tolist()) & held
        # A world sample reads the frame H steps later: still within the same (training) episode.
        assert not set(shards.arrays["episode"][rows + (4 if task == "world" else 3)].tolist()) & held
        assert set(shards.arrays["episode"][shards.index(task, "held_out")].tolist()) <= held
    batches = MixtureBatches(shards, {"policy_reason": 1.0, "policy": 1.0, "world": 1.0}, 256, 2, seed=0)
    seen = set()
    for step in range(40):
        for rank in range(2):
            seen |= {int(i.split()[1]) for row in batches.batch(step, rank).sample_ids for i in row}
    assert seen and not seen & held
    # Nor did fitting the tokenizers read them (frames, actions, texts), nor the normalisation statistics.
    fit_info = json.loads((alternating / "tok" / "fit.json").read_text())
    assert fit_info["held_out_indices"] == sorted(held) and fit_info["fit_episodes"] == 6
    train_actions = np.concatenate([store.read_episode(i, frames=False).actions for i in store.train_indices()])
    np.testing.assert_allclose(store.info["action_stats"]["q99"], np.quantile(train_actions, 0.99, axis=0),
                               rtol=1e-5)
    assert store.info["stats_over"] == "training episodes"


def test_the_split_of_an_episode_never_changes_as_the_store_grows(tmp_path):
    suite = load_suite_text(tmp_path, ALTERNATING)
    rule = HeldOutRule(3)
    first = [i for i in range(30) if rule.is_held_out(suite, i)]
    assert [i for i in range(300) if rule.is_held_out(suite, i)][:len(first)] == first
    counts = {name: sum(suite.scenario_for_episode(i).name == name for i in first) for name in suite.scenarios}
    assert counts == {"highway": 3, "merge": 3, "two_way": 3}


def test_a_store_refuses_another_held_out_rule_and_a_negative_seed(tmp_path):
    (tmp_path / "suite.yaml").write_text(ALTERNATING)
    suite = load_suite(tmp_path / "suite.yaml")
    EpisodeStore.create(tmp_path / "s", suite, seed=0, held_out_every=10)
    with pytest.raises(UnifiedError, match="--held-out-every 10"):
        EpisodeStore.create(tmp_path / "s", suite, seed=0, held_out_every=5)
    with pytest.raises(UnifiedError, match="--seed must be 0 or more"):
        generate(suite=tmp_path / "suite.yaml", episodes=1, out=tmp_path / "neg", seed=-1, progress=False)
    assert not (tmp_path / "neg").exists()  # nothing left behind that would refuse --seed 0 later


def test_an_evaluation_only_store_holds_out_everything(tmp_path):
    (tmp_path / "suite.yaml").write_text(ALTERNATING)
    generate(suite=tmp_path / "suite.yaml", episodes=3, out=tmp_path / "ood", held_out_every=1, progress=False)
    store = EpisodeStore(tmp_path / "ood")
    assert store.held_out_indices() == [0, 1, 2] and store.train_indices() == []


@given(st.integers(0, 2**31 - 1), st.integers(0, 10**6), st.integers(0, 50), st.integers(0, 10**4))
def test_data_and_evaluation_seeds_never_coincide(seed, index, scenario, episode):
    a, b = data_seed(seed, index), evaluation_seed(seed, scenario, episode)
    assert a != b and not is_evaluation_seed(a) and is_evaluation_seed(b)
    assert 0 <= a < EVALUATION_BIT <= b < 2**31


def load_suite_text(tmp_path, text):
    path = tmp_path / "suite.yaml"
    path.write_text(text)
    return load_suite(path)
