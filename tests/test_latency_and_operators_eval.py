"""`unified bench latency` and `unified eval operators` on tiny exported models."""

import json

import numpy as np
import pytest
import torch
from unified.eval.latency import latency, parse_entry
from unified.eval.operators import operators_eval, plot_operators
from unified.tokenizers.fit import Tokenizers

from unified.data.operators import operators
from unified.errors import UnifiedError
from unified.model import ModelConfig, UnifiedModel
from unified.model_dir import save_model

TINY = dict(hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128, max_position_embeddings=256, horizon=4)


@pytest.fixture(scope="module")
def exported(model_data, tmp_path_factory):
    tokenizers = Tokenizers.from_pretrained(model_data / "tok")
    torch.manual_seed(0)
    model = UnifiedModel(ModelConfig(**TINY, action_head=True, max_reason_tokens=6), tokenizers.layout)
    directory = tmp_path_factory.mktemp("exported") / "model"
    save_model(model, tokenizers, directory)
    return directory


def test_latency_of_the_three_ways_to_act(exported, model_data, tmp_path):
    report = latency(models=[f"{exported}:reason", f"{exported}:direct", f"{exported}:continuous",
                             f"{exported}:reason_continuous"],
                     data=model_data / "store", decisions=3, json=tmp_path / "latency.json", progress=False)
    reason, direct, continuous, reason_continuous = report["models"]
    assert report["decisions"] == 3 and reason["speedup_vs_first"] == 1.0
    assert reason["tokens_per_decision"] > direct["tokens_per_decision"] == 4 * 2  # reasoning costs tokens
    assert continuous["tokens_per_decision"] == 0  # one forward pass, nothing generated
    # Reasoning before the head: the reasoning's tokens are generated, the actions are not.
    assert reason_continuous["tokens_per_decision"] == reason["tokens_per_decision"] - direct["tokens_per_decision"]
    assert all(0 < r["median_ms"] <= r["p95_ms"] for r in report["models"])
    assert json.loads((tmp_path / "latency.json").read_text())["models"][2]["mode"] == "continuous"
    # A bare directory means acting directly; anything else is refused with the path named.
    assert parse_entry(str(exported)) == (str(exported), "direct")
    with pytest.raises(UnifiedError, match="not an exported model directory"):
        parse_entry(f"{tmp_path}:reason")


def test_operators_eval_by_hops_and_the_plot(exported, tmp_path):
    operators(out=tmp_path / "ops", hops="2-3", n=3, seed=5, progress=False)
    report = operators_eval(model=exported, data=tmp_path / "ops", n=2, json=tmp_path / "a.json", progress=False)
    assert set(report["accuracy_by_hops"]) == {"2", "3"}
    assert all(0.0 <= a <= 1.0 for a in report["accuracy_by_hops"].values())
    assert all(t > 0 for t in report["tokens_by_hops"].values())
    assert {e["hops"] for e in report["examples"]} == {2, 3} and report["examples"][0]["expected"]
    with pytest.raises(UnifiedError, match=r"no examples with \[5\] hops"):
        operators_eval(model=exported, data=tmp_path / "ops", hops="5", progress=False)
    with pytest.raises(UnifiedError, match="not an operator data set"):
        operators_eval(model=exported, data=tmp_path, progress=False)
    # A model trained with the inductive scratchpad is asked the same way, step by step (tests/test_inductive.py).
    tokenizers = Tokenizers.from_pretrained(exported / "tokenizers")
    torch.manual_seed(0)
    inductive = UnifiedModel(ModelConfig(**TINY, inductive_scratchpad=True), tokenizers.layout)
    save_model(inductive, tokenizers, tmp_path / "inductive")
    stepwise = operators_eval(model=tmp_path / "inductive", data=tmp_path / "ops", n=2, progress=False)
    assert set(stepwise["accuracy_by_hops"]) == {"2", "3"} and all(t > 0 for t in stepwise["tokens_by_hops"].values())
    assert "steps_right_by_hops" not in stepwise  # the data holds no scratchpad to compare with
    operators(out=tmp_path / "pads", hops="2", n=2, seed=5, scratchpad="full", progress=False)
    stepwise = operators_eval(model=tmp_path / "inductive", data=tmp_path / "pads", n=2, progress=False)
    assert stepwise["scratchpad_exact_by_hops"] == {"2": 0.0}  # an untrained model
    assert 0.0 <= stepwise["steps_right_by_hops"]["2"] < 1.0
    assert 0.0 <= stepwise["first_step_right_by_hops"]["2"] <= 1.0
    assert "questions_needing_lookup_by_hops" not in stepwise  # the interval form has no walk
    operators(out=tmp_path / "walks", hops="2-4", n=8, seed=5, scratchpad="full", steps="walk", progress=False)
    walks = operators_eval(model=tmp_path / "inductive", data=tmp_path / "walks", n=8, progress=False)
    needing = walks["questions_needing_lookup_by_hops"]
    assert needing["2"] == 0 and 0 < needing["3"] + needing["4"] <= 16  # at 2 hops the shortcut is the step
    assert set(walks["first_step_right_needing_lookup_by_hops"]) == {h for h in ("3", "4") if needing[h]}
    by_answer = stepwise["accuracy_by_answer_by_hops"]["2"]
    assert set(by_answer) <= {"yes", "no"} and by_answer  # each question counted under its own answer
    (tmp_path / "b.json").write_text(json.dumps({"accuracy_by_hops": {"2": 1.0, "4": 0.5}}))
    table = plot_operators([tmp_path / "a.json", tmp_path / "b.json"], out=tmp_path / "ops.png",
                           labels=["tiny", "other"])
    assert table.splitlines()[0] == "| model | 2 hops | 3 hops | 4 hops |"
    assert table.splitlines()[3] == "| other | 1.00 | - | 0.50 |"
    assert (tmp_path / "ops.png").stat().st_size > 0
    with pytest.raises(UnifiedError, match="2 labels for 1 reports"):
        plot_operators([tmp_path / "a.json"], out=tmp_path / "x.png", labels=["a", "b"])


