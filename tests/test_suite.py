from pathlib import Path

import numpy as np
import pytest

from unified.errors import UnifiedError
from unified.sim.suite import Scenario, Suite, load_suite

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", ["train", "ood"])
def test_shipped_suites_load(name):
    suite = load_suite(ROOT / "recipes" / "data" / f"{name}.yaml")
    assert suite.scenarios and suite.image_size == (64, 64)


def test_train_and_ood_do_not_share_scenarios():
    """Out of distribution means new conditions: no OOD scenario is a train scenario (env, config and goal)."""
    train = load_suite(ROOT / "recipes/data/train.yaml")
    ood = load_suite(ROOT / "recipes/data/ood.yaml")
    as_key = lambda s: (s.env, tuple(sorted(s.config.items())), s.destination)  # noqa: E731
    assert not {as_key(s) for s in train.scenarios.values()} & {as_key(s) for s in ood.scenarios.values()}
    # ... for skills training shows: every OOD env family is trained on.
    assert {s.env for s in ood.scenarios.values()} - {s.env for s in train.scenarios.values()} <= {"two-way-v0"}


def write(tmp_path, text):
    path = tmp_path / "suite.yaml"
    path.write_text(text)
    return path


def test_unknown_env_lists_valid_ids(tmp_path):
    path = write(tmp_path, "scenarios:\n  a:\n    env: spaceship-v0\n")
    with pytest.raises(UnifiedError, match=r"scenarios\.a\.env.*spaceship-v0.*valid ones: .*highway-v0"):
        load_suite(path)


def test_unknown_config_key_lists_valid_keys(tmp_path):
    path = write(tmp_path, "scenarios:\n  a:\n    env: highway-v0\n    config: {lane_count: 3}\n")
    with pytest.raises(UnifiedError, match=r"unknown key 'lane_count'.*valid keys: .*lanes_count"):
        load_suite(path)


def test_unknown_suite_key_lists_valid_keys(tmp_path):
    path = write(tmp_path, "image_sz: [64, 64]\nscenarios:\n  a: {env: highway-v0}\n")
    expected = r"suite.yaml: unknown key\(s\) 'image_sz'; valid keys: scenarios, name, image_size"
    with pytest.raises(UnifiedError, match=expected):
        load_suite(path)


def test_suite_owned_key_is_refused(tmp_path):
    path = write(tmp_path, "scenarios:\n  a:\n    env: highway-v0\n    config: {policy_frequency: 15}\n")
    with pytest.raises(UnifiedError, match="set by the suite"):
        load_suite(path)


def test_bad_yaml_names_file_and_line(tmp_path):
    path = write(tmp_path, "scenarios:\n  a: {env: highway-v0\n")
    with pytest.raises(UnifiedError, match=r"suite.yaml:\d+: not valid YAML"):
        load_suite(path)


def test_wrong_type_names_field(tmp_path):
    path = write(tmp_path, "policy_frequency: fast\nscenarios:\n  a: {env: highway-v0}\n")
    with pytest.raises(UnifiedError, match=r"policy_frequency: expected int"):
        load_suite(path)


def test_weighted_round_robin_follows_weights_and_is_stable():
    suite = Suite({"a": Scenario("highway-v0", weight=3, name="a"), "b": Scenario("merge-v0", weight=1, name="b")})
    picks = [suite.scenario_for_episode(i).name for i in range(400)]
    assert picks.count("a") == 300 and picks.count("b") == 100
    # Interleaved, not in blocks: no run of "a" longer than 3.
    assert "aaaa" not in "".join(picks)
    assert picks == [suite.scenario_for_episode(i).name for i in range(400)]


def test_demonstrations_start_off_the_lane_and_the_expert_brings_the_car_back(tmp_path):
    from unified.sim.drivers import ExpertDriver
    from unified.sim.rollout import run_episode

    suite = load_suite(write(tmp_path, "start_jitter: [0.6, 0.03]\nscenarios:\n  highway:\n    env: highway-v0\n"
                                       "    config: {lanes_count: 3, vehicles_count: 5}\n    max_steps: 30\n"))
    offsets = []
    for seed in range(4):
        jittered = run_episode(suite, suite.scenarios["highway"], ExpertDriver(), seed, render=False, jitter=True)
        plain = run_episode(suite, suite.scenarios["highway"], ExpertDriver(), seed, render=False)
        assert abs(plain.states[0, 1]) < 1e-6 and abs(plain.states[0, 2]) < 1e-6  # evaluation starts on the lane
        assert abs(jittered.states[0, 1]) <= 0.03 + 1e-6 and abs(jittered.states[0, 2]) <= 0.6 + 1e-6
        assert jittered.summary.success
        offsets.append(abs(jittered.states[0, 2]))
        assert abs(jittered.states[-1, 2]) < 0.05  # within 6 s the expert has brought the car back to a lane centre
    assert max(offsets) > 0.1
    with pytest.raises(UnifiedError, match="start_jitter"):
        load_suite(write(tmp_path, "start_jitter: [-1, 0]\nscenarios:\n  h:\n    env: highway-v0\n"))


