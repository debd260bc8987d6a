"""`unified eval state-response`: does a policy steer by its state, as the expert does?

The expert's steering is a feedback law on the car's pose in its lane (highway-env's `ControlledVehicle.
steering_control`): a heading error of 0.02 rad at 8 m/s moves its wheel by about 0.06 rad. A learned driver that
has not learned this law drives the expert's average path blind and leaves the road at the first drift. This
command measures it directly: on held-out observations it moves one state value (the heading, or the lateral
offset, against the route's lane) by +-delta, everything else unchanged, and reads how far the policy's first
steering command moves (a central difference), beside the expert's own gain at the same speed (the derivative of
its steering law at the lane centre, from the library's constants). It reads an exported model or a state MLP.
The route headings are relative to the car's heading, so a heading moved alone is not the state of a turned car
(`--turn-route` moves them with it); a policy can steer by either, and the state MLP, which drives as well as the
expert, answers either way with a fraction of the expert's gain, so the share is a comparison between policies, not
a score out of 100%.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np
from tqdm import tqdm
from unified.tokenizers.action import READOUT

from unified.errors import UnifiedError

# state name -> default perturbation (heading in rad, offset in m): inside the expert's linear range at 5 m/s.
PERTURBED = {"heading": 0.02, "lane_offset": 0.2}
MIN_SPEED = 5.0  # m/s: below it the expert's gains grow without bound and its steering saturates


def expert_gains(speed: np.ndarray) -> dict[str, np.ndarray]:
    """d steering / d heading and d steering / d lateral offset of highway-env's lane-following law at the lane
    centre, to first order, at each `speed`: steering = arctan(2 tan(arcsin(L / 2v * KP_H * (ref - heading)))),
    ref = lane heading + arcsin(-KP_LAT * offset / v), so d/d heading = -L KP_H / v and d/d offset =
    -L KP_H KP_LAT / v^2."""
    from highway_env.vehicle.controller import ControlledVehicle as C

    speed = np.asarray(speed, np.float64)
    return {"heading": -C.LENGTH * C.KP_HEADING / speed,
            "lane_offset": -C.LENGTH * C.KP_HEADING * C.KP_LATERAL / speed ** 2}


def state_response(*, model: Path, data: Path, observations: int = 60, heading: float = PERTURBED["heading"],
                   offset: float = PERTURBED["lane_offset"], mode: Literal["direct", "continuous"] = "direct",
                   readout: Literal["mode", "mean", "median"] = READOUT, turn_route: bool = False,
                   json: Path | None = None, device: Literal["auto", "cpu", "cuda"] = "auto",
                   progress: bool = True) -> dict:
    """Move the heading by +-`heading` rad and the lane offset by +-`offset` m in `observations` held-out
    observations of `data` (speed >= 5 m/s) and report the mean change of the model's first steering command per
    unit, beside the expert's gain at the same speeds. The command is read from the action tokens
    (`mode direct`, each token read by `readout`, as `Policy.act` reads it) or from the continuous head
    (`continuous`). `model` is an exported model or a state MLP (`unified baseline fit-state-mlp`, read by its bins
    or its regression, `direct` only). The route headings are the route's direction ahead relative to the car's, so
    turning the car moves them by the opposite of its heading; `turn_route` moves them so when it moves the heading
    (the state of a turned car), where by default the heading moves alone."""
    from unified.eval.latency import observations as held_out_observations
    from unified.eval.state_mlp import StateMLP, is_state_mlp

    from unified.model_dir import resolve_device
    from unified.outputs import check_file, write_report
    from unified.policy import Policy
    from unified.sim.env import STATE_NAMES

    if mode not in ("direct", "continuous"):
        raise UnifiedError(f"--mode: {mode!r} is not direct or continuous")
    if heading <= 0 or offset <= 0:
        raise UnifiedError(f"--heading and --offset must be positive, got {heading} and {offset}")
    if json is not None:
        check_file(json, "state_response", [model, data])
    if is_state_mlp(model):
        if mode != "direct":
            raise UnifiedError(f"{model}: a state MLP has no continuous head; use --mode direct")
        mlp = StateMLP.load(model)
        names, history = list(STATE_NAMES), 1
        if len(mlp.config["state_mean"]) != len(names):
            raise UnifiedError(f"{model}: this state MLP reads {len(mlp.config['state_mean'])} state values, the "
                               f"store format of today {len(names)}; fit it again on a store of today's format")

        def steering(frames, instruction, state) -> float:
            return float(mlp.plan(state, readout)[0, 1])
    else:
        policy = Policy.from_pretrained(model, device=resolve_device(device))
        if not policy.config.use_state:
            raise UnifiedError(f"{model}: this model reads no state (use_state is off); there is nothing to perturb")
        names, history = list(policy.tokenizers.state.names), policy.config.history

        def steering(frames, instruction, state) -> float:
            result = policy.act(frames, instruction, state=state, reason=False, continuous=mode == "continuous",
                                readout=readout)
            return float(np.asarray(result.actions)[0, 1])
    if names[:3] != list(STATE_NAMES[:3]):
        raise UnifiedError(f"{model}: its state starts {names[:3]}, not {list(STATE_NAMES[:3])}")
    route = [i for i, name in enumerate(names) if name.startswith("route_heading_")]
    if turn_route and not route:
        raise UnifiedError(f"{model}: its state has no route headings for --turn-route to move")
    seen = held_out_observations(data, observations, history, min_speed=MIN_SPEED)
    if not seen:
        raise UnifiedError(f"{data}: no held-out step has the car moving at {MIN_SPEED} m/s or more")
    deltas = {"heading": heading, "lane_offset": offset}
    slopes = {name: [] for name in deltas}
    speeds = []
    for frames, instruction, observed in tqdm(seen, desc="state response", unit="obs", disable=not progress):
        speeds.append(float(observed[0]))
        for name, delta in deltas.items():
            steer = []
            for sign in (1.0, -1.0):
                state = observed.copy()
                state[names.index(name)] += sign * delta
                if turn_route and name == "heading":
                    state[route] -= sign * delta
                steer.append(steering(frames, instruction, state))
            slopes[name].append((steer[0] - steer[1]) / (2 * delta))
    speeds = np.asarray(speeds)
    gains = expert_gains(speeds)
    rows = {}
    rng = np.random.default_rng(0)
    for name in deltas:
        values = np.asarray(slopes[name])
        boot = [values[rng.integers(0, len(values), len(values))].mean() for _ in range(2000)]
        rows[name] = {
            "delta": deltas[name], "model_slope": float(values.mean()),
            "model_slope_ci95": [float(np.percentile(boot, 2.5)), float(np.percentile(boot, 97.5))],
            "expert_slope": float(gains[name].mean()),
            "share_of_expert": float(values.mean() / gains[name].mean()),
            "unmoved": float(np.mean(values == 0.0)),
        }
    report = {"model": str(model), "mode": mode, "readout": readout, "turn_route": turn_route, "data": str(data),
              "observations": len(seen), "mean_speed": float(speeds.mean()), "per_state": rows}
    print(f"steering response to the state ({mode}), {len(seen)} held-out observations of {data} (mean speed "
          f"{speeds.mean():.1f} m/s), first step of the chunk, central differences:")
    units = {"heading": "rad", "lane_offset": "m"}
    for name, row in rows.items():
        low, high = row["model_slope_ci95"]
        turned = " (the route headings turned with it)" if turn_route and name == "heading" else ""
        print(f"  {name} +-{row['delta']} {units[name]}{turned}: model {row['model_slope']:+.2f} [{low:+.2f}, "
              f"{high:+.2f}] rad per {units[name]}, expert {row['expert_slope']:+.2f} ({row['share_of_expert']:.0%} of "
              f"it); the command did not move in {row['unmoved']:.0%} of observations")
    if json is not None:
        write_report(Path(json), report, "state_response")
    return report
