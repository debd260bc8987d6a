import json
from pathlib import Path

import numpy as np
import pytest
from unified.eval.closed_loop import closed_loop, compare

from unified.errors import UnifiedError
from unified.sim.seeds import is_evaluation_seed


def test_compare_runs_pools_one_lever_over_training_runs(tmp_path, capsys):
    from unified.eval.closed_loop import compare_runs

    def write(name, outcomes, suite_hash="h"):
        episodes = [{"scenario": "s", "seed": seed, "success": ok} for seed, ok in enumerate(outcomes)]
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps({"model": name, "suite": "train", "suite_hash": suite_hash, "episodes": episodes}))
        return path

    first = [write("base_s0", [0, 0, 1, 1]), write("base_s1", [1, 0, 0])]
    second = [write("lever_s0", [1, 1, 1, 1]), write("lever_s1", [1, 1, 0])]
    result = compare_runs(first=first, second=second)
    table = capsys.readouterr().out
    assert result["pooled"]["pairs"] == 7 and "| **pooled** |  |  | 7 | 0.43 / 0.86 | +0.43 [" in table
    assert "| 0 | base_s0 | lever_s0 | 4 | 0.50 / 1.00 | +0.50 [" in table and "| 0 / 2 |" in table
    with pytest.raises(UnifiedError, match="one report per training run each, in the same order; got 2 and 1"):
        compare_runs(first=first, second=second[:1])
    with pytest.raises(UnifiedError, match="reports of different suites"):
        compare_runs(first=first[:1], second=[write("other", [1, 1, 1, 1], suite_hash="g")])


@pytest.mark.slow
def test_expert_beats_random_and_constant_speed(tmp_path):
    suite = tmp_path / "s.yaml"
    suite.write_text(
        "scenarios:\n  highway:\n    env: highway-v0\n"
        "    config: {lanes_count: 3, vehicles_count: 20, vehicles_density: 1.0, duration: 20}\n"
    )
    reports = {
        m: closed_loop(model=m, scenarios=suite, episodes=6, workers=2, json=tmp_path / f"{m}.json", progress=False)
        for m in ("expert", "random", "constant")
    }
    # Every driver met the same traffic: the same simulator seeds, episode by episode, all in the evaluation range.
    seeds = {m: [(e["scenario"], e["seed"]) for e in r["episodes"]] for m, r in reports.items()}
    assert seeds["expert"] == seeds["random"] == seeds["constant"] and len(seeds["expert"]) == 6
    assert all(is_evaluation_seed(seed) for _, seed in seeds["expert"])
    success = {m: r["overall"]["success_rate"]["mean"] for m, r in reports.items()}
    assert success["expert"] >= 5 / 6
    assert success["expert"] - max(success["random"], success["constant"]) >= 0.5
    saved = json.loads((tmp_path / "expert.json").read_text())
    assert saved["overall"]["episodes"] == 6 and saved["scenarios"]["highway"]["decision_latency_ms"]["decisions"] > 0
    for key in ("success_rate", "collision_rate", "mean_progress", "mean_speed", "mean_jerk"):
        lo, hi = saved["overall"][key]["ci95"]
        assert lo <= saved["overall"][key]["mean"] <= hi
    table = compare([tmp_path / f"{m}.json" for m in ("expert", "random", "constant")])
    assert table.splitlines()[0] == "| suite | scenario | expert | random | constant |"
    overall = next(line for line in table.splitlines() if "**overall**" in line)
    assert overall.split(" | ")[2].startswith(f"{success['expert']:.2f} / ")
    progress = saved["overall"]["mean_progress"]["mean"]  # success / collision / off-road / progress
    assert overall.split(" | ")[2].endswith(f" / {progress:.0f} m") and progress > 0
    # Paired against the first model on the same episodes: McNemar and the difference interval.
    paired = next(line for line in table.splitlines() if line.startswith("| suite | random - expert |"))
    wins = sum(e["success"] for e in reports["expert"]["episodes"])  # random driving never succeeds
    assert f"| 6 | {-wins / 6:+.2f} [" in paired and f"| {wins} / 0 | {2 * 0.5 ** wins:.3g} |" in paired


