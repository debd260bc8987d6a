"""A trained policy as a driver: it sees the rendered frame, the instruction and the ego state, plans an
action chunk, and re-plans every `replan_every` steps (or when the chunk runs out)."""

from __future__ import annotations

import time
from typing import Literal

import numpy as np

from unified.sim.drivers import _passive_intent
from unified.sim.env import render_frame
from unified.sim.language import pick_instruction
from unified.sim.rollout import ego_state
from unified.sim.suite import Scenario

Mode = Literal["reason", "direct", "continuous"]


class ModelDriver:
    name = "model"

    def __init__(self, policy, mode: Mode = "reason", replan_every: int | None = None):
        self.policy, self.mode = policy, mode
        self.replan_every = replan_every or policy.config.horizon
        self.decisions: list[dict] = []

    def reset(self, env, scenario: Scenario, seed: int) -> None:
        # The same instruction run_episode records for this seed.
        self.instruction = pick_instruction(scenario, np.random.default_rng(seed))
        self.queue: list[np.ndarray] = []
        self.frames: list[np.ndarray] = []
        self.step = 0
        self.decisions = []
        self.where = f"scenario {scenario.name!r}, seed {seed}"

    def act(self, env):
        replan = self.step % self.replan_every == 0 or not self.queue
        history = self.policy.config.history
        if replan or history > 1:  # a policy that sees one frame needs none between its decisions
            frame = render_frame(env, f"{self.where}, step {self.step}")
            self.frames = (self.frames + [frame])[-history:]
        if replan:
            start = time.perf_counter()
            state = ego_state(env.unwrapped.vehicle)
            result = self.policy.act(np.stack(self.frames), self.instruction, state=state,
                                     reason=self.mode == "reason", continuous=self.mode == "continuous")
            self.decisions.append({"latency_ms": 1000 * (time.perf_counter() - start),
                                   "tokens": result.tokens_generated, "reasoning": result.reasoning})
            self.queue = list(result.actions)
        self.step += 1
        return _passive_intent(env, np.asarray(self.queue.pop(0), np.float32))