def test_demonstrations_are_moved_off_the_lane_again_every_jitter_every_decisions(tmp_path):
    from unified.sim.drivers import ExpertDriver
    from unified.sim.rollout import run_episode

    text = ("start_jitter: [1.0, 0.1]\njitter_every: 10\nscenarios:\n  highway:\n    env: highway-v0\n"
            "    config: {lanes_count: 3, vehicles_count: 5}\n    max_steps: 40\n")
    suite = load_suite(write(tmp_path, text))
    once = load_suite(write(tmp_path, text.replace("jitter_every: 10", "jitter_every: 0")))
    jumps = []
    for seed in range(3):
        again = run_episode(suite, suite.scenarios["highway"], ExpertDriver(), seed, render=False, jitter=True)
        plain = run_episode(once, once.scenarios["highway"], ExpertDriver(), seed, render=False, jitter=True)
        assert again.summary.success and plain.summary.success
        # Up to step 9 the two are the same episode; at step 10 the car has been moved by up to 1 m and 0.1 rad.
        np.testing.assert_allclose(again.states[:10], plain.states[:10], atol=1e-5)
        moved = again.states[10, 1:3] - plain.states[10, 1:3]
        assert abs(moved[0]) <= 0.1 + 1e-5 and abs(moved[1]) <= 1.0 + 1e-5
        jumps.append(abs(moved[1]))
        assert abs(again.states[-1, 2]) < 0.25  # and the expert brings it back each time
    assert max(jumps) > 0.3  # the re-jitters really move the car
    with pytest.raises(UnifiedError, match="jitter_every"):
        load_suite(write(tmp_path, "jitter_every: -1\nscenarios:\n  h:\n    env: highway-v0\n"))

def test_an_unknown_destination_is_refused_naming_the_road_nodes(tmp_path):
    path = write(tmp_path, "scenarios:\n  a:\n    env: intersection-v0\n    destination: o9\n")
    with pytest.raises(UnifiedError, match=r"scenarios\.a\.destination: 'o9' is not a node.*nodes: .*o1"):
        load_suite(path)


def test_a_destination_must_be_named_to_the_driver(tmp_path):
    # ir1 is a node of the intersection, but no default instruction names it: the suite must give its own.
    path = write(tmp_path, "scenarios:\n  a:\n    env: intersection-v0\n    destination: il2\n")
    with pytest.raises(UnifiedError, match="has no default instructions; give `instructions:` that name the goal"):
        load_suite(path)
    path = write(tmp_path, "scenarios:\n  a:\n    env: intersection-v0\n    destination: il2\n"
                           "    instructions: [Drive onto the far side of the junction.]\n")
    assert load_suite(path).scenarios["a"].destination == "il2"


def test_the_instructions_of_a_destination_name_it(tmp_path):
    from unified.sim.language import instructions_for

    suite = load_suite(ROOT / "recipes" / "data" / "ood.yaml")
    for scenario in suite.scenarios.values():
        if scenario.destination is None:
            continue
        words = {"o1": "left", "o2": "straight", "o3": "right", "exs": "first", "nxs": "second", "wxs": "third"}
        assert all(words[scenario.destination] in text for text in instructions_for(scenario)), scenario.name


def starts(suite, scenario, seeds):
    from unified.sim.env import make_env
    from unified.sim.rollout import start_episode
    from unified.sim.traffic import initial_traffic

    env = make_env(suite, scenario, render=False)
    out = []
    for seed in seeds:
        start_episode(env, suite, scenario, seed)
        out.append(initial_traffic(env))
    return out


def test_merge_v0_replays_its_traffic_without_jitter_and_not_with_it(tmp_path):
    from unified.sim.seeds import data_seed
    from unified.sim.traffic import same_traffic

    seeds = [data_seed(0, i) for i in range(40)]
    plain = load_suite_text(tmp_path, "scenarios:\n  merge:\n    env: merge-v0\n")
    shipped = load_suite(ROOT / "recipes" / "data" / "train.yaml")
    for suite, expect_replays in ((plain, True), (shipped, False)):
        s = starts(suite, suite.scenarios["merge"], seeds)
        replays = sum(same_traffic(s[i], s[j]) for i in range(40) for j in range(i + 1, 40))
        assert (replays > 0) == expect_replays, replays


