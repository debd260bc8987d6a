"""Build a highway-env scenario of a suite: continuous actions, off-screen frames, no reward shaping."""

from __future__ import annotations

import os
import tempfile
from functools import cache

import numpy as np

from unified.errors import UnifiedError
from unified.sim.suite import Scenario, Suite, env_class

# Action limits in the simulator's units; the env maps [-1, 1] onto them.
ACCELERATION_LIMIT = 5.0  # m/s^2
STEERING_LIMIT = float(np.pi / 4)  # rad
ACTION_NAMES = ("acceleration", "steering")
ACTION_UNITS = ("m/s^2", "rad")
# The ego state the policy reads, what a car's own sensors, map and navigation report: its speed and pose in the lane
# of its route (where the road branches, the lane the navigation route takes, else the lane it is in); how the route
# turns ahead (its direction ROUTE_PREVIEW_M metres further along, relative to the car's heading); how many
# lanes of its road lie to its left and to its right (where a lane change can go); the vehicle ahead in its lane
# (gap and speed difference, what adaptive cruise control's radar measures); and the NEIGHBOURS nearest other
# vehicles within SENSE_RANGE_M (as highway-env's own Kinematics observation reports them): position and velocity
# relative to the ego, in its frame (x ahead, y right). An empty slot reads as a vehicle at the edge of the range,
# straight ahead, at the ego's speed: nothing to react to.
NEIGHBOURS = 3
SENSE_RANGE_M = 60.0
ROUTE_PREVIEW_M = (8.0, 16.0)
EGO_STATE_NAMES = ("speed", "heading", "lane_offset") + tuple(f"route_heading_{d:g}m" for d in ROUTE_PREVIEW_M)
STATE_NAMES = EGO_STATE_NAMES + ("lanes_left", "lanes_right", "lead_gap", "lead_dv") + tuple(
    f"car{k}_{f}" for k in range(1, NEIGHBOURS + 1) for f in ("dx", "dy", "dvx", "dvy"))
STATE_UNITS = (("m/s", "rad", "m") + ("rad",) * len(ROUTE_PREVIEW_M) + ("lanes", "lanes", "m", "m/s")
               + ("m", "m", "m/s", "m/s") * NEIGHBOURS)


def use_offscreen_rendering() -> None:
    """pygame with SDL_VIDEODRIVER=dummy renders all-black frames without an error; off-screen needs it unset."""
    if os.environ.get("SDL_VIDEODRIVER") == "dummy":
        del os.environ["SDL_VIDEODRIVER"]
    # SDL otherwise turns SIGINT/SIGTERM into quit events that nothing reads, so a worker could not be stopped.
    os.environ.setdefault("SDL_NO_SIGNAL_HANDLERS", "1")
    # SDL complains on stderr for every env without a runtime dir; a private one keeps the console clean.
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if not runtime or not os.path.isdir(runtime):
        os.environ["XDG_RUNTIME_DIR"] = tempfile.mkdtemp(prefix="unified-xdg-")


@cache
def _scenario_class(env_id: str) -> type:
    base = env_class(env_id)

    # Several scenarios' rewards read discrete meta-action attributes (speed_index, `action in [0, 2]`)
    # and fail with continuous actions; the data engine and the evaluation never use rewards.
    def _rewards(self, action):
        return {}

    def _reward(self, action):
        return 0.0

    # Nor do they read the env's observation (frames and the ego state are read directly), and building the
    # Kinematics table (pandas) every step cost about a third of the simulation time.
    def define_spaces(self):
        base.define_spaces(self)
        empty = np.zeros(self.observation_type.space().shape, np.float32)
        self.observation_type.observe = lambda: empty

    return type(base.__name__, (base,), {"_rewards": _rewards, "_reward": _reward, "define_spaces": define_spaces,
                                         "__module__": __name__})


def make_env(suite: Suite, scenario: Scenario, render: bool = True):
    """The highway-env environment of `scenario`, rendering (H, W, 3) uint8 frames centred on the ego."""
    if render:
        use_offscreen_rendering()
    h, w = suite.image_size
    config = dict(scenario.config)
    if scenario.destination is not None and "destination" in env_class(scenario.env).default_config():
        config["destination"] = scenario.destination  # the env's own route and arrival test agree with ours
    config.update(
        action={
            "type": "ContinuousAction",
            "acceleration_range": [-ACCELERATION_LIMIT, ACCELERATION_LIMIT],
            "steering_range": [-STEERING_LIMIT, STEERING_LIMIT],
        },
        observation={"type": "Kinematics"},
        policy_frequency=suite.policy_frequency,
        offscreen_rendering=True,
        screen_width=w,
        screen_height=h,
        scaling=w / suite.view_m,
        centering_position=list(suite.centering),
    )
    try:
        return _scenario_class(scenario.env)(config=config, render_mode="rgb_array" if render else None)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise UnifiedError(
            f"scenario {scenario.name!r} ({scenario.env}) could not be built with its config: {e}"
        ) from e


def max_steps(env, scenario: Scenario, policy_frequency: int) -> int:
    """Episode cap in policy steps: the scenario's, else the env's duration, else 100."""
    if scenario.max_steps is not None:
        return scenario.max_steps
    duration = env.unwrapped.config.get("duration")
    return int(round(duration * policy_frequency)) if duration else 100


def to_env_action(action: np.ndarray) -> np.ndarray:
    """(2,) action in m/s^2 and rad -> the env's [-1, 1] box."""
    return np.clip(np.asarray(action, np.float64) / (ACCELERATION_LIMIT, STEERING_LIMIT), -1.0, 1.0)


def render_frame(env, where: str) -> np.ndarray:
    """Render the current frame, refusing blank ones (all one colour), which a broken display setup yields silently."""
    frame = env.render()
    if frame is None or frame.ndim != 3 or frame.shape[2] != 3:
        got = None if frame is None else frame.shape
        raise UnifiedError(f"{where}: the simulator returned no RGB frame (got {got})")
    if int(frame.max()) - int(frame.min()) < 8:
        raise UnifiedError(
            f"{where}: the simulator rendered a blank frame (all pixels ~{int(frame.mean())}); "
            "off-screen rendering needs SDL_VIDEODRIVER unset (not 'dummy')"
        )
    # render() arms highway-env's automatic rendering of the intermediate simulation frames of the next step,
    # which nobody looks at here: two extra renders per step.
    env.unwrapped.enable_auto_render = False
    return np.ascontiguousarray(frame, dtype=np.uint8)