def test_each_report_is_handed_over_as_its_episodes_finish(tiny_suite):
    """A pool cut short keeps the evaluations it finished: their reports come out before the pool ends."""
    from unified.eval.closed_loop import Evaluation, evaluate

    evaluations = [Evaluation(driver, str(tiny_suite)) for driver in ("constant", "expert", "random")]
    handed = []

    def save(evaluation, report):
        handed.append((evaluation.model, report))
        if len(handed) == 2:
            raise KeyboardInterrupt  # as a user's Ctrl-C after the second report

    with pytest.raises(KeyboardInterrupt):
        evaluate(evaluations, episodes=2, workers=2, progress=False, on_report=save)
    assert len({model for model, _ in handed}) == 2  # two whole reports; the third evaluation never finished
    for _, report in handed:  # each complete: every scenario's episodes, in order
        assert [(e["scenario"], e["index"]) for e in report["episodes"]] == \
            [("highway", 0), ("highway", 1), ("merge", 0), ("merge", 1)]
        assert report["overall"]["episodes"] == 4
    whole = evaluate(evaluations, episodes=2, workers=1, progress=False)  # the same as a pool that ran to its end
    assert all(report["episodes"] == whole[Evaluation(model, str(tiny_suite))]["episodes"] for model, report in handed)


def test_compare_names_a_file_that_is_not_a_report(tmp_path):
    (tmp_path / "x.json").write_text("[]")
    with pytest.raises(UnifiedError, match="x.json: not a closed-loop report"):
        compare([tmp_path / "x.json"])


@pytest.mark.slow
def test_a_trained_model_drives_in_closed_loop(model_data, tmp_path):
    """An exported model (here untrained: the plumbing, not the skill) drives through the same command."""
    import torch
    from unified.tokenizers.fit import Tokenizers

    from unified.model import ModelConfig, UnifiedModel
    from unified.model_dir import save_model

    tokenizers = Tokenizers.from_pretrained(model_data / "tok")
    torch.manual_seed(0)
    model = UnifiedModel(ModelConfig(hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128,
                                     max_position_embeddings=256, horizon=4, max_reason_tokens=8), tokenizers.layout)
    save_model(model, tokenizers, tmp_path / "model")
    reports = {}
    for mode in ("reason", "direct"):
        reports[mode] = closed_loop(model=str(tmp_path / "model"), scenarios=model_data / "suite.yaml", episodes=1,
                                    mode=mode, replan_every=4, json=tmp_path / f"{mode}.json", progress=False,
                                    videos=1 if mode == "reason" else 0)
    if not torch.cuda.is_available():  # --device cuda on a machine without one: refused before any episode
        with pytest.raises(UnifiedError, match="--device cuda: no CUDA GPU"):
            closed_loop(model=str(tmp_path / "model"), scenarios=model_data / "suite.yaml", episodes=1,
                        device="cuda", progress=False)
    direct, reason = reports["direct"]["overall"], reports["reason"]["overall"]
    assert direct["episodes"] == 1 and direct["decision_latency_ms"]["decisions"] >= 1
    assert direct["tokens_per_decision"] == 4 * 2  # H steps x 2 action dimensions, nothing else
    assert reason["tokens_per_decision"] > direct["tokens_per_decision"]  # reasoning costs tokens
    assert reports["reason"]["model"].endswith("(reason)") and reports["reason"]["model_path"]
    # Every explanation is counted (this untrained model's are outside the grammar, so none is judged).
    consistency = reason["reasoning_consistency"]
    assert consistency["decisions"] == reason["decision_latency_ms"]["decisions"] == consistency["unparsed"]
    assert "reasoning_consistency" not in direct
    # The rollout video: beside the report, one frame per step and the outcome held at the end.
    from PIL import Image

    (video,) = reports["reason"]["videos"]
    steps = reports["reason"]["episodes"][0]["steps"]
    assert video["path"].startswith(str(tmp_path / "reason_videos")) and video["path"].endswith(".gif")
    with Image.open(video["path"]) as gif:
        assert gif.n_frames == steps + 1 and gif.size == (128 + 336, 128)  # 32x32 upscaled 4x, the panel
    assert reports["direct"]["videos"] == []
    with pytest.raises(UnifiedError, match="neither an exported model directory"):
        closed_loop(model=str(tmp_path), scenarios=model_data / "suite.yaml", episodes=1, progress=False)
    # A model that fails to load in the workers is an error, not a pool that restarts them forever.
    (tmp_path / "model" / "layout.json").unlink()
    with pytest.raises(UnifiedError, match="layout.json"):
        closed_loop(model=str(tmp_path / "model"), scenarios=model_data / "suite.yaml", episodes=2, workers=2,
                    progress=False)