def load_suite_text(tmp_path, text):
    return load_suite(write(tmp_path, text))


@pytest.mark.parametrize("destination,sign", [("o3", 1.0), ("o1", -1.0)])
def test_the_state_follows_the_navigation_route_and_previews_its_turns(tmp_path, destination, sign):
    """At a junction the ego's pose is measured against the lane its route takes (not whichever lane is nearest,
    which at the junction's mouth is the straight one), and the route's direction ahead announces the turn before
    the expert steers into it: right (o3) positive, left (o1) negative."""
    import numpy as np

    from unified.sim.drivers import ExpertDriver
    from unified.sim.env import STATE_NAMES
    from unified.sim.rollout import run_episode

    suite = load_suite(write(tmp_path, f"scenarios:\n  turn:\n    env: intersection-v0\n"
                                       f"    destination: {destination}\n    instructions: [Turn.]\n"))
    episode = run_episode(suite, suite.scenarios["turn"], ExpertDriver(), seed=3, render=False)
    assert episode.summary.success
    column = {name: episode.states[:, k] for k, name in enumerate(STATE_NAMES)}
    turning = np.flatnonzero(sign * episode.actions[:, 1] > 0.3)
    assert len(turning) >= 3, "the expert turns"
    onset = int(turning[0])
    assert abs(column["route_heading_16m"][0]) < 0.05  # the approach is straight
    announced = np.flatnonzero(sign * column["route_heading_16m"][:onset] > 0.5)
    assert len(announced) and onset - announced[0] >= 2, "the turn is announced at least 2 steps (0.4 s) ahead"
    # The expert follows its route: never more than 1.5 m and 0.5 rad off the route's lane, and it ends on it.
    assert np.abs(column["lane_offset"]).max() < 1.5 and np.abs(column["heading"]).max() < 0.5
    assert abs(column["lane_offset"][-1]) < 0.2 and abs(column["route_heading_8m"][-1]) < 0.05


def test_the_state_measures_the_pose_against_the_lane_the_expert_steers_for(tmp_path):
    """Along a route the state's heading and offset are measured against the lane highway-env's route following
    (the expert's) targets, so the expert's recorded steering can be read from the state: at the roundabout, where
    the nearest route lane was the entry road while the expert already steered onto the ring's inner lane, the
    expert's linearised lane-keeping law on the state did not correlate with its steering (-0.05 on these six
    episodes), and now does (0.64; the rest is the ring's curvature, which the route preview carries)."""
    import numpy as np
    from unified.eval.state_response import expert_gains

    from unified.sim.drivers import ExpertDriver
    from unified.sim.env import make_env
    from unified.sim.rollout import Route, ego_state, run_episode, start_episode

    suite = load_suite(write(tmp_path, "scenarios:\n  roundabout:\n    env: roundabout-v0\n    destination: exs\n"
                                       "    config: {duration: 14}\n    instructions: [Exit.]\n"))
    scenario = suite.scenarios["roundabout"]
    env = make_env(suite, scenario, render=False)
    states, steering = [], []
    for seed in range(6):
        episode = run_episode(suite, scenario, ExpertDriver(), seed=seed, render=False, env=env)
        assert episode.summary.success
        states.append(episode.states)
        steering.append(episode.actions[:, 1])
    states, steering = np.concatenate(states), np.concatenate(steering)
    moving = states[:, 0] >= 5.0
    gains = expert_gains(states[moving, 0])
    law = np.clip(gains["heading"] * states[moving, 1] + gains["lane_offset"] * states[moving, 2], -0.785, 0.785)
    assert np.corrcoef(law, steering[moving])[0, 1] > 0.5
    # The lane it measures against is the expert's target lane at every step of an episode, and asking seldom (as a
    # policy re-planning every few steps does) gives the same lane as asking at every step.
    expert = ExpertDriver()
    start_episode(env, suite, scenario, seed=2)
    expert.reset(env, scenario, 2)
    every, seldom = Route(env, scenario.destination), Route(env, scenario.destination)
    for t in range(60):
        action = expert.act(env).action
        assert every.lane(env.unwrapped.vehicle)[0] == expert.shadow.target_lane_index
        if t % 5 == 0:
            assert seldom.lane(env.unwrapped.vehicle)[0] == expert.shadow.target_lane_index
            assert np.array_equal(ego_state(env.unwrapped.vehicle, seldom), ego_state(env.unwrapped.vehicle, every))
        env.step(action)
        if env.unwrapped.vehicle.crashed:
            break

