"""A trained policy as a driver: it sees the rendered frame, the instruction and the ego state, plans an action
chunk, and re-plans every `replan_every` steps (or when the chunk runs out).

With `ensemble` (ACT's temporal ensembling) every chunk still covering the current step votes for its action,
weighted exp(-ensemble * i) with i = 0 for the oldest: consecutive chunks are blended instead of switched, so
re-planning often does not make the car jerk from one plan to the next.

Reasoning-action consistency: every decision a reasoning driver explains is checked against what the car then
did in the next `CONSISTENCY_WINDOW_S` seconds (whatever later decisions changed): "slow down" and "yield" need
a mean executed acceleration below 0 (or, for "yield", a car that stands, under 1 m/s), "accelerate" above 0,
"change left"/"change right" a move of at least `LANE_CHANGE_M` to that side of the lane it was in when it
decided, "keep lane" a move of less than `KEEP_LANE_M` either way. An explanation outside the grammar of the
causation records is counted as unparsed, not as consistent."""

from __future__ import annotations

import time

import numpy as np
from unified.eval.modes import Mode, mode_flags
from unified.tokenizers.action import FAST_DECODING, READOUT

from unified.sim.drivers import Intent, passive_intent
from unified.sim.env import render_frame
from unified.sim.language import pick_instruction
from unified.sim.rollout import Route, ego_state
from unified.sim.suite import Scenario

# The default execution: a new plan every 5 steps (1 s at 5 Hz), blended with the older plans that still cover the
# step. Against each 2 s chunk executed blind the ablation (`make ablation`, row 4 against row 3) measured +0.04
# success in distribution, not significant (p = 0.11), and never worse. `replan_every` at least the chunk length
# (None: the chunk length) executes each chunk to its end, blind.
REPLAN_EVERY, ENSEMBLE = 5, 0.5
# A driver that reads the continuous head (modes continuous, reason_continuous) plans at every step and executes that
# plan's first action alone: measured on the demo's teacher (docs/driving.md, round 18), 0.90 success in
# distribution, against 0.36 with the token modes' plan every 5 steps blended with the older ones.
HEAD_REPLAN_EVERY, HEAD_ENSEMBLE = 1, None


def execution(mode: Mode, replan_every: int | None = None, ensemble: float | None = None,
              no_ensemble: bool = False) -> tuple[int, float | None]:
    """(replan_every, ensemble) for a driver in `mode`: the values given, else the mode's defaults (the head's for
    the continuous modes, the token modes' otherwise); `no_ensemble` executes the newest plan alone."""
    head = mode_flags(mode)["continuous"]
    if replan_every is None:
        replan_every = HEAD_REPLAN_EVERY if head else REPLAN_EVERY
    if no_ensemble:
        return replan_every, None
    return replan_every, ensemble if ensemble is not None else (HEAD_ENSEMBLE if head else ENSEMBLE)
CONSISTENCY_WINDOW_S = 2.0  # the time in which the car must do what it said (a 10-step chunk at 5 Hz)
LANE_CHANGE_M = 0.5  # lateral move (m) towards the stated side that counts as changing lane within the window
KEEP_LANE_M = 1.0  # lateral move (m) below which the car kept its lane (a lane is 4 m wide)
STANDING_MPS = 1.0  # a yielding car that stands this slowly is doing what it said


def lateral(env, lane_index) -> float:
    """The ego's offset (m, positive to the right) from the centre of lane `lane_index`."""
    ego = env.unwrapped.vehicle
    return float(env.unwrapped.road.network.get_lane(lane_index).local_coordinates(ego.position)[1])


def consistent(decision: str, accelerations: np.ndarray, moved_m: float, speed: float) -> bool:
    """Did the executed actions (accelerations m/s^2 over the window; `moved_m` the lateral move, positive to the
    right; `speed` m/s at the window's end) do what `decision` says?"""
    mean = float(np.mean(accelerations))
    if decision == "slow down":
        return mean < 0
    if decision == "yield":
        return mean < 0 or speed < STANDING_MPS
    if decision == "accelerate":
        return mean > 0
    if decision == "change left":
        return moved_m <= -LANE_CHANGE_M
    if decision == "change right":
        return moved_m >= LANE_CHANGE_M
    return abs(moved_m) < KEEP_LANE_M  # keep lane


