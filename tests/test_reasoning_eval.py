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
