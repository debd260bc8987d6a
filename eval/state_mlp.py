"""`unified baseline fit-state-mlp`: a behaviour-cloning baseline that reads the ego state only.

A small MLP maps the recorded state (speed, pose against the route's lane, the route's bend ahead, lanes, the
lead vehicle, the nearest vehicles: `unified.sim.rollout.STATE_NAMES`) to the expert's next `horizon` actions,
trained on a store's training episodes (never its held-out ones) with an L1 loss on normalised actions, or, with
`bins`, a cross-entropy over that many bins per action dimension (`label_sigma`: each target a Gaussian over the
neighbouring bins, as `model.action_label_sigma` does for the transformer's action tokens), read out as the most
likely bin's centre (as the transformer's action tokens are by default) or the mean or median of the bin centres
under the predicted distribution (`readout`, as `eval closed-loop --readout`). It sees no frame and no
instruction. It answers a question the transformer's figures cannot: is what the policy lacks in the data and the
state, or in how the transformer learns and executes its actions? `eval closed-loop --model DIR` drives it like any
model (it plans every `--replan-every` steps and blends the chunks as a model does).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
from tqdm import tqdm
from unified.eval.model_driver import ModelDriver
from unified.tokenizers.action import READOUT, read_bins

from unified.errors import UnifiedError
from unified.sim.rollout import ego_state

MARKER = "state_mlp.json"
STATE_SCALES = ("standard", "range")
FORMAT = "unified-state-mlp"


def _chunks(actions: np.ndarray, horizon: int) -> np.ndarray:
    """(T, D) -> (T, horizon, D): the actions from each step on, the last one repeated past the episode's end (as
    the token sequences pad a chunk)."""
    padded = np.concatenate([actions, np.repeat(actions[-1:], horizon, 0)])
    return np.stack([padded[t:t + horizon] for t in range(len(actions))])


def fit_state_mlp(*, data: Path, out: Path, horizon: int = 1, bins: int | None = None, label_sigma: float = 0.0,
                  steps: int = 5000, batch_size: int = 256, hidden: int = 256, lr: float = 0.001, seed: int = 0,
                  state_scale: str = "standard", overwrite: bool = False, progress: bool = True) -> dict:
    """Fit the state-only MLP on the training episodes of the store `data` and write it to `out` (`state_mlp.json`
    with its normalisation and the episodes it trained on, `model.safetensors`). With `bins`, `label_sigma` (in
    bins, 0: one-hot) spreads each target over its neighbouring bins of the same dimension. `state_scale`: how the
    state is scaled before the network reads it: `standard` (each value's mean and standard deviation over the
    training steps) or `range` (its 1st..99th percentile mapped to [-1, 1] and clipped there, as the state
    tokenizer and the transformer's continuous head scale it)."""
    import torch
    from safetensors.torch import save_file

    from unified.data.store import EpisodeStore
    from unified.outputs import check_dir, staged_dir

    data, out = Path(data), Path(out)
    check_dir(out, "state_mlp", [data])
    if bins is not None and bins < 2:
        raise UnifiedError(f"--bins must be at least 2 (or left out for regression), got {bins}")
    if label_sigma < 0 or (label_sigma > 0 and bins is None):
        raise UnifiedError(f"--label-sigma is a width in bins, at least 0, and needs --bins; got {label_sigma} "
                           f"with bins {bins}")
    if state_scale not in STATE_SCALES:
        raise UnifiedError(f"--state-scale: expected one of {', '.join(STATE_SCALES)}, got {state_scale!r}")
    store = EpisodeStore(data)
    trained_on = store.train_indices()
    if not trained_on:
        raise UnifiedError(f"{data}: no training episodes (every episode is held out)")
    states, chunks = [], []
    for index in tqdm(trained_on, desc="reading episodes", unit="ep", disable=not progress, dynamic_ncols=True):
        episode = store.read_episode(index, frames=False)
        states.append(episode.states)
        chunks.append(_chunks(episode.actions, horizon))
    x = np.concatenate(states).astype(np.float32)
    y = np.concatenate(chunks).astype(np.float32)  # (N, H, D)
    low, high = y.reshape(-1, y.shape[-1]).min(0), y.reshape(-1, y.shape[-1]).max(0)
    config = {
        "format": FORMAT, "store": str(data), "trained_on": trained_on, "samples": len(x), "horizon": horizon,
        "bins": bins, "label_sigma": label_sigma, "hidden": hidden, "steps": steps, "batch_size": batch_size,
        "lr": lr, "seed": seed,
        "state_scale": state_scale, "state_mean": x.mean(0).tolist(), "state_std": (x.std(0) + 1e-6).tolist(),
        "action_mean": y.reshape(-1, y.shape[-1]).mean(0).tolist(),
        "action_std": (y.reshape(-1, y.shape[-1]).std(0) + 1e-6).tolist(),
        "action_low": low.tolist(), "action_high": np.maximum(high, low + 1e-6).tolist(),
    }
    if state_scale == "range":  # centre and half-width of the 1st..99th percentile, clipped by `normalise`
        q01, q99 = np.percentile(x, 1, axis=0), np.percentile(x, 99, axis=0)
        config["state_mean"], config["state_std"] = ((q01 + q99) / 2).tolist(), np.maximum((q99 - q01) / 2,
                                                                                          1e-6).tolist()
    driver = StateMLP(config)
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.from_numpy(driver.normalise(x))
    targets = torch.from_numpy(driver.targets(y))
    optimiser = torch.optim.AdamW(driver.net.parameters(), lr)
    bar = tqdm(range(steps), desc="fitting", unit="step", disable=not progress, dynamic_ncols=True)
    for _ in bar:
        rows = torch.randint(0, len(inputs), (batch_size,), generator=generator)
        loss = driver.loss(driver.net(inputs[rows]), targets[rows])
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        bar.set_postfix(loss=f"{float(loss.detach()):.4f}", refresh=False)
    config["final_loss"] = float(loss.detach())
    with staged_dir(out, "state_mlp", [data], overwrite) as staging:
        save_file({k: v.contiguous() for k, v in driver.net.state_dict().items()}, str(staging / "model.safetensors"))
        (staging / MARKER).write_text(json.dumps(config, indent=1))
    print(f"fitted a state-only MLP on {len(trained_on)} training episodes ({len(x)} steps) of {data}: "
          f"{steps} steps, final loss {config['final_loss']:.4f} -> {out}", flush=True)
    return config


class StateMLP:
    """The fitted network with its normalisation: `plan(state) -> (H, D)` actions in the simulator's units."""

    def __init__(self, config: dict, weights: dict | None = None):
        self.config = config
        self.dim = len(config["action_mean"])
        self.horizon, self.bins = config["horizon"], config["bins"]
        outputs = self.horizon * self.dim * (self.bins or 1)
        from unified.model import state_network

        self.net = state_network(len(config["state_mean"]), outputs, config["hidden"])
        if weights is not None:
            self.net.load_state_dict(weights)
            self.net.eval()
        self.label_sigma = config.get("label_sigma", 0.0)  # fits written before the option had none

    @classmethod
    def load(cls, directory: str | Path) -> StateMLP:
        from safetensors.torch import load_file

        directory = Path(directory)
        try:
            config = json.loads((directory / MARKER).read_text())
        except (OSError, ValueError) as e:
            raise UnifiedError(f"{directory}: not a state-MLP directory ({MARKER}: {e})") from None
        if config.get("format") != FORMAT:
            raise UnifiedError(f"{directory / MARKER}: format {config.get('format')!r}, expected {FORMAT!r}")
        return cls(config, load_file(str(directory / "model.safetensors")))

    def normalise(self, states: np.ndarray) -> np.ndarray:
        scaled = (states - np.asarray(self.config["state_mean"])) / np.asarray(self.config["state_std"])
        if self.config.get("state_scale") == "range":  # fits written before the option are standardised
            scaled = np.clip(scaled, -1.0, 1.0)
        return scaled.astype(np.float32)

    def targets(self, chunks: np.ndarray) -> np.ndarray:
        """(N, H, D) actions -> the training targets: normalised values, or bin indices with `bins`."""
        if not self.bins:
            return ((chunks - np.asarray(self.config["action_mean"])) / np.asarray(self.config["action_std"])).astype(
                np.float32)
        low, high = np.asarray(self.config["action_low"]), np.asarray(self.config["action_high"])
        return np.clip(np.floor((chunks - low) / (high - low) * self.bins), 0, self.bins - 1).astype(np.int64)

    def loss(self, output, targets):
        import torch.nn.functional as F

        if not self.bins:
            return (output.view(targets.shape) - targets).abs().mean()
        logits, targets = output.view(-1, self.bins), targets.reshape(-1)
        if not self.label_sigma:
            return F.cross_entropy(logits, targets)
        return F.cross_entropy(logits, self.spread(targets))

    def spread(self, targets):
        """(N,) bin indices -> (N, bins) soft targets: a Gaussian of width `label_sigma` bins around each index,
        cut at the range's ends and normalised."""
        import torch

        distance = torch.arange(self.bins, device=targets.device)[None] - targets[:, None]
        weights = torch.exp(-0.5 * (distance.float() / self.label_sigma) ** 2)
        return weights / weights.sum(-1, keepdim=True)

    def plan(self, state: np.ndarray, readout: str = READOUT) -> np.ndarray:
        """(S,) state -> (H, D) actions in the simulator's units; with bins, `readout` picks the most likely bin's
        centre (mode) or the mean or median of the bin centres under the predicted distribution."""
        import torch

        with torch.inference_mode():
            output = self.net(torch.from_numpy(self.normalise(np.asarray(state, np.float64))[None]))[0]
            if self.bins:
                probs = output.view(self.horizon, self.dim, self.bins).softmax(-1).double().numpy()
            output = output.numpy()
        if not self.bins:
            return output.reshape(self.horizon, self.dim) * np.asarray(self.config["action_std"]) + np.asarray(
                self.config["action_mean"])
        unit = read_bins(probs, (np.arange(self.bins) + 0.5) / self.bins, readout)  # in units of the range
        low, high = np.asarray(self.config["action_low"]), np.asarray(self.config["action_high"])
        return low + unit * (high - low)


def is_state_mlp(path: str | Path) -> bool:
    return (Path(path) / MARKER).is_file()



class StateMLPDriver(ModelDriver):
    """A `ModelDriver` that plans with a loaded `StateMLP` (no frames rendered)."""

    needs_frames = False

    def __init__(self, mlp: StateMLP, replan_every: int | None, ensemble: float | None, readout: str = READOUT):
        planner = SimpleNamespace(config=SimpleNamespace(horizon=mlp.horizon, history=1))
        super().__init__(planner, "direct", replan_every, ensemble, readout)
        self.mlp = mlp

    def plan(self, env) -> np.ndarray:
        start = time.perf_counter()
        actions = self.mlp.plan(ego_state(env.unwrapped.vehicle, self.route), self.readout).astype(np.float32)
        self.decisions.append({"latency_ms": 1000 * (time.perf_counter() - start), "tokens": 0, "reasoning": None})
        return actions