@pytest.mark.slow
def test_evaluation_against_a_training_store(tmp_path):
    """--train-store: no evaluation episode shares a seed with a training episode, near-replays are counted, and an
    episode list that does share a seed is refused."""
    from unified.eval.overlap import check_overlap

    from unified.data.generate import generate
    from unified.data.store import EpisodeStore
    from unified.sim.suite import load_suite

    suite = tmp_path / "s.yaml"
    suite.write_text("name: s\nscenarios:\n  merge:\n    env: merge-v0\n    max_steps: 4\n")
    generate(suite=suite, episodes=20, out=tmp_path / "train", progress=False)
    report = closed_loop(model="constant", scenarios=suite, episodes=20, train_store=[tmp_path / "train"],
                         json=tmp_path / "c.json", progress=False)
    overlap = report["overlap"]
    assert overlap["training_episodes"] == 18 and overlap["evaluation_episodes"] == 20  # 2 of 20 held out
    assert overlap["shared_seeds"] == []
    # merge-v0 without traffic jitter places its cars almost the same way whatever the seed: replays are found.
    assert overlap["near_replays"] and overlap["near_replays"][0]["store"] == str(tmp_path / "train")
    store = EpisodeStore(tmp_path / "train")
    seed = store.episode_meta(0)["seed"]
    with pytest.raises(UnifiedError, match="use a simulator seed of a training episode"):
        check_overlap([(load_suite(suite), "merge", seed)], [tmp_path / "train"], progress=False)


class _ChunkPolicy:
    """A stand-in policy whose k-th plan is a chunk of constant actions (k, -k): which plans an action blends is
    then readable from the action itself."""

    class config:  # noqa: N801 - the attribute Policy.config provides
        horizon, history = 4, 1

    def __init__(self):
        self.plans = 0

    def act(self, frames, instruction, state, reason, continuous, readout="mode"):
        from types import SimpleNamespace

        self.plans += 1
        chunk = np.tile([float(self.plans), -float(self.plans)], (self.config.horizon, 1))
        return SimpleNamespace(actions=chunk, tokens_generated=8, reasoning=None)


def _drive(replan_every, ensemble, steps=6):
    from unified.eval.model_driver import ModelDriver

    from unified.sim.env import make_env
    from unified.sim.rollout import start_episode
    from unified.sim.suite import suite_from_dict

    suite = suite_from_dict({"image_size": [32, 32], "scenarios": {"highway": {
        "env": "highway-v0", "config": {"lanes_count": 2, "vehicles_count": 3}}}})
    scenario = suite.scenarios["highway"]
    env = make_env(suite, scenario)
    start_episode(env, suite, scenario, 7, False)
    driver = ModelDriver(_ChunkPolicy(), mode="direct", replan_every=replan_every, ensemble=ensemble)
    driver.reset(env, scenario, 7)
    return [driver.action(env) for _ in range(steps)]


def test_each_mode_asks_the_policy_as_it_says():
    from unified.eval.modes import MODES, mode_flags

    assert {m: tuple(mode_flags(m).values()) for m in MODES} == {
        "reason": (True, False), "direct": (False, False), "continuous": (False, True),
        "reason_continuous": (True, True)}
    with pytest.raises(UnifiedError, match="'head' is not one of reason, direct"):
        mode_flags("head")


class _Explaining(_ChunkPolicy):
    """A stand-in reasoning policy that writes "explanation k" at its k-th plan unless it is given one to read."""

    def __init__(self):
        super().__init__()
        self.given = []

    def act(self, frames, instruction, state, reason, continuous, readout="mode", reasoning=None):
        self.given.append(reasoning)
        result = super().act(frames, instruction, state, reason, continuous, readout)
        result.reasoning = reasoning if reasoning is not None else f"explanation {self.plans}"
        return result


def test_a_driver_that_reasons_less_often_than_it_acts():
    from unified.eval.model_driver import ModelDriver

    from unified.sim.env import make_env
    from unified.sim.rollout import start_episode
    from unified.sim.suite import suite_from_dict

    suite = suite_from_dict({"image_size": [32, 32], "scenarios": {"highway": {
        "env": "highway-v0", "config": {"lanes_count": 2, "vehicles_count": 3}}}})
    scenario = suite.scenarios["highway"]
    env = make_env(suite, scenario)
    for reason_every, read in ((3, [None, "explanation 1", "explanation 1", None, "explanation 4", "explanation 4",
                                    None]), (None, [None] * 7)):
        policy = _Explaining()
        start_episode(env, suite, scenario, 7, False)
        driver = ModelDriver(policy, mode="reason_continuous", replan_every=1, ensemble=None,
                             reason_every=reason_every)
        driver.reset(env, scenario, 7)
        for _ in range(7):
            driver.action(env)
        assert policy.given == read  # a new explanation every 3 steps, the last one read again between
        written = [d for d in driver.decisions if not d.get("reasoning_reused")]
        assert len(written) == (3 if reason_every else 7) and all("stated" in d for d in written)
        assert not any("stated" in d for d in driver.decisions if d.get("reasoning_reused"))
    with pytest.raises(UnifiedError, match="--reason-every 2: .* with --mode reason or reason_continuous"):
        closed_loop(model="expert", scenarios=Path("unused.yaml"), episodes=1, mode="direct", reason_every=2)


