"""Reading generated explanations back and judging them against the simulator's causation records."""

import numpy as np
from hypothesis import given
from hypothesis import strategies as st
from unified.eval.reasoning import judge, parse

from unified.sim.causation import CAUSES, DECISIONS, Causation, describe


@given(st.sampled_from(CAUSES), st.sampled_from(DECISIONS), st.floats(-60, 60), st.floats(-4, 4),
       st.floats(-10, 10))
def test_every_sentence_the_simulator_writes_is_read_back(cause, decision, x, y, vx):
    position, velocity = np.array([x, y], np.float32), np.array([vx, 0], np.float32)
    text = describe(cause, decision, position, velocity)
    parsed = parse(text)
    assert parsed is not None and parsed["decision"] == decision
    # "slower vehicle ahead" and "vehicle ahead" are told apart by their wording, as are all causes.
    assert parsed["cause"] == cause


def record(cause, decision, x=20.0, agent=True):
    position = np.array([x, 0.0], np.float32)
    velocity = np.array([-3.0, 0.0], np.float32)
    return Causation(3 if agent else -1, position, velocity, cause, decision, describe(cause, decision, position,
                                                                                        velocity))


def test_judge():
    truth = record("slower vehicle ahead", "change left", x=18)
    assert judge(truth.text, truth)["all"]
    assert judge("The car 40 m ahead is 3 m/s slower, so I change to the left lane.", truth) == {
        "parsed": True, "decision": True, "cause": True, "agent": False, "all": False}
    assert not judge("The car 18 m ahead is 3 m/s slower, so I slow down.", truth)["decision"]
    assert judge("banana", truth)["parsed"] is False
    clear = record("clear road", "keep lane", agent=False)
    assert judge("The road ahead is clear, so I keep my lane.", clear)["all"]


def test_reasoning_eval_command(model_data, tmp_path):
    import torch
    from unified.eval.reasoning import reasoning
    from unified.tokenizers.fit import Tokenizers

    from unified.model import ModelConfig, UnifiedModel
    from unified.model_dir import save_model

    tokenizers = Tokenizers.from_pretrained(model_data / "tok")
    torch.manual_seed(0)
    model = UnifiedModel(ModelConfig(hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128,
                                     max_position_embeddings=256, horizon=4, max_reason_tokens=12), tokenizers.layout)
    save_model(model, tokenizers, tmp_path / "model")
    report = reasoning(model=tmp_path / "model", data=model_data / "store", episodes=1, every=12,
                       json=tmp_path / "r.json", progress=False)
    assert report["explanations"] == 2 and 0 <= report["reasoning_accuracy"] <= report["decision_accuracy"] <= 1
    assert report["examples"][0]["truth"] and "generated" in report["examples"][0]
    assert [(v["episode"], v["step"]) for v in report["verdicts"]] == [(report["episode_indices"][0], t)
                                                                       for t in (0, 12)]
    # The same model asked again pairs with itself: nothing discordant.
    from unified.eval.reasoning import compare_reasoning

    same = compare_reasoning(first=[tmp_path / "r.json"], second=[tmp_path / "r.json"])
    assert same["pooled"]["pairs"] == 2 and same["pooled"]["mcnemar"]["p_value"] == 1.0


def test_compare_reasoning_pairs_explanations_by_episode_and_step(tmp_path, capsys):
    import json

    import pytest
    from unified.eval.reasoning import compare_reasoning

    from unified.errors import UnifiedError

    def report(name, right):  # explanations at steps 0, 10, ... of episode 4; `right` the ones all right
        verdicts = [{"episode": 4, "step": 10 * k, "all": k in right, "decision": True} for k in range(20)]
        (tmp_path / name).write_text(json.dumps({"model": name, "data": "store", "verdicts": verdicts}))
        return tmp_path / name

    first, second = report("a.json", range(5)), report("b.json", range(18))
    result = compare_reasoning(first=[first, first], second=[second, first])
    assert [r["pairs"] for r in result["runs"]] == [20, 20] and result["pooled"]["pairs"] == 40
    run = result["runs"][0]
    assert (run["first_rate"], run["second_rate"]) == (0.25, 0.9)
    assert run["mcnemar"]["only_first"] == 13 and run["mcnemar"]["p_value"] < 0.001  # 13 discordant, all one way
    assert result["runs"][1]["mcnemar"]["p_value"] == 1.0
    assert "| **pooled** |" in capsys.readouterr().out
    assert compare_reasoning(first=[first], second=[second], key="decision")["pooled"]["difference"]["difference"] == 0
    (tmp_path / "old.json").write_text(json.dumps({"model": "old", "data": "store"}))
    with pytest.raises(UnifiedError, match="old.json: has no per-explanation verdicts"):
        compare_reasoning(first=[tmp_path / "old.json"], second=[second])
    with pytest.raises(UnifiedError, match="one report per training run"):
        compare_reasoning(first=[first, first], second=[second])
