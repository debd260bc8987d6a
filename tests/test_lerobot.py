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


def test_import_lerobot_makes_a_store_of_its_episodes(tmp_path):
    """`data import-lerobot`: every episode's actions, states, task and frames (resized to --size) in an episode
    store with the dataset's fps and statistics, its own held-out split, written all at once."""
    from unified.data.lerobot import _resize, import_lerobot
    from unified.data.store import EpisodeStore, data_info

    info = import_lerobot(FIXTURE, out=tmp_path / "store", size="32x40", held_out_every=3, progress=False)
    store = EpisodeStore(tmp_path / "store")
    dataset = LeRobotDataset(FIXTURE)
    assert store.imported and info["episodes"] == 3 and info["steps"] == sum(make_fixture.LENGTHS)
    assert info["fps"] == 10 and info["image_shape"] == [32, 40, 3]
    assert store.action_names == ["throttle", "steer"] and store.state_names == ["x", "cos", "ramp"]
    assert info["imported_from"]["stats"]["action"] == dataset.stats["action"]  # LeRobot's statistics kept
    assert store.train_indices() == [0, 1] and store.held_out_indices() == [2]
    for k in range(3):
        ours, theirs = store.read_episode(k), dataset.episode(k)
        np.testing.assert_array_equal(ours.actions, theirs.actions)
        np.testing.assert_array_equal(ours.states, theirs.states)
        assert ours.instruction == theirs.task == make_fixture.TASKS[k % 2]
        np.testing.assert_array_equal(ours.frames, _resize(theirs.frames, (32, 40)))  # PNG: lossless
    # Statistics over the training episodes only, as in every store.
    train_actions = np.concatenate([dataset.episode(k).actions for k in (0, 1)])
    np.testing.assert_allclose(info["action_stats"]["mean"], train_actions.mean(0), rtol=1e-5)
    assert data_info(tmp_path / "store")["imported_from"]["camera"] == "observation.images.front"
    with pytest.raises(UnifiedError, match="already holds an episode store; pass --overwrite"):
        import_lerobot(FIXTURE, out=tmp_path / "store", progress=False)
    with pytest.raises(UnifiedError, match="lies inside the input"):
        import_lerobot(FIXTURE, out=FIXTURE / "store", progress=False)
    with pytest.raises(UnifiedError, match=r"--state 'pose': not a feature"):
        import_lerobot(FIXTURE, out=tmp_path / "other", state="pose", progress=False)
    assert not (tmp_path / "other").exists()
    with pytest.raises(UnifiedError, match="a LeRobot dataset, not an episode store; import it once"):
        EpisodeStore(FIXTURE)  # what every command that reads a store says when given the dataset itself
    with pytest.raises(UnifiedError, match="--size"):
        import_lerobot(FIXTURE, out=tmp_path / "other", size="64", progress=False)


def test_an_imported_store_trains_and_fine_tunes_with_its_own_widths(tmp_path):
    """A 3-value action (the fixture's state read as the action, and its action as the state): tokenizers fitted on
    the imported store, shards of the policy and world tasks, recipes/finetune.yaml through the DeepSpeed launcher
    from a model with those tokenizers, and a policy that answers 3-value chunks. Reasons are refused (none were
    recorded), and tokenizers of another width are refused by name."""
    import subprocess
    import sys

    import torch
    from unified.tokenizers.fit import Tokenizers, fit

    from unified.data.lerobot import import_lerobot
    from unified.data.tokenize import tokenize
    from unified.model import ModelConfig, UnifiedModel
    from unified.model_dir import save_model
    from unified.policy import Policy

    import_lerobot(FIXTURE, out=tmp_path / "store", action="observation.state", state="action", size="32x32",
                   held_out_every=3, progress=False)
    fit(data=tmp_path / "store", out=tmp_path / "tok", image_steps=2, image_batch=8, horizon=4, fast_vocab=700,
        progress=False)
    with pytest.raises(UnifiedError, match="imported .* records no reasons; use --tasks policy,world"):
        tokenize(data=tmp_path / "store", tokenizer=tmp_path / "tok", out=tmp_path / "shards", horizon=4,
                 progress=False)
    tokenize(data=tmp_path / "store", tokenizer=tmp_path / "tok", out=tmp_path / "shards", horizon=4,
             tasks="policy,world", progress=False)
    import_lerobot(FIXTURE, out=tmp_path / "other", size="32x32", progress=False)  # 2 action values, 3 state
    with pytest.raises(UnifiedError, match="records 2 action values .* tokenizer .* reads 3"):
        tokenize(data=tmp_path / "other", tokenizer=tmp_path / "tok", out=tmp_path / "x", horizon=4,
                 tasks="policy,world", progress=False)

    tokenizers = Tokenizers.from_pretrained(tmp_path / "tok")
    torch.manual_seed(0)
    start = UnifiedModel(ModelConfig(hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128,
                                     max_position_embeddings=256, horizon=4, action_dim=3), tokenizers.layout)
    save_model(start, tokenizers, tmp_path / "start")
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run(
        [str(Path(sys.executable).parent / "unified"), "train", "--recipe", str(root / "recipes" / "finetune.yaml"),
         "--ranks", "2", f"run_dir={tmp_path / 'run'}", f"data={tmp_path / 'shards'}",
         f"init_from={tmp_path / 'start'}",
         "data.tasks={policy: 1.0, world: 1.0}", "model.hidden_size=64", "model.num_layers=2", "model.num_heads=4",
         "model.intermediate_size=128", "model.max_position_embeddings=256", "model.horizon=4", "data.seq_len=256",
         "data.batch_size=2", "steps=3", "save_every=3", "sample_every=0"],
        capture_output=True, text=True, timeout=600, cwd=root)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    subprocess.run([str(Path(sys.executable).parent / "unified"), "export", "--checkpoint", str(tmp_path / "run"),
                    "--out", str(tmp_path / "model")], check=True, capture_output=True, cwd=root)
    policy = Policy.from_pretrained(tmp_path / "model")
    from unified.data.store import EpisodeStore

    episode = EpisodeStore(tmp_path / "store").read_episode(2)
    result = policy.act(episode.frames[:1], episode.instruction, state=episode.states[0])
    assert result.actions.shape == (4, 3) and np.isfinite(result.actions).all()
