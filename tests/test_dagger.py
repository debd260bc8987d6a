"""`unified data dagger`: a learner drives, the expert labels every state it visits, episodes are appended to
the store; resumable after SIGKILL, refuses a store of another suite, and the labels are the expert's own."""

import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from unified.data.dagger import ROUND_STRIDE, dagger
from unified.data.store import EpisodeStore
from unified.errors import UnifiedError

BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def learner(model_data, tmp_path_factory) -> Path:
    """An untrained tiny policy: it drives badly, which is what DAgger is for."""
    from unified.tokenizers.fit import Tokenizers

    from unified.model import ModelConfig, UnifiedModel
    from unified.model_dir import save_model

    torch.manual_seed(0)
    tokenizers = Tokenizers.from_pretrained(model_data / "tok")
    model = UnifiedModel(ModelConfig(hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128,
                                     max_position_embeddings=256, horizon=4), tokenizers.layout)
    out = tmp_path_factory.mktemp("learner") / "model"
    save_model(model, tokenizers, out)
    return out


@pytest.fixture
def store(model_data, tmp_path) -> Path:
    import shutil

    shutil.copytree(model_data / "store", tmp_path / "store")
    return tmp_path / "store"


def test_the_recorded_labels_are_what_the_expert_computes_on_the_learners_states(learner, store, model_data):
    report = dagger(model=learner, out=store, episodes=2, suite=model_data / "suite.yaml", replan_every=2,
                    progress=False)
    assert report["episodes"] == 2 and report["labelled_steps"] > 0
    from unified.sim.drivers import ExpertDriver
    from unified.sim.env import make_env, to_env_action
    from unified.sim.rollout import start_episode

    s = EpisodeStore(store)
    assert s.indices()[-2:] == [ROUND_STRIDE, ROUND_STRIDE + 1]
    suite = s.suite
    for index in (ROUND_STRIDE, ROUND_STRIDE + 1):
        meta = s.episode_meta(index)
        episode = s.read_episode(index, frames=False)
        executed = np.asarray(meta["source"]["executed"], np.float32)
        assert meta["driver"] == "dagger" and meta["source"]["round"] == 1 and len(executed) == len(episode.actions)
        # Replay the learner's drive from the same seed, asking a fresh expert at every state it reached.
        scenario = suite.scenarios[episode.scenario]
        env = make_env(suite, scenario, render=False)
        start_episode(env, suite, scenario, episode.seed)
        expert = ExpertDriver()
        expert.reset(env, scenario, episode.seed)
        for t in range(len(episode.actions)):
            np.testing.assert_allclose(expert.act(env).action, episode.actions[t], atol=1e-5)
            env.step(to_env_action(executed[t]))
        # The learner, not the expert, drove: the executed actions are not the labels.
        assert not np.allclose(executed, episode.actions, atol=1e-3)


def test_the_learner_drives_with_the_readout_and_plan_schedule_it_is_given(learner, store, model_data):
    """`--readout mean --no-ensemble --replan-every 1`, as `eval closed-loop` drives: replaying the episode with a
    driver built so reproduces what was executed, and one reading the mode does not."""
    dagger(model=learner, out=store, episodes=1, suite=model_data / "suite.yaml", replan_every=1, no_ensemble=True,
           readout="mean", round=3, progress=False)
    from unified.eval.model_driver import ModelDriver

    from unified.policy import Policy
    from unified.sim.env import make_env, to_env_action
    from unified.sim.rollout import start_episode

    s = EpisodeStore(store)
    meta = s.episode_meta(3 * ROUND_STRIDE)
    assert meta["source"]["readout"] == "mean" and meta["source"]["ensemble"] is None
    assert meta["source"]["replan_every"] == 1
    episode = s.read_episode(3 * ROUND_STRIDE, frames=False)
    executed = np.asarray(meta["source"]["executed"], np.float32)
    policy = Policy.from_pretrained(learner)
    scenario = s.suite.scenarios[episode.scenario]
    replayed = {}
    for readout in ("mean", "mode"):
        env = make_env(s.suite, scenario, render=True)
        start_episode(env, s.suite, scenario, episode.seed)
        driver = ModelDriver(policy, "direct", 1, None, readout)
        driver.reset(env, scenario, episode.seed)
        replayed[readout] = []
        for t in range(min(4, len(executed))):
            replayed[readout].append(driver.action(env))
            env.step(to_env_action(executed[t]))
    n = len(replayed["mean"])
    np.testing.assert_allclose(np.stack(replayed["mean"]), executed[:n], atol=1e-5)
    assert not np.allclose(np.stack(replayed["mode"]), executed[:n], atol=1e-4)


def test_a_store_of_another_suite_is_refused(learner, store, tmp_path):
    other = tmp_path / "other.yaml"
    other.write_text("name: other\nscenarios:\n  merge:\n    env: merge-v0\n    max_steps: 5\n")
    with pytest.raises(UnifiedError, match="not of .*other.yaml; DAgger labels states of the suite"):
        dagger(model=learner, out=store, episodes=1, suite=other, progress=False)
    with pytest.raises(UnifiedError, match="--beta is a probability"):
        dagger(model=learner, out=store, episodes=1, beta=1.5, progress=False)


@pytest.mark.slow
def test_sigkill_then_rerun_completes_the_round(learner, store):
    command = [str(BIN / "unified"), "data", "dagger", "--model", str(learner), "--out", str(store),
               "--episodes", "8", "--round", "2"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True)
    episodes = store / "episodes"
    deadline = time.time() + 300
    while time.time() < deadline and not list(episodes.glob("episode_2*.parquet")):
        assert process.poll() is None, process.stdout.read()[-2000:]
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    before = len(list(episodes.glob("episode_2*.parquet")))
    assert 1 <= before < 8, "the round finished before it could be killed"
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert f"{before} episode(s) already labelled, {8 - before} to drive" in result.stdout
    s = EpisodeStore(store)
    assert [i for i in s.indices() if i >= 2 * ROUND_STRIDE] == [2 * ROUND_STRIDE + i for i in range(8)]
    assert not list(episodes.glob(".*")) and s.info["episodes"] == 10 + 8
    # Another model may not continue a round it did not start.
    other = learner.parent / "other"
    import shutil

    shutil.copytree(learner, other)
    from safetensors.torch import load_file, save_file

    from unified.model_dir import write_manifest

    weights = load_file(other / "model.safetensors")
    weights["model.norm.weight"] = weights["model.norm.weight"] * 2
    save_file(weights, other / "model.safetensors", metadata={"format": "pt"})
    write_manifest(other)
    with pytest.raises(UnifiedError, match="round 2 was driven by another model"):
        dagger(model=other, out=store, episodes=9, round=2, progress=False)
