"""The state-only behaviour-cloning baseline: trained on training episodes only, learns, drives, refuses bad paths."""

import json

import numpy as np
import pytest
from unified.eval.closed_loop import closed_loop
from unified.eval.state_mlp import StateMLP, fit_state_mlp

from unified.data.store import EpisodeStore
from unified.errors import UnifiedError


def _labels(store: EpisodeStore, indices, horizon: int = 1):
    from unified.eval.state_mlp import _chunks

    episodes = [store.read_episode(i, frames=False) for i in indices]
    return (np.concatenate([e.states for e in episodes]),
            np.concatenate([_chunks(e.actions, horizon) for e in episodes]))


def test_fits_the_training_episodes_only_and_learns_them(split_store, tmp_path):
    store = EpisodeStore(split_store)
    assert store.held_out_indices() and store.train_indices()
    config = fit_state_mlp(data=split_store, out=tmp_path / "mlp", steps=400, batch_size=32, progress=False)
    assert config["trained_on"] == store.train_indices()
    assert not set(config["trained_on"]) & set(store.held_out_indices())
    saved = json.loads((tmp_path / "mlp" / "state_mlp.json").read_text())
    assert saved["trained_on"] == config["trained_on"] and saved["samples"] == sum(
        len(store.read_episode(i, frames=False).actions) for i in store.train_indices())
    # It learned its training labels: its L1 error is well below that of the best constant (the median).
    mlp = StateMLP.load(tmp_path / "mlp")
    states, chunks = _labels(store, store.train_indices())
    predicted = np.stack([mlp.plan(s) for s in states])
    assert predicted.shape == chunks.shape
    error = np.abs(predicted - chunks).mean(axis=(0, 1))
    constant = np.abs(chunks - np.median(chunks, axis=0)).mean(axis=(0, 1))
    assert error[0] < 0.5 * constant[0], (error, constant)


def test_bins_decode_to_bin_centres_within_the_recorded_range(tiny_store, tmp_path):
    config = fit_state_mlp(data=tiny_store, out=tmp_path / "mlp", horizon=3, bins=16, steps=50, batch_size=16,
                           progress=False)
    mlp = StateMLP.load(tmp_path / "mlp")
    low, high = np.asarray(config["action_low"]), np.asarray(config["action_high"])
    store = EpisodeStore(tiny_store)
    states, chunks = _labels(store, store.train_indices(), horizon=3)
    plan = mlp.plan(states[0])
    assert plan.shape == (3, 2) and (plan >= low).all() and (plan <= high).all()
    bins = (plan - low) / (high - low) * 16 - 0.5  # the index of a bin centre: a whole number
    np.testing.assert_allclose(bins, np.round(bins), atol=1e-6)
    # Every training label falls in a bin whose centre is within half a bin of it.
    targets = mlp.targets(chunks)
    centres = low + (targets + 0.5) / 16 * (high - low)
    assert (np.abs(centres - chunks) <= (high - low) / 32 + 1e-6).all()


def test_refuses_to_write_over_its_store_or_a_directory_of_another_kind(tiny_store, tmp_path):
    with pytest.raises(UnifiedError, match="--out"):
        fit_state_mlp(data=tiny_store, out=tiny_store, steps=1, progress=False)
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "thesis.txt").write_text("a week of work")
    with pytest.raises(UnifiedError):
        fit_state_mlp(data=tiny_store, out=tmp_path / "notes", steps=1, progress=False)
    assert (tmp_path / "notes" / "thesis.txt").read_text() == "a week of work"
    fit_state_mlp(data=tiny_store, out=tmp_path / "mlp", steps=1, progress=False)
    with pytest.raises(UnifiedError, match="overwrite"):
        fit_state_mlp(data=tiny_store, out=tmp_path / "mlp", steps=1, progress=False)
    fit_state_mlp(data=tiny_store, out=tmp_path / "mlp", steps=1, overwrite=True, progress=False)
    with pytest.raises(UnifiedError, match="--bins"):
        fit_state_mlp(data=tiny_store, out=tmp_path / "other", bins=1, progress=False)


def test_drives_in_closed_loop_planning_at_every_step_without_blending(tiny_store, tmp_path):
    fit_state_mlp(data=tiny_store, out=tmp_path / "mlp", horizon=4, steps=20, batch_size=16, progress=False)
    suite = tiny_store.parent / "tiny.yaml"
    report = closed_loop(model=str(tmp_path / "mlp"), scenarios=suite, episodes=1, replan_every=1,
                         no_ensemble=True, progress=False, videos=1, video_dir=tmp_path / "videos")
    assert report["model"] == "mlp (state MLP)" and report["replan_every"] == 1 and report["ensemble"] is None
    assert len(report["videos"]) == len(report["scenarios"])  # a state MLP renders its videos too
    assert report["overall"]["episodes"] == len(report["episodes"]) > 0
    assert len(report["fingerprint"]) == 16
    # Every step it drove was one decision: it planned at every step.
    latency = report["overall"]["decision_latency_ms"]
    assert latency["decisions"] == sum(e["steps"] for e in report["episodes"])