def test_demonstrations_drive_with_action_noise_and_record_the_experts_action(tmp_path):
    """DART: the car executes the expert's action plus a slowly varying perturbation of the suite's size; the
    episode records the expert's own action (the label), the same for the same seed; evaluation drives without."""
    import numpy as np

    from unified.sim.drivers import ExpertDriver
    from unified.sim.rollout import run_episode

    suite = load_suite(write(tmp_path, "action_noise: [0.5, 0.03]\nscenarios:\n  highway:\n    env: highway-v0\n"
                                       "    config: {lanes_count: 3, vehicles_count: 5}\n    max_steps: 60\n"))
    scenario = suite.scenarios["highway"]
    noisy = [run_episode(suite, scenario, ExpertDriver(), seed, render=False, jitter=True) for seed in range(3)]
    perturbation = np.concatenate([e.executed - e.actions for e in noisy])
    assert np.allclose(perturbation.std(0), (0.5, 0.03), rtol=0.35)
    lag = np.mean([np.corrcoef(e.executed[1:, 1] - e.actions[1:, 1], e.executed[:-1, 1] - e.actions[:-1, 1])[0, 1]
                   for e in noisy])
    assert lag > 0.5  # slowly varying, not white noise
    again = run_episode(suite, scenario, ExpertDriver(), 0, render=False, jitter=True)
    assert np.array_equal(again.actions, noisy[0].actions) and np.array_equal(again.executed, noisy[0].executed)
    plain = run_episode(suite, scenario, ExpertDriver(), 0, render=False)
    assert plain.executed is None and not np.array_equal(plain.states, noisy[0].states)
    with pytest.raises(UnifiedError, match="action_noise"):
        load_suite(write(tmp_path, "action_noise: [-1, 0]\nscenarios:\n  h:\n    env: highway-v0\n"))


def test_a_car_a_learner_drove_into_another_lane_is_labelled_to_keep_that_lane(tmp_path):
    """DAgger asks the expert about states its own drives never reach. A car a learner let drift into the next lane
    is labelled to keep the lane it is now in (the lane the state measures its offset against on open road), not
    to steer back across the road to the expert's earlier target lane, which nothing in the state names. The
    expert's own drives, lane changes included, are unchanged by the rule."""
    import numpy as np

    from unified.sim.drivers import ExpertDriver
    from unified.sim.env import make_env, to_env_action
    from unified.sim.rollout import Route, ego_state, run_episode, start_episode

    class WithoutTheRule(ExpertDriver):
        def reset(self, env, scenario, seed):
            super().reset(env, scenario, seed)
            self.open_road = False

    traffic = load_suite(write(tmp_path, "start_jitter: [0.6, 0.03]\nscenarios:\n  highway:\n    env: highway-v0\n"
                                         "    config: {lanes_count: 3, vehicles_count: 20, duration: 20}\n"
                                         "    instructions: [Drive.]\n"))
    changes = 0
    for seed in range(3):
        drives = [run_episode(traffic, traffic.scenarios["highway"], driver, seed, render=False, jitter=True)
                  for driver in (ExpertDriver(), WithoutTheRule())]
        assert np.array_equal(drives[0].actions, drives[1].actions)
        changes += int(np.abs(np.diff(drives[0].states[:, 2])).max() > 2.0)  # the lane measured against changed
    assert changes, "no lane change in these drives: they would not test that lane changes are unchanged"

    suite = load_suite(write(tmp_path, "scenarios:\n  highway:\n    env: highway-v0\n"
                                       "    config: {lanes_count: 3, vehicles_count: 0, duration: 10}\n"
                                       "    instructions: [Drive.]\n"))
    scenario = suite.scenarios["highway"]
    env = make_env(suite, scenario, render=False)
    start_episode(env, suite, scenario, seed=0)
    expert = ExpertDriver()
    expert.reset(env, scenario, 0)
    for _ in range(3):
        env.step(to_env_action(expert.act(env).action))
    ego = env.unwrapped.vehicle
    before = ego.lane_index
    other = (before[0], before[1], before[2] + 1 if before[2] < 2 else before[2] - 1)
    lane = env.unwrapped.road.network.get_lane(other)
    s, _ = lane.local_coordinates(ego.position)
    ego.position = lane.position(s, 0.3)  # 0.3 m right of the centre of the next lane, heading along it
    ego.heading = lane.heading_at(s)
    ego.lane_index, ego.lane = other, lane
    intent = expert.act(env)
    assert expert.shadow.target_lane_index == other
    state = ego_state(ego, Route(env, scenario.destination))
    assert abs(state[2] - 0.3) < 1e-3  # the state measures 0.3 m off the lane the car is in
    # A small correction towards that lane's centre (left, negative), not a swerve back across the road.
    assert -0.05 < intent.action[1] < 0.0