def test_execution_defaults_by_mode_and_what_a_user_gives_wins():
    """The head plans every step and executes that plan alone; the token modes plan every 5 steps, blended."""
    from unified.eval.model_driver import execution

    assert execution("continuous") == execution("reason_continuous") == (1, None)
    assert execution("direct") == execution("reason") == (5, 0.5)
    assert execution("continuous", replan_every=5, ensemble=0.5) == (5, 0.5)
    assert execution("direct", replan_every=10, no_ensemble=True) == (10, None)
    assert execution("direct", ensemble=0.0) == (5, 0.0)  # 0.0 is a weight (equal votes), not "unset"


def test_temporal_ensembling_blends_the_chunks_that_cover_a_step():
    # Without ensembling a chunk of 4 is executed to its end, then the next plan's.
    assert [a[0] for a in _drive(None, None)] == [1, 1, 1, 1, 2, 2]
    # Re-planning every 2 steps without blending switches to the newest plan.
    assert [a[0] for a in _drive(2, None)] == [1, 1, 2, 2, 3, 3]
    # Blended: at step 2 the chunks planned at steps 0 and 2 both cover it, weights exp(-0.5 i), oldest first.
    actions = _drive(2, 0.5)
    w = np.exp(-0.5 * np.arange(2))
    assert actions[0][0] == actions[1][0] == 1
    assert actions[2][0] == pytest.approx((w[0] * 1 + w[1] * 2) / w.sum())
    assert actions[4][0] == pytest.approx((w[0] * 2 + w[1] * 3) / w.sum())
    assert actions[4][1] == pytest.approx(-actions[4][0])  # every dimension blended alike


def test_braking_stops_the_car_and_never_reverses():
    from unified.sim.drivers import passive_intent
    from unified.sim.rollout import run_episode
    from unified.sim.suite import suite_from_dict

    class Brake:
        name = "brake"

        def reset(self, env, scenario, seed):
            pass

        def act(self, env):
            return passive_intent(env, np.array([-5.0, 0.0], np.float32))

    # Alone on the road (nothing to run into it from behind), 8 s of full braking from about 25 m/s.
    suite = suite_from_dict({"image_size": [32, 32], "scenarios": {"highway": {
        "env": "highway-v0", "config": {"lanes_count": 1, "vehicles_count": 0}, "max_steps": 40}}})
    episode = run_episode(suite, suite.scenarios["highway"], Brake(), seed=3, render=False)
    speeds = np.array([s[0] for s in episode.states])
    assert len(speeds) == 40 and speeds[0] > 15
    stopped = int(np.argmax(speeds < 0.5))
    assert 0 < stopped < 30  # about 5 s
    # Stopped, not reversing: the simulator's floor lets the speed dip one simulation step (5 m/s^2 / 15 Hz) below
    # 0 and brings it back, where without the floor it would reach -15 m/s by the end.
    assert speeds.min() >= -5.0 / 15 - 1e-3 and abs(speeds[-1]) < 0.05


def test_a_learned_driver_reads_the_state_the_data_records():
    """The state a policy is given in closed loop is the state the store records for the same step, navigation
    route included: at a junction, with a destination, as on open road."""
    from types import SimpleNamespace

    from unified.eval.model_driver import ModelDriver

    from unified.sim.rollout import run_episode
    from unified.sim.suite import suite_from_dict

    class Recorder:
        class config:  # noqa: N801 - the attribute Policy.config provides
            horizon, history = 1, 1

        def __init__(self):
            self.states = []

        def act(self, frames, instruction, state, reason, continuous, readout="mode"):
            self.states.append(np.array(state))
            return SimpleNamespace(actions=np.array([[0.0, 0.0]]), tokens_generated=2, reasoning=None)

    suite = suite_from_dict({"image_size": [32, 32], "scenarios": {"turn": {
        "env": "intersection-v0", "destination": "o3", "instructions": ["Turn right."], "max_steps": 25}}})
    policy = Recorder()
    episode = run_episode(suite, suite.scenarios["turn"], ModelDriver(policy, "direct", replan_every=1), seed=4)
    assert len(policy.states) == episode.summary.steps >= 10
    np.testing.assert_array_equal(np.stack(policy.states), episode.states)
    assert episode.states[:, 4].max() > 0.5  # driving straight at the junction, the route's right bend is in view


