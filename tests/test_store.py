import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from unified.data.store import SCHEMA, EpisodeStore
from unified.errors import UnifiedError
from unified.sim.drivers import ExpertDriver
from unified.sim.env import make_env
from unified.sim.rollout import run_episode
from unified.sim.suite import load_suite


def test_round_trip_of_a_stored_episode(tiny_suite, tmp_path):
    suite = load_suite(tiny_suite)
    scenario = suite.scenarios["merge"]
    episode = run_episode(suite, scenario, ExpertDriver(), seed=7, index=3, env=make_env(suite, scenario))
    store = EpisodeStore.create(tmp_path / "store", suite, seed=0)
    store.write_episode(episode)
    back = EpisodeStore(tmp_path / "store").read_episode(3)
    assert back.frames.dtype == np.uint8 and back.frames.shape == (episode.summary.steps, 32, 32, 3)
    np.testing.assert_array_equal(back.frames, episode.frames)  # PNG is lossless
    np.testing.assert_array_equal(back.actions, episode.actions)
    np.testing.assert_array_equal(back.states, episode.states)
    assert (back.index, back.scenario, back.seed, back.instruction) == (3, "merge", 7, episode.instruction)
    assert back.summary == episode.summary
    for a, b in zip(back.causation, episode.causation):
        assert (a.critical_id, a.cause, a.decision, a.text) == (b.critical_id, b.cause, b.decision, b.text)
        np.testing.assert_array_equal(a.critical_position, b.critical_position)


def test_store_is_plain_parquet_with_documented_schema(tiny_store):
    files = sorted((tiny_store / "episodes").glob("*.parquet"))
    table = pq.read_table(files[0])
    assert table.schema.remove_metadata().equals(SCHEMA)
    assert table.column("frame_index").to_pylist() == list(range(table.num_rows))
    assert set(table.column("decision").to_pylist()) <= {
        "keep lane", "slow down", "accelerate", "change left", "change right", "yield"}


def test_info_counts_and_stats_match_the_files(tiny_store):
    info = json.loads((tiny_store / "meta" / "info.json").read_text())
    store = EpisodeStore(tiny_store)
    actions = np.concatenate([e.actions for e in store.iter_episodes(frames=False)])
    assert info["episodes"] == 4 and info["steps"] == len(actions)
    assert sum(s["episodes"] for s in info["scenarios"].values()) == 4
    np.testing.assert_allclose(info["action_stats"]["q99"], np.quantile(actions, 0.99, axis=0), rtol=1e-5)
    np.testing.assert_allclose(info["action_stats"]["mean"], actions.mean(0), rtol=1e-5, atol=1e-6)
    assert info["image_shape"] == [32, 32, 3] and info["fps"] == 5


def test_a_directory_that_is_not_a_store(tmp_path):
    with pytest.raises(UnifiedError, match="not an episode store"):
        EpisodeStore(tmp_path)
    with pytest.raises(UnifiedError, match="no such directory"):
        EpisodeStore(tmp_path / "missing")


def test_corrupted_info_is_named(tmp_path, tiny_store):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(tiny_store, copy)
    (copy / "meta" / "info.json").write_text("{not json")
    with pytest.raises(UnifiedError, match=r"meta/info.json: corrupted"):
        EpisodeStore(copy)


def test_truncated_episode_file_is_named(tmp_path, tiny_store):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(tiny_store, copy)
    victim = copy / "episodes" / "episode_000002.parquet"
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    store = EpisodeStore(copy)
    with pytest.raises(UnifiedError, match=r"episode_000002.parquet: corrupted or truncated"):
        store.read_episode(2)
    with pytest.raises(UnifiedError, match=r"episode_000002.parquet: corrupted or truncated"):
        store.refresh_info()


def test_a_store_refuses_another_suite(tiny_suite, tmp_path):
    suite = load_suite(tiny_suite)
    EpisodeStore.create(tmp_path / "s", suite, seed=0)
    with pytest.raises(UnifiedError, match="seed 1"):
        EpisodeStore.create(tmp_path / "s", suite, seed=1)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(UnifiedError, match="not an episode store"):
        EpisodeStore.create(tmp_path / "other", suite, seed=0)


def test_a_store_of_the_previous_format_is_refused_naming_the_state(tmp_path, tiny_store):
    import json
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(tiny_store, copy)
    info = json.loads((copy / "meta" / "info.json").read_text())
    (copy / "meta" / "info.json").write_text(json.dumps(info | {"format_version": 2, "state_names": ["speed"] * 19}))
    with pytest.raises(UnifiedError, match=r"format_version 2: an ego state of 19 values without the navigation route"):
        EpisodeStore(copy)
    (copy / "meta" / "info.json").write_text(json.dumps(info | {"format_version": 3}))
    with pytest.raises(UnifiedError, match=r"format_version 3: .* not the lane the expert steers for"):
        EpisodeStore(copy)
    (copy / "meta" / "info.json").write_text(json.dumps(info | {"state_names": ["speed"] * 21}))
    with pytest.raises(UnifiedError, match=r"info.json: state_names \['speed'"):
        EpisodeStore(copy)
