"""One episode in the simulator: frames, actions, ego states and causation records, plus how it ended."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
from highway_env import utils
from highway_env.vehicle.behavior import IDMVehicle

from unified.sim.causation import Causation, VehicleIds, explain
from unified.sim.env import (
    NEIGHBOURS,
    ROUTE_PREVIEW_M,
    SENSE_RANGE_M,
    STATE_NAMES,
    make_env,
    max_steps,
    render_frame,
    to_env_action,
)
from unified.sim.language import pick_instruction
from unified.sim.suite import Scenario, Suite
from unified.sim.traffic import jitter_traffic


@dataclass
class EpisodeSummary:
    steps: int
    success: bool  # no collision, still on the road, ran to its end, reached the env's goal, the destination and
    # the scenario's min_progress_m
    collision: bool
    offroad: bool
    end: str  # "time limit", "goal", "collision" or "off road"
    progress_m: float  # distance driven, metres
    mean_speed: float  # m/s
    decision_ms: float  # mean wall time of the driver's decision, milliseconds


@dataclass
class Episode:
    index: int
    scenario: str
    seed: int
    driver: str
    instruction: str
    actions: np.ndarray  # (T, 2) float32: acceleration m/s^2, steering rad
    states: np.ndarray  # (T, S) float32: `ego_state` at each step
    causation: list[Causation]  # T records
    summary: EpisodeSummary
    frames: np.ndarray | None = None  # (T, H, W, 3) uint8, frame t is what the driver saw before action t
    latencies_ms: np.ndarray = field(default_factory=lambda: np.zeros(0))  # (T,) wall time of each decision
    source: dict | None = None  # how the episode was made when not by the expert alone (a DAgger round)
    executed: np.ndarray | None = None  # (T, 2) what the car did, where it differs from `actions` (a learner drove,
    # or the demonstration's action noise)


class Route:
    """The navigation route of an episode, as a car's satnav gives it: the road's edges from the ego's start to the
    scenario's destination (the simulator's shortest path), or, on open road (no destination), the lane the ego is
    in and the road that continues it. It says which lane the car should be in where the road branches and how the
    road it should follow bends ahead; it says nothing about speed, traffic or when to change lanes.

    Along a route the lane to follow is chosen as highway-env's own route following chooses it (`ControlledVehicle.
    follow_road`, which the expert runs): the ego's starting lane, then, each time the car passes the end of that
    lane, the route's next road, on the lane number that continues it or, where the number of lanes changes (onto a
    roundabout's two-lane ring, off it onto a one-lane exit), the lane nearest the car's place on the lane it
    leaves. So the state measures the car's pose against the lane the expert steers for, not against whichever
    route lane happens to be nearest (at a roundabout's entry that was the entry road while the expert was already
    steering onto the ring's inner lane, and the recorded steering could not be read from the state)."""

    def __init__(self, env, destination: str | None):
        u = env.unwrapped
        self.network = u.road.network
        self.edges: list[tuple[str, str]] | None = None
        if destination is not None:
            start = u.vehicle.lane_index
            path = self.network.shortest_path(start[1], destination)
            self.edges = [start[:2]] + list(zip(path[:-1], path[1:]))
            # Past the destination the car drives on along the road that continues it (a roundabout's exit road).
            following = self._next(self.edges[-1] + (0,))
            if following is not None:
                self.edges.append(following[:2])
            self.target = start

    def lane(self, ego):
        """(lane index, lane) the route follows where the ego is (see the class); on open road the ego's own. Call
        it as the car moves (at every step or every few steps): passing a lane's end moves it to the next lane."""
        if self.edges is None:
            return ego.lane_index, ego.lane
        for _ in range(len(self.edges)):  # several lanes at once if called seldom and the lanes are short
            lane = self.network.get_lane(self.target)
            if not lane.after_end(ego.position):
                break
            a, b, i = self.target
            following = self._next(self.target)
            if following is None:
                break
            # highway-env's choice: the same lane number where the next road has as many lanes, else the lane
            # nearest the car's place projected on the lane centre it leaves.
            projected = lane.position(lane.local_coordinates(ego.position)[0], 0)
            number, _ = self.network.next_lane_given_next_road(a, b, i, following[1], None, projected)
            self.target = (b, following[1], number)
        return self.target, self.network.get_lane(self.target)

    def heading_ahead(self, index, lane, longitudinal: float, distance: float) -> float:
        """The route's direction `distance` metres along it from `longitudinal` on `lane` (radians, world frame).
        Not highway-env's `RoadNetwork.position_heading_along_route`: that keeps the current lane number on the next
        road even where the next road has fewer lanes (IndexError from a roundabout's inner ring onto its exit), and
        it knows no road past the route's end."""
        target = longitudinal + distance
        for _ in range(16):  # a few roads at most: the preview is a few tens of metres
            if target <= lane.length:
                break
            following = self._next(index)
            if following is None:
                return lane.heading_at(lane.length)
            target -= lane.length
            index, lane = following, self.network.get_lane(following)
        return lane.heading_at(min(target, lane.length))

    def _next(self, index):
        """The lane after `index`: the route's next road, past the route's end (or on open road) the road that
        continues this lane where it ends; the same lane number where the next road has it. None where none does."""
        a, b, i = index
        if self.edges is not None and (a, b) in self.edges[:-1]:
            c = self.edges[self.edges.index((a, b)) + 1][1]
        else:
            current = self.network.get_lane(index)
            end = current.position(current.length, 0)
            c = next((c for c in sorted(self.network.graph.get(b, {}))
                      if np.linalg.norm(self.network.get_lane((b, c, 0)).position(0, 0) - end) < 1.0), None)
            if c is None:
                return None
        lanes = self.network.graph[b][c]
        return (b, c, i if i < len(lanes) else 0)


def ego_state(ego, route: Route) -> np.ndarray:
    """(S,) speed, heading relative to the route's lane and lateral offset from its centre (`Route.lane`: where the
    road branches, the lane the route takes, else the ego's); the route's direction ROUTE_PREVIEW_M metres ahead
    relative to the ego's heading; the number of
    lanes of its road to its left and to its right; the gap to the vehicle ahead in the ego's lane and its speed
    minus the ego's; then for each of the NEIGHBOURS nearest other
    vehicles (closest first) its position and velocity relative to the ego, in the ego's frame (see
    `unified.sim.env.STATE_NAMES`)."""
    index, lane = route.lane(ego)
    longitudinal, lateral = lane.local_coordinates(ego.position)
    heading = utils.wrap_to_pi(ego.heading - lane.heading_at(longitudinal))
    preview = [utils.wrap_to_pi(route.heading_ahead(index, lane, longitudinal, d) - ego.heading)
               for d in ROUTE_PREVIEW_M]
    network = ego.road.network
    sideways = [network.get_lane(side).local_coordinates(ego.position)[1]
                for side in network.all_side_lanes(ego.lane_index)]  # > 0: that lane's centre is to the ego's left
    width = ego.lane.width_at(ego.lane.local_coordinates(ego.position)[0])
    lanes = [sum(s > width / 2 for s in sideways), sum(s < -width / 2 for s in sideways)]
    front, _ = ego.road.neighbour_vehicles(ego, ego.lane_index)
    gap = ego.lane_distance_to(front) if front is not None else SENSE_RANGE_M
    lead = [gap, front.speed - ego.speed] if front is not None and gap < SENSE_RANGE_M else [SENSE_RANGE_M, 0.0]
    c, s = np.cos(ego.heading), np.sin(ego.heading)
    to_ego = np.array([[c, s], [-s, c]])
    near = sorted((v for v in ego.road.vehicles if v is not ego
                   and np.linalg.norm(v.position - ego.position) < SENSE_RANGE_M),
                  key=lambda v: np.linalg.norm(v.position - ego.position))[:NEIGHBOURS]
    slots = np.tile([SENSE_RANGE_M, 0.0, 0.0, 0.0], (NEIGHBOURS, 1))
    for k, v in enumerate(near):
        slots[k, :2] = to_ego @ (v.position - ego.position)
        slots[k, 2:] = to_ego @ (v.velocity - ego.velocity)
    return np.concatenate([[ego.speed, heading, lateral], preview, lanes, lead, slots.reshape(-1)]).astype(np.float32)


def goal_reached(env) -> bool | None:
    """The env's own goal test where it has one (intersection: arrived, exit: took the exit), else None."""
    u = env.unwrapped
    if hasattr(u, "has_arrived"):
        return bool(u.has_arrived(u.vehicle))
    if hasattr(u, "_is_success"):
        return bool(u._is_success())
    return None


def jitter_start(env, offset_m: float, heading_rad: float, rng: np.random.Generator) -> None:
    """Move the ego up to `offset_m` off its lane centre and turn it up to `heading_rad` off the lane, uniformly."""
    ego = env.unwrapped.vehicle
    longitudinal, lateral = ego.lane.local_coordinates(ego.position)
    ego.position = ego.lane.position(longitudinal, lateral + rng.uniform(-offset_m, offset_m))
    ego.heading = ego.lane.heading_at(longitudinal) + rng.uniform(-heading_rad, heading_rad)


class ActionNoise:
    """A perturbation of the executed action that varies slowly, as a learner's errors do: an AR(1) process per
    action dimension, x_t = RHO x_(t-1) + e_t, with stationary standard deviation `std` (m/s^2, rad)."""

    RHO = 0.8  # correlation from one decision to the next: a perturbation lasts about 1 s at 5 Hz

    def __init__(self, std: tuple[float, float], rng: np.random.Generator):
        self.std, self.rng = np.asarray(std, np.float64), rng
        self.value = self.rng.normal(0.0, 1.0, 2) * self.std

    def __call__(self) -> np.ndarray:
        innovation = self.rng.normal(0.0, 1.0, 2) * self.std * np.sqrt(1.0 - self.RHO ** 2)
        self.value = self.RHO * self.value + innovation
        return self.value.astype(np.float32)


# intersection-v0 sets these class attributes of IDMVehicle (the traffic's and the expert's driver model) when it
# places its traffic, and never restores them: every later episode of any scenario in the same process would drive
# with the intersection's gaps and accelerations, so an episode would depend on which episodes its worker ran
# before it. Every episode starts from the library's values (read here, before this package builds any env).
IDM_DEFAULTS = {name: getattr(IDMVehicle, name) for name in ("DISTANCE_WANTED", "COMFORT_ACC_MAX", "COMFORT_ACC_MIN")}


def start_episode(env, suite: Suite, scenario: Scenario, seed: int, jitter: bool = False) -> None:
    """Reset `env` to the start of episode `seed`: the env's traffic, the scenario's traffic jitter and, for
    demonstrations (`jitter`), the ego started off its lane. The same seed gives the same episode whatever ran
    before it in the process."""
    for name, value in IDM_DEFAULTS.items():
        setattr(IDMVehicle, name, value)
    env.reset(seed=seed)
    # Braking stops the car: highway-env's kinematic model would turn a sustained brake command into driving
    # backwards (down to -40 m/s), which no car does. The expert never brakes that long; a learner may. With the
    # simulator's own speed floor at 0, a command below it is overridden to bring the car back: the speed dips at
    # most one simulation step of braking (0.33 m/s at 15 Hz) below 0 and settles back to 0.
    env.unwrapped.vehicle.MIN_SPEED = 0.0
    if any(scenario.traffic_jitter):
        jitter_traffic(env, *scenario.traffic_jitter, np.random.default_rng([seed, 2]))
    if jitter and any(suite.start_jitter):
        jitter_start(env, *suite.start_jitter, np.random.default_rng([seed, 1]))


def run_episode(
    suite: Suite, scenario: Scenario, driver, seed: int, index: int = 0, render: bool = True, env=None,
    jitter: bool = False,
) -> Episode:
    """Drive one episode of `scenario` with `driver`; `env` may be reused across episodes of the same scenario.
    `jitter` (expert demonstrations) starts the ego off its lane by up to the suite's `start_jitter` (and moves it
    so again every `jitter_every` decisions) and adds the suite's `action_noise` to what the car executes; the
    driver's own action is what is recorded."""
    env = env if env is not None else make_env(suite, scenario, render=render)
    start_episode(env, suite, scenario, seed, jitter)
    driver.reset(env, scenario, seed)
    instruction = pick_instruction(scenario, np.random.default_rng(seed))
    ego = env.unwrapped.vehicle
    route = Route(env, scenario.destination)
    noise = ActionNoise(suite.action_noise, np.random.default_rng([seed, 4])) if jitter and any(suite.action_noise) \
        else None
    ids = VehicleIds()
    ids(ego)  # the ego is vehicle 1
    frames, actions, states, records, executed_actions = [], [], [], [], []
    latencies, progress, end = [], 0.0, "time limit"
    # Where the scenario names a destination (a roundabout exit, an intersection branch), success needs the
    # ego to have driven onto it: the envs' own arrival tests accept any exit.
    reached = scenario.destination is None
    limit = max_steps(env, scenario, suite.policy_frequency)
    rejitter = np.random.default_rng([seed, 5]) if jitter and suite.jitter_every and any(suite.start_jitter) else None
    for t in range(limit):
        if rejitter is not None and t and t % suite.jitter_every == 0:
            jitter_start(env, *suite.start_jitter, rejitter)
        if render:
            frames.append(render_frame(env, f"scenario {scenario.name!r}, seed {seed}, step {t}"))
        start = time.perf_counter()
        intent = driver.act(env)
        latencies.append(1000.0 * (time.perf_counter() - start))
        records.append(explain(env, intent, ids))
        states.append(ego_state(ego, route))
        actions.append(intent.action)
        before = ego.position.copy()
        executed = intent.action if intent.executed is None else intent.executed
        if noise is not None:
            executed = executed + noise()
        executed_actions.append(executed)
        _, _, terminated, truncated, _ = env.step(to_env_action(executed))
        progress += float(np.linalg.norm(ego.position - before))
        reached = reached or scenario.destination in ego.lane_index[:2]
        if ego.crashed:
            end = "collision"
        elif not ego.on_road:
            end = "off road"
        elif terminated:
            end = "goal"
        if terminated or truncated or ego.crashed or not ego.on_road:
            break
    steps = len(actions)
    goal = goal_reached(env)
    summary = EpisodeSummary(
        steps=steps,
        success=end in ("time limit", "goal") and goal is not False and reached
        and progress >= (scenario.min_progress_m or 0.0),
        collision=end == "collision",
        offroad=end == "off road",
        end=end,
        progress_m=progress,
        mean_speed=float(np.mean([s[0] for s in states])) if states else 0.0,
        decision_ms=float(np.mean(latencies)) if latencies else 0.0,
    )
    return Episode(
        index=index, scenario=scenario.name, seed=seed, driver=driver.name, instruction=instruction,
        actions=np.asarray(actions, np.float32).reshape(-1, 2),
        states=np.asarray(states, np.float32).reshape(-1, len(STATE_NAMES)),
        causation=records, summary=summary, frames=np.stack(frames) if frames else None,
        latencies_ms=np.asarray(latencies),
        executed=np.asarray(executed_actions, np.float32).reshape(-1, 2)
        if driver.name == "dagger" or noise is not None else None,
    )