def test_steps_right_counts_the_steps_before_the_first_wrong_one():
    from unified.eval.operators import steps_right

    expected = "Ada > Bob. Bob > Eva. So Ada is taller than Eva."
    assert steps_right(expected, expected) == 1.0
    assert steps_right("Ada > Bob. Bob > Zoe. So Ada is taller than Eva.", expected) == pytest.approx(1 / 3)
    assert steps_right("Ada > Eva. Bob > Eva. So Ada is taller than Eva.", expected) == 0.0
    assert steps_right("", expected) == 0.0
    assert steps_right(expected + " Eva > Zoe.", expected) == 1.0  # written on past the data's steps
    # the report's first step right is steps_right > 0
    assert steps_right("Ada > Bob. Bob > Zoe.", expected) > 0 and steps_right("Ada > Eva.", expected) == 0


def test_expert_gains_are_the_derivatives_of_highway_envs_steering_law():
    from highway_env.road.road import Road, RoadNetwork
    from highway_env.vehicle.controller import ControlledVehicle
    from unified.eval.state_response import expert_gains

    road = Road(RoadNetwork.straight_road_network(lanes=1, length=1000))
    lane = ("0", "1", 0)
    for speed in (8.0, 20.0):
        def steer(heading=0.0, lateral=0.0, speed=speed):
            car = ControlledVehicle(road, road.network.get_lane(lane).position(100, lateral), heading, speed)
            return car.steering_control(lane)

        gains = expert_gains(np.array([speed]))
        assert (steer(heading=0.005) - steer(heading=-0.005)) / 0.01 == pytest.approx(gains["heading"][0], rel=0.02)
        assert (steer(lateral=0.05) - steer(lateral=-0.05)) / 0.1 == pytest.approx(gains["lane_offset"][0], rel=0.02)


def test_state_response_reads_the_steering_slope_of_a_policy(exported, model_data, tmp_path, monkeypatch):
    from unified.eval.state_response import state_response

    from unified.policy import ActionResult, Policy

    # A policy whose first steering command is -1.5 x heading + 0.2 x offset + 0.7 x the route heading 8 m ahead
    # (and a second step that is not read); its continuous head, asked with --mode continuous, steers twice as hard.
    def act(self, frames, instruction, state=None, reason=True, continuous=False, **kwargs):
        steer = (2.0 if continuous else 1.0) * (-1.5 * state[1] + 0.2 * state[2] + 0.7 * state[3])
        return ActionResult(np.array([[0.0, steer], [0.0, 9.0]]), None, 2, 1.0)

    monkeypatch.setattr(Policy, "act", act)
    report = state_response(model=exported, data=model_data / "store", observations=5, json=tmp_path / "r.json",
                            progress=False)
    rows = report["per_state"]
    assert report["observations"] == 5 and report["mean_speed"] >= 5.0
    assert rows["heading"]["model_slope"] == pytest.approx(-1.5) and rows["lane_offset"]["model_slope"] == \
        pytest.approx(0.2)
    assert rows["heading"]["unmoved"] == 0.0
    # The expert's reference is its gain at the observations' speeds; the share is the ratio of the two.
    assert rows["heading"]["expert_slope"] < 0 and rows["lane_offset"]["expert_slope"] < 0
    assert rows["heading"]["share_of_expert"] == pytest.approx(-1.5 / rows["heading"]["expert_slope"])
    assert json.loads((tmp_path / "r.json").read_text())["report"] == "state_response"
    head = state_response(model=exported, data=model_data / "store", observations=5, mode="continuous",
                          progress=False)
    assert head["mode"] == "continuous" and head["per_state"]["heading"]["model_slope"] == pytest.approx(-3.0)
    # A turned car: its route headings move by the opposite of its heading, and the policy reads both.
    turned = state_response(model=exported, data=model_data / "store", observations=5, turn_route=True,
                            progress=False)
    assert turned["turn_route"] and turned["per_state"]["heading"]["model_slope"] == pytest.approx(-1.5 - 0.7)
    assert turned["per_state"]["lane_offset"]["model_slope"] == pytest.approx(0.2)
    with pytest.raises(UnifiedError, match="not direct or continuous"):
        state_response(model=exported, data=model_data / "store", mode="reason", progress=False)
    with pytest.raises(UnifiedError, match="must be positive"):
        state_response(model=exported, data=model_data / "store", heading=0.0, progress=False)


