"""Scenario suites: a YAML file naming highway-env scenarios, their config overrides and the image size."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from unified.config import from_dict, load_yaml, to_dict
from unified.errors import UnifiedError

# Keys the suite sets for every scenario, so that frames, actions and timing are the same across a suite.
SUITE_OWNED_KEYS = {
    "action": "actions are always continuous (acceleration, steering)",
    "observation": "the data engine renders its own frames",
    "policy_frequency": "set policy_frequency at the top of the suite",
    "offscreen_rendering": "frames are always rendered off screen",
    "screen_width": "set image_size at the top of the suite",
    "screen_height": "set image_size at the top of the suite",
    "scaling": "set view_m (metres across the frame) at the top of the suite",
}


@dataclass
class Scenario:
    env: str  # highway-env id, e.g. "highway-v0"; `unified data scenarios` lists them
    config: dict[str, Any] = field(default_factory=dict)  # overrides of the env's default_config()
    max_steps: int | None = None  # episode cap in policy steps; None: the env's duration, else 100
    destination: str | None = None  # route goal for the expert where the road branches, e.g. "o1"
    # On open road (no destination) the route counts as completed after this many metres; None: any distance.
    # Without it a car that stops on the highway and waits out the episode would count as a success.
    min_progress_m: float | None = None
    instructions: list[str] = field(default_factory=list)  # paraphrases; empty: defaults for the env family
    weight: float = 1.0  # share of the suite's episodes
    # Every other vehicle starts up to this far along its lane (metres) and this much faster or slower (m/s) than
    # the env places it, uniformly, in data and evaluation alike: some envs (merge-v0) place traffic almost the
    # same way whatever the seed, so that without it two episodes could be near-replays of each other.
    traffic_jitter: tuple[float, float] = (0.0, 0.0)
    name: str = ""  # filled from the key in `scenarios:`

    def __post_init__(self):
        if self.weight <= 0:
            raise ValueError(f"weight must be positive, got {self.weight}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps must be at least 1, got {self.max_steps}")
        if self.min_progress_m is not None and self.min_progress_m < 0:
            raise ValueError(f"min_progress_m must not be negative, got {self.min_progress_m}")
        if min(self.traffic_jitter) < 0:
            raise ValueError(f"traffic_jitter (metres, m/s) must not be negative, got {self.traffic_jitter}")


@dataclass
class Suite:
    scenarios: dict[str, Scenario]  # name -> scenario
    name: str = "suite"
    image_size: tuple[int, int] = (64, 64)  # (height, width) of stored frames, pixels
    policy_frequency: int = 5  # decisions per second (Hz); the simulator steps at its own frequency
    view_m: float = 50.0  # metres of road across the frame's width
    centering: tuple[float, float] = (0.3, 0.5)  # where the ego sits in the frame (fraction of width, height)
    # Expert demonstrations (`data generate`, not evaluation) start the ego up to this far off its lane centre
    # (metres) and off the lane's direction (radians), uniformly: the expert's corrections are in the data, so
    # that a policy learns to come back from the small drifts its own errors cause.
    start_jitter: tuple[float, float] = (0.0, 0.0)
    # ... and again every `jitter_every` decisions (0: at the start only): the car is moved off its lane by up to
    # `start_jitter` in the middle of the road too, on highways, at merges, in turns and on roundabout rings, and the
    # expert's way back is in the data wherever a learner may drift.
    jitter_every: int = 0
    # Expert demonstrations also drive with noise added to the expert's action (acceleration m/s^2, steering rad:
    # the standard deviation of a slowly varying perturbation, see `unified.sim.rollout.ActionNoise`), while the
    # expert's own action is what is recorded (DART: Laskey et al., 2017): the car drifts off the expert's path the
    # way a learner's small errors make it drift, and the data shows how the expert brings it back, in turns too.
    action_noise: tuple[float, float] = (0.0, 0.0)

    def __post_init__(self):
        if not self.scenarios:
            raise ValueError("a suite needs at least one scenario under `scenarios:`")
        h, w = self.image_size
        if h < 16 or w < 16:
            raise ValueError(f"image_size must be at least 16x16, got {h}x{w}")
        if self.policy_frequency < 1:
            raise ValueError(f"policy_frequency must be at least 1 Hz, got {self.policy_frequency}")
        if min(self.start_jitter) < 0:
            raise ValueError(f"start_jitter (metres, radians) must not be negative, got {self.start_jitter}")
        if self.jitter_every < 0:
            raise ValueError(f"jitter_every (decisions) must not be negative, got {self.jitter_every}")
        if min(self.action_noise) < 0:
            raise ValueError(f"action_noise (m/s^2, radians) must not be negative, got {self.action_noise}")

    @property
    def hash(self) -> str:
        """A short fingerprint of everything that shapes the data, to refuse mixing suites in one store."""
        blob = json.dumps(to_dict(self), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    @cached_property
    def _cycle(self) -> list[str]:
        """One period of the smooth weighted round robin: the scenario name of episodes 0..period-1."""
        names = list(self.scenarios)
        weights = [self.scenarios[n].weight for n in names]
        total = sum(weights)
        period = int(sum(weights)) if all(float(w).is_integer() for w in weights) else 10_000
        current = [0.0] * len(names)
        picks = []
        for _ in range(period):
            current = [c + w for c, w in zip(current, weights)]
            pick = max(range(len(names)), key=lambda i: (current[i], -i))
            current[pick] -= total
            picks.append(names[pick])
        return picks

    def scenario_for_episode(self, index: int) -> Scenario:
        """Deterministic, weight-balanced scenario of episode `index` (smooth weighted round robin).

        Independent of the total number of episodes, so that a store can be extended and resumed.
        """
        return self.scenarios[self._cycle[index % len(self._cycle)]]

    def scenario_ordinal(self, index: int) -> int:
        """How many earlier episodes (0..index-1) have the scenario of episode `index`: its rank within its
        scenario, which the held-out split is defined on (so that every scenario contributes held-out episodes)."""
        cycle = self._cycle
        name = cycle[index % len(cycle)]
        full, rest = divmod(index, len(cycle))
        return full * cycle.count(name) + cycle[:rest].count(name)


def load_suite(path: str | Path) -> Suite:
    """Read and check a suite YAML: keys, env ids and each scenario's config keys."""
    path = Path(path)
    data = load_yaml(path)
    suite = from_dict(Suite, data, str(path))
    for name, scenario in suite.scenarios.items():
        scenario.name = name
        check_scenario(scenario, f"{path}: scenarios.{name}")
    return suite


