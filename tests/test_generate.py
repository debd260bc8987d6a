import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from unified.data.generate import generate
from unified.data.store import EpisodeStore
from unified.errors import UnifiedError
from unified.sim import env as sim_env
from unified.sim.seeds import data_seed

UNIFIED = str(Path(sys.executable).parent / "unified")


def start(suite: Path, out: Path, episodes: int, workers: int) -> subprocess.Popen:
    return subprocess.Popen(
        [UNIFIED, "data", "generate", "--suite", str(suite), "--episodes", str(episodes), "--out", str(out),
         "--workers", str(workers)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )


def wait_for_episodes(out: Path, n: int, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if (out / "episodes").is_dir() and len(list((out / "episodes").glob("episode_*.parquet"))) >= n:
            return
        if process.poll() is not None:
            raise AssertionError(f"generator ended early: {process.communicate()}")
        time.sleep(0.05)
    raise AssertionError("generator made no progress")


def check_complete(out: Path, episodes: int) -> None:
    store = EpisodeStore(out)
    assert store.indices() == list(range(episodes))  # nothing missing, nothing twice
    assert not list((out / "episodes").glob(".*"))  # no temporary leftovers
    assert store.info["episodes"] == episodes
    for index in store.indices():
        episode = store.read_episode(index, frames=False)  # every file complete and readable
        assert episode.index == index and episode.seed == data_seed(0, index)


@pytest.mark.slow
def test_sigkill_midway_then_rerun_resumes(tiny_suite, tmp_path):
    out = tmp_path / "data"
    process = start(tiny_suite, out, episodes=16, workers=2)
    wait_for_episodes(out, 3, process)
    os.killpg(process.pid, signal.SIGKILL)  # the generator and its workers, mid-episode
    process.wait()
    killed_with = len(list((out / "episodes").glob("episode_*.parquet")))
    assert 3 <= killed_with < 16
    rerun = subprocess.run(
        [UNIFIED, "data", "generate", "--suite", str(tiny_suite), "--episodes", "16", "--out", str(out)],
        capture_output=True, text=True,
    )
    assert rerun.returncode == 0, rerun.stderr
    assert f"{killed_with} episode(s) already stored, {16 - killed_with} to generate" in rerun.stdout
    check_complete(out, 16)


@pytest.mark.slow
def test_ctrl_c_leaves_a_valid_store(tiny_suite, tmp_path):
    out = tmp_path / "data"
    process = start(tiny_suite, out, episodes=40, workers=2)
    wait_for_episodes(out, 2, process)
    os.killpg(process.pid, signal.SIGINT)  # what Ctrl-C in a terminal sends
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr
    assert "interrupted" in stderr and "Traceback" not in stderr
    store = EpisodeStore(out)
    n = len(store.indices())
    assert store.info["episodes"] == n and n < 40  # info written on the way out
    assert not list((out / "episodes").glob(".*"))
    generate(suite=tiny_suite, episodes=n + 2, out=out, progress=False)
    check_complete(out, n + 2)


def test_same_episodes_whatever_the_worker_count(tiny_suite, tmp_path):
    generate(suite=tiny_suite, episodes=4, out=tmp_path / "one", workers=1, progress=False)
    generate(suite=tiny_suite, episodes=4, out=tmp_path / "two", workers=2, progress=False)
    one, two = EpisodeStore(tmp_path / "one"), EpisodeStore(tmp_path / "two")
    for i in range(4):
        a, b = one.read_episode(i), two.read_episode(i)
        np.testing.assert_array_equal(a.actions, b.actions)
        np.testing.assert_array_equal(a.frames, b.frames)


def test_blank_frames_are_refused(tiny_suite, tmp_path, monkeypatch):
    class BlackEnv:
        def render(self):
            return np.zeros((32, 32, 3), np.uint8)

    with pytest.raises(UnifiedError, match="blank frame.*SDL_VIDEODRIVER"):
        sim_env.render_frame(BlackEnv(), "step 0")


def test_dummy_video_driver_is_unset_before_rendering(tiny_suite, tmp_path, monkeypatch):
    monkeypatch.setenv("SDL_VIDEODRIVER", "dummy")
    generate(suite=tiny_suite, episodes=1, out=tmp_path / "data", progress=False)
    frames = EpisodeStore(tmp_path / "data").read_episode(0).frames
    assert frames.mean() > 20 and "SDL_VIDEODRIVER" not in os.environ


def test_bad_arguments(tiny_suite, tmp_path):
    with pytest.raises(UnifiedError, match="--episodes"):
        generate(suite=tiny_suite, episodes=0, out=tmp_path / "d", progress=False)
    with pytest.raises(UnifiedError, match="no such file"):
        generate(suite=tmp_path / "nope.yaml", episodes=1, out=tmp_path / "d", progress=False)


def test_an_episode_does_not_depend_on_the_episodes_run_before_it(tiny_suite, tmp_path):
    """highway-env's intersection env changes the IDM driver model of every later episode in its process; each
    episode starts from the library's values, so the same episodes come out before and after an intersection."""
    from highway_env.vehicle.behavior import IDMVehicle

    from unified.sim.drivers import ExpertDriver
    from unified.sim.rollout import IDM_DEFAULTS, run_episode
    from unified.sim.suite import suite_from_dict

    generate(suite=tiny_suite, episodes=4, out=tmp_path / "before", workers=1, progress=False)
    junction = suite_from_dict({"scenarios": {"turn": {"env": "intersection-v0", "destination": "o3",
                                                       "instructions": ["Turn right."], "max_steps": 5}}})
    run_episode(junction, junction.scenarios["turn"], ExpertDriver(), seed=4, render=False)
    assert IDM_DEFAULTS["COMFORT_ACC_MIN"] != IDMVehicle.COMFORT_ACC_MIN  # what the intersection leaves behind
    generate(suite=tiny_suite, episodes=4, out=tmp_path / "after", workers=1, progress=False)
    before, after = EpisodeStore(tmp_path / "before"), EpisodeStore(tmp_path / "after")
    for i in range(4):
        np.testing.assert_array_equal(before.read_episode(i).actions, after.read_episode(i).actions)
        np.testing.assert_array_equal(before.read_episode(i).states, after.read_episode(i).states)