def test_label_spread_and_readouts_read_the_bins_as_the_transformer_does(tiny_store, tmp_path):
    import torch

    with pytest.raises(UnifiedError, match="--label-sigma"):
        fit_state_mlp(data=tiny_store, out=tmp_path / "no_bins", label_sigma=2, steps=1, progress=False)
    config = fit_state_mlp(data=tiny_store, out=tmp_path / "mlp", bins=16, label_sigma=2, steps=20, batch_size=16,
                           progress=False)
    assert config["label_sigma"] == 2 and np.isfinite(config["final_loss"])
    mlp = StateMLP.load(tmp_path / "mlp")
    # Each soft target is a distribution peaked at its bin, symmetric about it, cut at the range's end.
    soft = mlp.spread(torch.tensor([0, 5]))
    torch.testing.assert_close(soft.sum(-1), torch.ones(2, dtype=soft.dtype))
    assert soft.argmax(-1).tolist() == [0, 5] and soft[1, 4] == soft[1, 6] > soft[1, 3] > 0
    # The readouts of one predicted distribution: [0.4, 0.1, 0.1, 0.4] over 4 bins of a unit range.
    mlp.bins, mlp.horizon, mlp.dim = 4, 1, 1
    mlp.config = {**mlp.config, "action_low": [0.0], "action_high": [1.0]}
    mlp.net = lambda x: torch.log(torch.tensor([[0.4, 0.1, 0.1, 0.4]], dtype=torch.float32))
    state = np.zeros(len(mlp.config["state_mean"]))
    assert mlp.plan(state, "mode")[0, 0] == pytest.approx(0.125)  # the first most likely bin's centre
    assert mlp.plan(state, "mean")[0, 0] == pytest.approx(0.5)
    assert mlp.plan(state, "median")[0, 0] == pytest.approx(0.375)  # the first bin where half the mass is reached


def test_closed_loop_reads_a_binned_mlp_by_its_readout_and_refuses_one_for_regression(tiny_store, tmp_path):
    suite = tiny_store.parent / "tiny.yaml"
    fit_state_mlp(data=tiny_store, out=tmp_path / "regression", steps=2, progress=False)
    with pytest.raises(UnifiedError, match="--readout mean.*regression"):
        closed_loop(model=str(tmp_path / "regression"), scenarios=suite, episodes=1, readout="mean", progress=False)
    fit_state_mlp(data=tiny_store, out=tmp_path / "binned", bins=8, steps=2, progress=False)
    report = closed_loop(model=str(tmp_path / "binned"), scenarios=suite, episodes=1, readout="mean", progress=False)
    assert report["model"] == "binned (state MLP, mean readout)" and report["readout"] == "mean"


def test_the_state_scaled_over_its_range_as_the_tokenizer_does(tiny_store, tmp_path):
    """--state-scale range: each state value's 1st..99th percentile over the training steps maps to [-1, 1], and
    values beyond are clipped there; a standardised fit reads the mean and standard deviation instead."""
    config = fit_state_mlp(data=tiny_store, out=tmp_path / "range", steps=5, batch_size=8, state_scale="range",
                           progress=False)
    store = EpisodeStore(tiny_store)
    states, _ = _labels(store, store.train_indices())
    low, high = np.percentile(states, 1, axis=0), np.percentile(states, 99, axis=0)
    mlp = StateMLP.load(tmp_path / "range")
    assert mlp.config["state_scale"] == "range" == config["state_scale"]
    moving = high - low > 1e-3
    scaled = mlp.normalise(states)
    assert scaled.min() >= -1 and scaled.max() <= 1
    np.testing.assert_allclose(mlp.normalise(low[None])[0][moving], -1, atol=1e-5)
    np.testing.assert_allclose(mlp.normalise(high[None])[0][moving], 1, atol=1e-5)
    fit_state_mlp(data=tiny_store, out=tmp_path / "std", steps=5, batch_size=8, progress=False)
    np.testing.assert_allclose(StateMLP.load(tmp_path / "std").normalise(states).mean(0), 0, atol=1e-4)
    with pytest.raises(UnifiedError, match="--state-scale"):
        fit_state_mlp(data=tiny_store, out=tmp_path / "bad", steps=1, state_scale="minmax", progress=False)
