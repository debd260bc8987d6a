"""The held-out split of an episode store: one rule, stratified per scenario, recorded in `meta/info.json`.

Episode i is held out when its rank among the episodes of its scenario (`Suite.scenario_ordinal`) is
`every - 1` modulo `every`: every scenario contributes held-out episodes (a rule on the index alone would pick a
single scenario of a suite whose scenarios alternate), and the split of an episode never changes when the store
is extended. Everything that trains (tokenizer fit, `data tokenize`, every recipe) reads only the training
episodes; everything that reports "held out" (tokenizer eval, reasoning, world model, latency) reads only the
held-out ones. `every = 1` holds out every episode: a store used only for evaluation (the out-of-distribution one).
"""

from __future__ import annotations

from dataclasses import dataclass

from unified.errors import UnifiedError
from unified.sim.suite import Suite

DEFAULT_EVERY = 10


@dataclass(frozen=True)
class HeldOutRule:
    every: int = DEFAULT_EVERY  # one episode in `every` of each scenario is held out

    def __post_init__(self):
        if self.every < 1:
            raise UnifiedError(f"--held-out-every must be at least 1, got {self.every}")

    def is_held_out(self, suite: Suite, index: int) -> bool:
        return suite.scenario_ordinal(index) % self.every == self.every - 1

    @property
    def description(self) -> str:
        if self.every == 1:
            return "every episode is held out (an evaluation-only store)"
        return (f"the {self.every}th, {2 * self.every}th, ... episode of each scenario (rank within the scenario "
                f"% {self.every} == {self.every - 1})")

    def to_info(self, suite: Suite, indices: list[int]) -> dict:
        """The `split` entry of meta/info.json for the episodes `indices` on disk."""
        held: dict[str, list[int]] = {name: [] for name in suite.scenarios}
        for index in indices:
            if self.is_held_out(suite, index):
                held[suite.scenario_for_episode(index).name].append(index)
        n_held = sum(len(v) for v in held.values())
        return {"rule": "per_scenario", "held_out_every": self.every, "description": self.description,
                "train_episodes": len(indices) - n_held, "held_out_episodes": n_held, "held_out": held}