def test_an_unknown_readout_is_refused_before_driving(tiny_suite):
    with pytest.raises(UnifiedError, match="--readout: 'argmax' is not one of mode, mean, median"):
        closed_loop(model="expert", scenarios=tiny_suite, episodes=1, readout="argmax", progress=False)


def test_device_auto_is_the_gpu_when_present_and_cuda_without_one_is_refused():
    import torch

    from unified.model_dir import resolve_device

    assert resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu") == "cpu"
    with pytest.raises(UnifiedError, match="'tpu': expected auto, cpu, cuda or cuda:N"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(UnifiedError, match="--device cuda: no CUDA GPU"):
            resolve_device("cuda")


class _Saying:
    """A stand-in reasoning policy that always states `sentence` and plans a constant chunk (acceleration,
    steering)."""

    class config:  # noqa: N801 - the attribute Policy.config provides
        horizon, history = 4, 1

    def __init__(self, sentence, action):
        self.sentence, self.action = sentence, np.asarray(action, np.float64)

    def act(self, frames, instruction, state, reason, continuous, readout="mode"):
        from types import SimpleNamespace

        return SimpleNamespace(actions=np.tile(self.action, (4, 1)), tokens_generated=10, reasoning=self.sentence)


def _consistency(sentence, action, steps=30):
    from unified.eval.closed_loop import consistency
    from unified.eval.model_driver import ModelDriver

    from unified.sim.env import make_env
    from unified.sim.rollout import run_episode
    from unified.sim.suite import suite_from_dict

    suite = suite_from_dict({"image_size": [32, 32], "scenarios": {"highway": {
        "env": "highway-v0", "config": {"lanes_count": 3, "vehicles_count": 0}, "max_steps": steps}}})
    scenario = suite.scenarios["highway"]
    env = make_env(suite, scenario)
    driver = ModelDriver(_Saying(sentence, action), "reason", replan_every=4)
    run_episode(suite, scenario, driver, seed=2, env=env, render=False)
    driver.close_windows(env, final=True)
    return consistency([{"decision": d["stated"], "consistent": d.get("consistent")} for d in driver.decisions])


def test_reasoning_action_consistency_reads_what_the_car_did():
    """A decision is judged by the executed actions of the next 2 s: braking after "slow down" agrees, speeding
    up does not; steering left after "change to the left lane" agrees, driving straight does not."""
    slow = "I am above my target speed, so I slow down."
    agrees = _consistency(slow, [-2.0, 0.0])
    assert agrees["decisions"] == 8 and agrees["unparsed"] == 0 and agrees["judged"] == 8  # a plan every 4 of 30
    assert agrees["consistent"]["mean"] == 1.0 and agrees["by_decision"]["slow down"]["judged"] == 8
    assert _consistency(slow, [1.0, 0.0])["consistent"]["mean"] == 0.0
    left = "The left lane is free and faster, so I change to the left lane."
    assert _consistency(left, [0.0, -0.03], steps=10)["consistent"]["mean"] == 1.0
    assert _consistency(left, [0.0, 0.0], steps=10)["consistent"]["mean"] == 0.0
    assert _consistency("The road ahead is clear, so I keep my lane.", [0.0, 0.0])["consistent"]["mean"] == 1.0
    garbled = _consistency("so I fly", [0.0, 0.0])
    assert garbled["unparsed"] == garbled["decisions"] == 8 and garbled["judged"] == 0


def test_rollout_videos_of_a_scripted_driver_and_a_directory_that_is_not_ours(model_data, tmp_path):
    from PIL import Image

    report = closed_loop(model="expert", scenarios=model_data / "suite.yaml", episodes=2, videos=1,
                         video_dir=tmp_path / "v", progress=False)
    (video,) = report["videos"]
    assert video["index"] == 0 and Path(video["path"]).parent == tmp_path / "v"
    assert Path(video["path"]).name.startswith("highway_000_")
    with Image.open(video["path"]) as gif:
        assert gif.n_frames == report["episodes"][0]["steps"] + 1
        assert len({gif.seek(k) or gif.convert("RGB").tobytes() for k in range(3)}) > 1  # the scene moves
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(UnifiedError, match="not only rollout videos"):
        closed_loop(model="expert", scenarios=model_data / "suite.yaml", episodes=1, videos=1,
                    video_dir=tmp_path / "mine", progress=False)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"
    with pytest.raises(UnifiedError, match="give --video-dir"):
        closed_loop(model="expert", scenarios=model_data / "suite.yaml", episodes=1, videos=1, progress=False)