def test_state_response_reads_a_state_mlp(model_data, tmp_path, monkeypatch):
    from unified.eval.state_mlp import StateMLP, fit_state_mlp
    from unified.eval.state_response import state_response

    fit_state_mlp(data=model_data / "store", out=tmp_path / "mlp", horizon=2, steps=1, progress=False)
    seen = []

    def plan(self, state, readout="mode"):  # steers by -0.9 x heading - 0.3 x offset
        seen.append(readout)
        return np.array([[0.0, -0.9 * state[1] - 0.3 * state[2]], [0.0, 5.0]])

    monkeypatch.setattr(StateMLP, "plan", plan)
    report = state_response(model=tmp_path / "mlp", data=model_data / "store", observations=4, readout="mean",
                            progress=False)
    assert report["per_state"]["heading"]["model_slope"] == pytest.approx(-0.9)
    assert report["per_state"]["lane_offset"]["model_slope"] == pytest.approx(-0.3)
    assert set(seen) == {"mean"} and len(seen) == 4 * 2 * 2
    with pytest.raises(UnifiedError, match="no continuous head"):
        state_response(model=tmp_path / "mlp", data=model_data / "store", mode="continuous", progress=False)


def test_operators_summary_over_scratchpads_and_seeds(tmp_path):
    from unified.eval.operators import summarize_operators

    runs = tmp_path / "operators"
    accuracies = {"none": [0.6, 0.5, 0.55], "full": [0.9, 0.8, 1.0], "inductive": [1.0, 0.95, 0.9]}
    for pad, values in accuracies.items():
        (runs / pad).mkdir(parents=True)
        for seed, a in enumerate(values):
            report = {"report": "operators", "questions_per_hop": 20, "accuracy_by_hops": {"2": a, "12": a / 2}}
            (runs / pad / f"seed{seed}.json").write_text(json.dumps(report))
    summary = summarize_operators(runs=runs)
    written = json.loads((runs / "summary.json").read_text())
    assert set(written) == {"none", "full", "inductive"} == set(summary)
    assert written["full"]["2"]["seeds"] == [0.9, 0.8, 1.0] and written["full"]["2"]["mean"] == pytest.approx(0.9)
    assert written["inductive"]["12"]["mean"] == pytest.approx(0.475) and written["none"]["2"]["questions"] == 60
    low, high = written["full"]["2"]["interval"]
    assert low < 0.9 < high  # 54 of 60 pooled
    assert (runs / "accuracy_by_hops.png").read_bytes()[:4] == b"\x89PNG"
    table = (runs / "summary.md").read_text().splitlines()
    assert table[0] == "| scratchpad | seeds | 2 | 12 |" and table[3].startswith("| full scratchpad | 3 | 0.90 [")
    (runs / "inductive" / "seed2.json").unlink()  # a run still under way: two seeds of one scratchpad
    summarize_operators(runs=runs)  # its own files are replaced
    table = (runs / "summary.md").read_text().splitlines()
    assert table[4].startswith("| inductive scratchpad | 2 | 0.97 [")
    assert json.loads((runs / "summary.json").read_text())["inductive"]["2"]["seeds"] == [1.0, 0.95]
    (runs / "summary.md").write_text("my notes\n")
    with pytest.raises(UnifiedError, match="not an operator summary"):
        summarize_operators(runs=runs)
    with pytest.raises(UnifiedError, match="no reports"):
        summarize_operators(runs=tmp_path / "empty")