def suite_from_dict(data: dict[str, Any], where: str = "suite", check: bool = True) -> Suite:
    """A suite from already-parsed data (e.g. the copy stored in a data set's meta/info.json); `check` that its
    scenarios are the simulator's (an imported store's one scenario is not)."""
    suite = from_dict(Suite, data, where)
    for name, scenario in suite.scenarios.items():
        scenario.name = name
        if check:
            check_scenario(scenario, f"{where}: scenarios.{name}")
    return suite


def env_ids() -> list[str]:
    """The single-agent highway-env scenario ids that take continuous actions."""
    import gymnasium as gym
    import highway_env

    gym.register_envs(highway_env)
    return sorted(
        k for k, spec in gym.registry.items()
        if isinstance(spec.entry_point, str) and spec.entry_point.startswith("highway_env.")
        and "multi-agent" not in k and "parking" not in k
    )


def env_class(env_id: str) -> type:
    """The highway-env class behind an env id (so its default_config can be read without building it)."""
    import gymnasium as gym
    from gymnasium.envs.registration import load_env_creator

    ids = env_ids()
    if env_id not in ids:
        raise UnifiedError(f"unknown scenario env {env_id!r}; valid ones: {', '.join(ids)}")
    return load_env_creator(gym.spec(env_id).entry_point)


def check_scenario(scenario: Scenario, where: str) -> None:
    try:
        cls = env_class(scenario.env)
    except UnifiedError as e:
        raise UnifiedError(f"{where}.env: {e}") from None
    if scenario.destination is not None:
        check_destination(scenario, cls, where)
    valid = cls.default_config()
    for key in scenario.config:
        if key in SUITE_OWNED_KEYS:
            raise UnifiedError(f"{where}.config.{key}: set by the suite ({SUITE_OWNED_KEYS[key]})")
        if key not in valid:
            options = ", ".join(k for k in sorted(valid) if k not in SUITE_OWNED_KEYS)
            raise UnifiedError(f"{where}.config: unknown key {key!r} for {scenario.env}; valid keys: {options}")


def check_destination(scenario: Scenario, cls: type, where: str) -> None:
    """A destination must be a node of the env's road network (else every episode would fail silently), and the
    driver must be told it: by the scenario's instructions, or by the defaults that name it."""
    from unified.sim.language import DESTINATION_INSTRUCTIONS, family

    nodes = _road_nodes(cls, json.dumps(scenario.config, sort_keys=True))
    if scenario.destination not in nodes:
        raise UnifiedError(f"{where}.destination: {scenario.destination!r} is not a node of the {scenario.env} road "
                           f"network; nodes: {', '.join(sorted(nodes))}")
    if not scenario.instructions and (family(scenario), scenario.destination) not in DESTINATION_INSTRUCTIONS:
        raise UnifiedError(
            f"{where}: destination {scenario.destination!r} has no default instructions; give `instructions:` that "
            "name the goal (a driver that is not told where to go cannot be asked to get there)"
        )


_NODES: dict[tuple[type, str], set[str]] = {}


def _road_nodes(cls: type, config: str) -> set[str]:
    """The node names of the road network `cls` builds with `config` (JSON), built once per process."""
    if (cls, config) not in _NODES:
        env = cls(config=json.loads(config))
        env.reset(seed=0)
        graph = env.unwrapped.road.network.graph
        _NODES[(cls, config)] = set(graph) | {node for ends in graph.values() for node in ends}
        env.close()
    return _NODES[(cls, config)]


def data_scenarios() -> list[str]:
    """`unified data scenarios`: print the highway-env ids usable in a suite, with the config keys each accepts."""
    ids = env_ids()
    for env_id in ids:
        keys = sorted(k for k in env_class(env_id).default_config() if k not in SUITE_OWNED_KEYS)
        print(f"{env_id}: {', '.join(keys)}")
    return ids