class ModelDriver:
    name = "model"
    needs_frames = True  # a policy reads the rendered frame; a state-only planner does not

    def __init__(self, policy, mode: Mode = "reason", replan_every: int | None = REPLAN_EVERY,
                 ensemble: float | None = ENSEMBLE, readout: str = READOUT, fast_decoding: str = FAST_DECODING,
                 reason_every: int | None = None):
        self.policy, self.mode, self.ensemble, self.readout = policy, mode, ensemble, readout
        # A reasoning driver writes an explanation every `reason_every` steps (None: at every decision) and reads
        # the last one again at the decisions between.
        self.reason_every = reason_every
        # Passed only when it is not the default, so that a policy without the option (a state-MLP baseline) is asked
        # as before.
        self.options = {} if fast_decoding == FAST_DECODING else {"fast_decoding": fast_decoding}
        self.replan_every = replan_every or policy.config.horizon
        self.decisions: list[dict] = []
        self.windows: list[dict] = []  # reasoning decisions whose consistency window is still open

    def reset(self, env, scenario: Scenario, seed: int) -> None:
        # The same instruction run_episode records for this seed.
        self.instruction = pick_instruction(scenario, np.random.default_rng(seed))
        self.route = Route(env, scenario.destination)  # the navigation the recorded states were computed with
        self.chunks: list[tuple[int, np.ndarray]] = []  # (step it was planned at, (H, 2) actions), oldest first
        self.frames: list[np.ndarray] = []
        self.step = 0
        self.decisions, self.windows = [], []
        self.reasoned: tuple[int, str] | None = None  # (step, text) of the last explanation written
        self.where = f"scenario {scenario.name!r}, seed {seed}"
        self.window_steps = max(1, round(CONSISTENCY_WINDOW_S * env.unwrapped.config["policy_frequency"]))

    def plan(self, env) -> np.ndarray:
        """(H, 2) a new chunk for the current state."""
        start = time.perf_counter()
        state = ego_state(env.unwrapped.vehicle, self.route)
        reuse = self.reason_every is not None and self.reasoned is not None and \
            self.step - self.reasoned[0] < self.reason_every
        options = self.options | ({"reasoning": self.reasoned[1]} if reuse else {})
        result = self.policy.act(np.stack(self.frames), self.instruction, state=state,
                                 readout=self.readout, **mode_flags(self.mode), **options)
        decision = {"step": self.step, "latency_ms": 1000 * (time.perf_counter() - start),
                    "tokens": result.tokens_generated, "reasoning": result.reasoning,
                    "malformed": getattr(result, "malformed", None)} | ({"reasoning_reused": True} if reuse else {})
        self.decisions.append(decision)
        if result.reasoning is not None and not reuse:
            self.reasoned = (self.step, result.reasoning)
            from unified.eval.reasoning import parse

            parsed = parse(result.reasoning)
            decision["stated"] = parsed["decision"] if parsed else None
            lane = env.unwrapped.vehicle.lane_index
            self.windows.append({"decision": decision, "lane": lane, "lateral": lateral(env, lane), "accel": []})
        return np.asarray(result.actions, np.float32)

    def close_windows(self, env, final: bool = False) -> None:
        """Judge the reasoning decisions whose window is over (`final`: every open one, at the episode's end, on
        the steps it had); the verdict goes into the decision's record as "consistent"."""
        still = []
        for w in self.windows:
            if len(w["accel"]) < self.window_steps and not (final and w["accel"]):
                still.append(w)
                continue
            stated = w["decision"]["stated"]
            if stated is not None and w["accel"]:
                moved = lateral(env, w["lane"]) - w["lateral"]
                w["decision"]["consistent"] = consistent(stated, np.asarray(w["accel"]), moved,
                                                         float(env.unwrapped.vehicle.speed))
                w["decision"]["window_steps"] = len(w["accel"])
        self.windows = [] if final else still

    def action(self, env) -> np.ndarray:
        """The (2,) action for the current step."""
        t, horizon = self.step, self.policy.config.horizon
        self.close_windows(env)
        current = [(s, c) for s, c in self.chunks if s + len(c) > t]
        replan = t % self.replan_every == 0 or not current
        history = self.policy.config.history
        if self.needs_frames and (replan or history > 1):  # one frame: none needed between decisions
            frame = render_frame(env, f"{self.where}, step {t}")
            self.frames = (self.frames + [frame])[-history:]
        if replan:
            current.append((t, self.plan(env)[:horizon]))
        self.chunks = current
        self.step += 1
        if self.ensemble is None:
            s, chunk = current[-1]
            action = chunk[t - s]
        else:
            votes = np.stack([c[t - s] for s, c in current])  # oldest first
            weights = np.exp(-self.ensemble * np.arange(len(votes)))
            action = (weights[:, None] * votes).sum(0) / weights.sum()
        for w in self.windows:
            w["accel"].append(float(action[0]))
        return action

    def act(self, env) -> Intent:
        return passive_intent(env, self.action(env).astype(np.float32))
