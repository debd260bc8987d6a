"""Chain-of-causation records read from the simulator: critical agent, cause, decision, and a sentence."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from unified.sim.drivers import Intent

DECISIONS = ("keep lane", "slow down", "accelerate", "change left", "change right", "yield")
CAUSES = (
    "clear road", "vehicle ahead", "slower vehicle ahead", "free faster lane",
    "merging vehicle", "crossing vehicle", "above target speed",
)
ATTENTION_RANGE_M = 60.0  # a leading vehicle farther than this does not shape the decision
ACCELERATE_ABOVE = 0.5  # m/s^2: smaller accelerations count as keeping speed
SLOW_DOWN_BELOW = -1.0  # m/s^2


@dataclass
class Causation:
    """Why the driver acted as it did at one step; positions and velocities in the ego's frame (x ahead, y right)."""

    critical_id: int  # -1 when no agent is critical
    critical_position: np.ndarray  # (2,) metres, relative to the ego
    critical_velocity: np.ndarray  # (2,) m/s, relative to the ego
    cause: str  # one of CAUSES
    decision: str  # one of DECISIONS
    text: str  # the three rendered as one sentence


class VehicleIds:
    """Stable small integer ids for the vehicles of one episode, in order of first sight."""

    def __init__(self):
        self._ids: dict[int, int] = {}

    def __call__(self, vehicle) -> int:
        return self._ids.setdefault(id(vehicle), len(self._ids) + 1)


def _ego_frame(ego, vector: np.ndarray) -> np.ndarray:
    c, s = np.cos(ego.heading), np.sin(ego.heading)
    return np.array([c * vector[0] + s * vector[1], -s * vector[0] + c * vector[1]], np.float32)


def _side(lateral: float) -> str:
    return "right" if lateral > 0 else "left"


def explain(env, intent: Intent, ids: VehicleIds) -> Causation:
    """The causation record of the step in which `intent` was chosen (call before stepping the env)."""
    ego = env.unwrapped.vehicle
    road = env.unwrapped.road
    acceleration = float(intent.action[0])
    front = intent.front
    if front is not None and ego.lane_distance_to(front) > ATTENTION_RANGE_M:
        front = None

    critical, cause = None, "clear road"
    change = _lane_change(road, ego, intent.target_lane)
    if intent.yield_to is not None:
        critical, decision = intent.yield_to, "yield"
        parallel = abs(np.cos(intent.yield_to.heading - ego.heading)) > np.cos(np.radians(30))
        cause = "merging vehicle" if parallel else "crossing vehicle"
    elif change is not None:
        decision = change
        slower = front is not None and front.speed < ego.speed - 0.5
        critical, cause = (front, "slower vehicle ahead") if slower else (None, "free faster lane")
    else:
        if acceleration < SLOW_DOWN_BELOW:
            decision = "slow down"
        elif acceleration > ACCELERATE_ABOVE:
            decision = "accelerate"
        else:
            decision = "keep lane"
        if front is not None:
            critical = front
            closing = front.speed < ego.speed - 0.5
            cause = "slower vehicle ahead" if closing and decision == "slow down" else "vehicle ahead"
        elif decision == "slow down":
            cause = "above target speed"

    if critical is None:
        position = velocity = np.zeros(2, np.float32)
        critical_id = -1
    else:
        position = _ego_frame(ego, critical.position - ego.position)
        velocity = _ego_frame(ego, critical.velocity - ego.velocity)
        critical_id = ids(critical)
    return Causation(critical_id, position, velocity, cause, decision, describe(cause, decision, position, velocity))


def _lane_change(road, ego, target_lane) -> str | None:
    if target_lane is None or target_lane == ego.lane_index or target_lane[:2] != ego.lane_index[:2]:
        return None
    lateral = road.network.get_lane(target_lane).local_coordinates(ego.position)[1]
    # The ego lies to the right of the target lane's centre when the target is on its left.
    return "change left" if lateral > 0 else "change right"


_DO = {
    "keep lane": "keep my lane", "slow down": "slow down", "accelerate": "accelerate",
    "change left": "change to the left lane", "change right": "change to the right lane", "yield": "yield",
}


def reason_steps(text: str) -> list[str]:
    """A causation sentence's steps, the cause and the decision ("The car 18 m ahead is 4 m/s slower," and "so I
    slow down."), joined by a space back into the sentence; a sentence outside `describe`'s grammar is one step."""
    cause, so, decision = text.partition(", so I ")
    return [cause + ",", "so I " + decision] if so else [text]


def describe(cause: str, decision: str, position: np.ndarray, velocity: np.ndarray) -> str:
    """One sentence naming the critical agent, the cause and the decision."""
    distance = float(np.hypot(*position))
    where = "ahead" if position[0] >= 0 else "behind"
    if cause == "slower vehicle ahead":
        why = f"The car {position[0]:.0f} m ahead is {abs(velocity[0]):.0f} m/s slower"
    elif cause == "vehicle ahead":
        why = f"I follow the car {position[0]:.0f} m ahead"
    elif cause == "merging vehicle":
        why = f"A car merges {distance:.0f} m {where} on my {_side(position[1])}"
    elif cause == "crossing vehicle":
        why = f"A car with right of way crosses my path {distance:.0f} m {where}"
    elif cause == "free faster lane":
        side = "left" if decision == "change left" else "right"
        why = f"The {side} lane is free and faster"
    elif cause == "above target speed":
        why = "I am above my target speed"
    else:
        why = "The road ahead is clear"
    return f"{why}, so I {_DO[decision]}."
