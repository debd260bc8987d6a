"""Initial traffic: randomising it where an env barely does, and comparing two episodes' starts, so that an
evaluation episode can be shown not to be a near-replay of a training one."""

from __future__ import annotations

import numpy as np

NEAR_POSITION_M = 3.0  # two starts whose vehicles all lie this close ...
NEAR_SPEED_MS = 1.5  # ... and drive this close in speed are the same traffic, seen twice


def jitter_traffic(env, position_m: float, speed_ms: float, rng: np.random.Generator) -> None:
    """Move every vehicle but the ego up to `position_m` along its lane and change its speed by up to `speed_ms`,
    uniformly; a move that would bring it within 10 m of another vehicle on its lane is not made."""
    u = env.unwrapped
    for vehicle in u.road.vehicles:
        if vehicle is u.vehicle or vehicle.lane is None:
            continue
        shift, boost = rng.uniform(-position_m, position_m), rng.uniform(-speed_ms, speed_ms)
        lane = vehicle.lane
        longitudinal, lateral = lane.local_coordinates(vehicle.position)
        target = longitudinal + shift
        clear = all(
            abs(lane.local_coordinates(other.position)[0] - target) > 10.0
            for other in u.road.vehicles if other is not vehicle and other.lane_index == vehicle.lane_index
        )
        if clear and 0.0 <= target <= lane.length:
            vehicle.position = lane.position(target, lateral)
            vehicle.heading = lane.heading_at(target)
        vehicle.speed = max(0.0, vehicle.speed + boost)


def initial_traffic(env) -> np.ndarray:
    """(N, 3) x, y (m) and speed (m/s) of every vehicle but the ego after reset, sorted by position."""
    u = env.unwrapped
    rows = [(*v.position, v.speed) for v in u.road.vehicles if v is not u.vehicle]
    return np.array(sorted(rows), np.float64).reshape(-1, 3)


def same_traffic(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether two starts are a near-replay: as many vehicles, and each vehicle of either start has one in the
    other within NEAR_POSITION_M and NEAR_SPEED_MS."""
    if a.shape != b.shape or len(a) == 0:
        return False
    close = (np.hypot(a[:, None, 0] - b[None, :, 0], a[:, None, 1] - b[None, :, 1]) < NEAR_POSITION_M) & \
        (np.abs(a[:, None, 2] - b[None, :, 2]) < NEAR_SPEED_MS)  # (N, N)
    return bool(close.any(1).all() and close.any(0).all())
