"""Reading a LeRobot v3 dataset written by LeRobot's own writer (tests/fixtures/lerobot_v3, made by
tests/fixtures/make_lerobot_fixture.py with lerobot 0.4.4): every episode, action, state, task and frame."""

import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from unified.data.lerobot import LeRobotDataset
from unified.errors import UnifiedError

FIXTURE = Path(__file__).parent / "fixtures" / "lerobot_v3"
spec = importlib.util.spec_from_file_location("make_fixture", Path(__file__).parent / "fixtures" /
                                              "make_lerobot_fixture.py")
make_fixture = importlib.util.module_from_spec(spec)
spec.loader.exec_module(make_fixture)


def test_every_episode_reads_back_as_lerobot_wrote_it():
    dataset = LeRobotDataset(FIXTURE)
    assert len(dataset) == 3 and dataset.fps == 10 and dataset.camera == "observation.images.front"
    assert dataset.stats["action"]["mean"] and set(dataset.tasks.values()) == set(make_fixture.TASKS)
    for k, length in enumerate(make_fixture.LENGTHS):
        episode = dataset.episode(k)
        truth = [make_fixture.expected(k, t) for t in range(length)]
        assert episode.index == k and episode.task == make_fixture.TASKS[k % 2]
        np.testing.assert_allclose(episode.actions, [f["action"] for f in truth], rtol=1e-6)
        np.testing.assert_allclose(episode.states, [f["observation.state"] for f in truth], rtol=1e-6)
        np.testing.assert_allclose(episode.timestamps, np.arange(length) / 10, atol=1e-6)
        # The frames come from an AV1 video: lossy, but each is its own frame, in order (the red square moves
        # 3 pixels a frame; its left edge is found within a pixel, and the episode's background colour holds).
        assert episode.frames.shape == (length, 48, 64, 3) and episode.frames.dtype == np.uint8
        for t, frame in enumerate(episode.frames):
            image = truth[t]["observation.images.front"]
            assert np.abs(frame.astype(int) - image).mean() < 8, (k, t)
            red = np.flatnonzero(frame[24, :, 0] > 115)
            assert abs(red[0] - (4 + 3 * t)) <= 1, (k, t, red)


def test_malformed_datasets_are_refused_with_the_file_and_field(tmp_path):
    with pytest.raises(UnifiedError, match="not a LeRobot dataset"):
        LeRobotDataset(tmp_path)
    copy = tmp_path / "copy"
    shutil.copytree(FIXTURE, copy)
    with pytest.raises(UnifiedError, match=r"--camera 'wrist': not a feature .* \(it has observation.images.front\)"):
        LeRobotDataset(copy, camera="wrist")
    with pytest.raises(UnifiedError, match=r"--action 'act': not a feature .*it has observation.state, action"):
        LeRobotDataset(copy, action="act")
    info = json.loads((copy / "meta" / "info.json").read_text())
    (copy / "meta" / "info.json").write_text(json.dumps(info | {"codebase_version": "v2.1"}))
    with pytest.raises(UnifiedError, match="codebase_version 'v2.1'; only LeRobot v3"):
        LeRobotDataset(copy)
    (copy / "meta" / "info.json").write_text(json.dumps(info))
    video = next((copy / "videos").rglob("*.mp4"))
    video.write_bytes(video.read_bytes()[:200])
    with pytest.raises(UnifiedError, match="file-000.mp4: (holds no video stream|cannot decode the video)"):
        LeRobotDataset(copy).episode(0)


def test_a_store_exported_as_lerobot_reads_back(tiny_store, tmp_path):
    """`data export-lerobot` writes what the reader above (checked against LeRobot's writer) reads back: every
    episode's actions, states and instruction exactly, its frames through the AV1 video. (LeRobot 0.4.4's own
    LeRobotDataset loads such an export too: tests/fixtures/check_export_with_lerobot.py, run by hand.)"""
    from unified.data.lerobot import export_lerobot
    from unified.data.store import EpisodeStore

    store = EpisodeStore(tiny_store)
    info = export_lerobot(data=tiny_store, out=tmp_path / "lr", progress=False)
    assert info["codebase_version"] == "v3.0" and info["total_episodes"] == len(store.indices())
    dataset = LeRobotDataset(tmp_path / "lr")
    assert len(dataset) == len(store.indices()) and dataset.fps == store.info["fps"]
    assert dataset.features["observation.state"]["names"] == store.info["state_names"]
    for k, index in enumerate(store.indices()):
        mine, theirs = store.read_episode(index), dataset.episode(k)
        np.testing.assert_array_equal(theirs.actions, mine.actions)
        np.testing.assert_array_equal(theirs.states, mine.states)
        assert theirs.task == mine.instruction and theirs.frames.shape == mine.frames.shape
        assert np.abs(theirs.frames.astype(int) - mine.frames).mean() < 3
    exported = json.loads((tmp_path / "lr" / "meta" / "unified_export.json").read_text())
    assert exported["store_indices"] == store.indices()
    assert [store.indices()[k] for k in exported["held_out_episodes"]] == \
        [i for i in store.indices() if store.is_held_out(i)]
    # Its statistics are LeRobot's: per feature min ... q99 over every frame.
    stats = json.loads((tmp_path / "lr" / "meta" / "stats.json").read_text())
    actions = np.concatenate([store.read_episode(i).actions for i in store.indices()])
    np.testing.assert_allclose(stats["action"]["mean"], actions.mean(0), rtol=1e-5)
    assert stats["action"]["count"] == [len(actions)] and len(stats["observation.images.front"]["mean"]) == 3
    # A second export needs --overwrite; a directory that is not an export is refused, untouched.
    with pytest.raises(UnifiedError, match="pass --overwrite"):
        export_lerobot(data=tiny_store, out=tmp_path / "lr", progress=False)
    with pytest.raises(UnifiedError, match="is the input"):
        export_lerobot(data=tiny_store, out=tiny_store, progress=False)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(UnifiedError, match="holds notes.txt"):
        export_lerobot(data=tiny_store, out=tmp_path / "mine", progress=False)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"
