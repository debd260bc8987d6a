import json

import numpy as np
import pytest
from unified.eval.closed_loop import closed_loop, compare, mean_interval, wilson_interval

from unified.errors import UnifiedError


def test_wilson_interval_contains_the_rate_and_shrinks_with_n():
    for k, n in [(0, 10), (3, 10), (10, 10), (30, 100)]:
        lo, hi = wilson_interval(k, n)
        assert 0.0 <= lo <= k / n <= hi <= 1.0
    assert np.diff(wilson_interval(30, 100)) < np.diff(wilson_interval(3, 10))
    lo, hi = wilson_interval(10, 10)
    assert hi == 1.0 and lo == pytest.approx(0.7225, abs=1e-3)  # the textbook value for 10/10


def test_mean_interval():
    lo, hi = mean_interval(np.array([1.0, 2.0, 3.0, 4.0]))
    assert lo < 2.5 < hi and hi - lo == pytest.approx(2 * 1.96 * np.std([1, 2, 3, 4], ddof=1) / 2, rel=1e-3)


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
    from unified.policy import save_model

    tokenizers = Tokenizers.from_pretrained(model_data / "tok")
    torch.manual_seed(0)
    model = UnifiedModel(ModelConfig(hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128,
                                     max_position_embeddings=256, horizon=4, max_reason_tokens=8), tokenizers.layout)
    save_model(model, tokenizers, tmp_path / "model")
    reports = {}
    for mode in ("reason", "direct"):
        reports[mode] = closed_loop(model=str(tmp_path / "model"), scenarios=model_data / "suite.yaml", episodes=1,
                                    mode=mode, replan_every=4, json=tmp_path / f"{mode}.json", progress=False)
    direct, reason = reports["direct"]["overall"], reports["reason"]["overall"]
    assert direct["episodes"] == 1 and direct["decision_latency_ms"]["decisions"] >= 1
    assert direct["tokens_per_decision"] == 4 * 2  # H steps x 2 action dimensions, nothing else
    assert reason["tokens_per_decision"] > direct["tokens_per_decision"]  # reasoning costs tokens
    assert reports["reason"]["model"].endswith("(reason)") and reports["reason"]["model_path"]
    with pytest.raises(UnifiedError, match="neither an exported model directory"):
        closed_loop(model=str(tmp_path), scenarios=model_data / "suite.yaml", episodes=1, progress=False)
    # A model that fails to load in the workers is an error, not a pool that restarts them forever.
    (tmp_path / "model" / "layout.json").unlink()
    with pytest.raises(UnifiedError, match="layout.json"):
        closed_loop(model=str(tmp_path / "model"), scenarios=model_data / "suite.yaml", episodes=2, workers=2,
                    progress=False)
