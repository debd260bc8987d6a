"""Drivers that act through the env's continuous actions: the scripted expert and two baselines.

The expert is the simulator's own logic: IDM for speed, MOBIL for lane changes, the lane-following
controller for steering, and the simulator's right-of-way rules (`RegulatedRoad`) to yield. It decides
at the policy frequency and holds its action in between, exactly as a learned policy does.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from highway_env.road.regulation import RegulatedRoad
from highway_env.vehicle.behavior import IDMVehicle

from unified.sim.env import ACCELERATION_LIMIT, STEERING_LIMIT
from unified.sim.suite import Scenario

YIELD_RADIUS_M = 40.0  # vehicles farther than this cannot conflict within the prediction horizon (3 s)


@dataclass
class Intent:
    """What a driver decided and what it looked at, for the causation record of the step."""

    action: np.ndarray  # (2,) acceleration m/s^2, steering rad: what is recorded for the step
    target_lane: tuple | None  # lane index the driver steers to
    front: object | None  # leading vehicle in the ego's lane
    yield_to: object | None  # vehicle with right of way the driver brakes for
    executed: np.ndarray | None = None  # (2,) what the car does instead, when a learner drives and the expert labels


class ExpertDriver:
    """IDM + MOBIL + right-of-way, computed on a shadow IDMVehicle that mirrors the ego each step."""

    name = "expert"

    def reset(self, env, scenario: Scenario, seed: int) -> None:
        u = env.unwrapped
        ego = u.vehicle
        self.road = u.road
        self.dt = 1.0 / u.config["policy_frequency"]
        limit = ego.lane.speed_limit if ego.lane is not None else None
        destination = scenario.destination or u.config.get("destination")
        # On a branching road keep the speed the scenario starts with; on open road drive at the limit.
        target_speed = ego.speed if destination else max(ego.speed, limit or 0.0)
        self.shadow = IDMVehicle(
            u.road, ego.position.copy(), heading=ego.heading, speed=ego.speed,
            target_lane_index=ego.lane_index, target_speed=target_speed,
        )
        if destination:
            self.shadow.plan_route_to(destination)
        self.origin = ego.lane_index  # the lane the car was in when the target lane was last chosen
        # Where the state measures the pose against the lane the car is in (`unified.sim.rollout.Route` on open road);
        # along a route it measures against the route's lane, the lane the expert steers for.
        self.open_road = scenario.destination is None

    def act(self, env) -> Intent:
        ego = env.unwrapped.vehicle
        s = self.shadow
        s.position, s.heading, s.speed = ego.position.copy(), ego.heading, ego.speed
        s.lane_index, s.lane = ego.lane_index, ego.lane
        # The shadow stands in for the ego while it decides, so that neighbours are seen from the ego's place.
        vehicles = self.road.vehicles
        slot = vehicles.index(ego)
        vehicles[slot] = s
        try:
            # On open road the car left the lanes of the expert's own plan (its target and the lane a change started
            # from): a learner drove it there (DAgger). Left alone, the shadow would steer back across the road to a
            # target lane nothing in the state names; it keeps the lane the car is in instead, the lane the state
            # measures. The expert's own drives never trigger this.
            if self.open_road and s.lane_index[:2] == s.target_lane_index[:2] \
                    and s.lane_index not in (s.target_lane_index, self.origin):
                s.target_lane_index = self.origin = s.lane_index
            target = s.target_lane_index
            s.follow_road()
            s.change_lane_policy()
            if s.target_lane_index != target:
                self.origin = s.lane_index
            steering = s.steering_control(s.target_lane_index)
            front, rear = self.road.neighbour_vehicles(s, s.lane_index)
            acceleration = s.acceleration(s, front, rear)
            if s.lane_index != s.target_lane_index:
                front2, rear2 = self.road.neighbour_vehicles(s, s.target_lane_index)
                acceleration = min(acceleration, s.acceleration(s, front2, rear2))
            yield_to = self._must_yield_to(s, exclude=(front, rear))
            if yield_to is not None:
                acceleration = min(acceleration, -s.speed - 1.0)
        finally:
            vehicles[slot] = ego
        s.timer += self.dt
        action = np.array(
            [np.clip(acceleration, -ACCELERATION_LIMIT, ACCELERATION_LIMIT),
             np.clip(steering, -STEERING_LIMIT, STEERING_LIMIT)],
            np.float32,
        )
        return Intent(action, s.target_lane_index, front, yield_to)

    def _must_yield_to(self, s: IDMVehicle, exclude: tuple):
        for v in self.road.close_vehicles_to(s, YIELD_RADIUS_M, count=None, see_behind=True, sort=True):
            if v in exclude:
                continue
            try:
                conflict = RegulatedRoad.is_conflict_possible(s, v)
            except (IndexError, KeyError):  # some routes cannot be extrapolated past their end
                conflict = False
            if conflict and RegulatedRoad.respect_priorities(s, v) is s:
                return v
        return None


class RandomDriver:
    """Uniformly random acceleration and steering within the action limits."""

    name = "random"

    def reset(self, env, scenario: Scenario, seed: int) -> None:
        self.rng = np.random.default_rng(seed)

    def act(self, env) -> Intent:
        action = self.rng.uniform([-ACCELERATION_LIMIT, -STEERING_LIMIT], [ACCELERATION_LIMIT, STEERING_LIMIT])
        return passive_intent(env, action.astype(np.float32))


class ConstantSpeedDriver:
    """Holds its speed and the wheel straight."""

    name = "constant"

    def reset(self, env, scenario: Scenario, seed: int) -> None:
        pass

    def act(self, env) -> Intent:
        return passive_intent(env, np.zeros(2, np.float32))


def passive_intent(env, action: np.ndarray) -> Intent:
    u = env.unwrapped
    front, _ = u.road.neighbour_vehicles(u.vehicle, u.vehicle.lane_index)
    return Intent(action, u.vehicle.lane_index, front, None)


DRIVERS = {d.name: d for d in (ExpertDriver, RandomDriver, ConstantSpeedDriver)}
