"""The ablation spec maps onto its config, rows may only refer to earlier rows, and the table reads its figures."""

from pathlib import Path

import pytest
from unified.eval.ablation import AblationConfig, markdown

from unified.config import from_dict, load_yaml
from unified.errors import UnifiedError

ROOT = Path(__file__).resolve().parents[1]


def test_the_shipped_ablation_maps_onto_its_config():
    config = from_dict(AblationConfig, load_yaml(ROOT / "recipes" / "ablation.yaml"), "ablation.yaml")
    assert len(config.rows) >= 6 and set(config.suites) == {"in_distribution", "out_of_distribution"}
    assert config.rows[0].tokenizer_options  # the earlier default fits its own tokenizers
    with pytest.raises(UnifiedError, match="expected a non-empty list of direct and reason"):
        from_dict(AblationConfig, {"rows": [], "modes": ["sideways"]}, "x")
    with pytest.raises(UnifiedError, match="refers to row 1, which is not an earlier row"):
        from_dict(AblationConfig, {"rows": [{"name": "a", "compare_with": 1}]}, "x")
    with pytest.raises(UnifiedError, match="refers to row 2, which is not an earlier row"):
        from_dict(AblationConfig, {"rows": [{"name": "a", "same_model_as": 2}]}, "x")
    assert config.rows[-1].readout == "median" and config.rows[-1].same_model_as is not None
    with pytest.raises(UnifiedError, match=r"rows\[0\].readout: 'argmax' is not one of mode, mean, median"):
        from_dict(AblationConfig, {"rows": [{"name": "a", "readout": "argmax"}]}, "x")
    with pytest.raises(UnifiedError, match=r"rows\[0\].fast_decoding: 'loose' is not one of whole, free"):
        from_dict(AblationConfig, {"rows": [{"name": "a", "fast_decoding": "loose"}]}, "x")


def test_the_action_tokens_comparison_drives_the_demo_teacher_against_its_fast_twin():
    config = from_dict(AblationConfig, load_yaml(ROOT / "recipes" / "action_tokens.yaml"), "action_tokens.yaml")
    bins, fast, free, finer = config.rows
    assert bins.run == "runs/demo/joint" and not bins.train and fast.train == ["model.action_tokens=fast"]
    assert (fast.fast_decoding, free.fast_decoding, free.same_model_as) == ("whole", "free", 1)
    assert "--fast-scale" in finer.tokenizer_options and finer.compare_with == 1 and finer.train == fast.train
    assert (bins.replan_every, bins.ensemble) == (fast.replan_every, fast.ensemble) and config.modes == ["direct"]
    assert config.base == [] and config.shards == "runs/demo/shards"  # the demo's recipe, data and tokens


def test_the_table_shows_both_modes_and_the_training_time():
    figures = {"success": 0.5, "ci95": [0.3, 0.7], "collision": 0.1, "latency_ms": 20.0}
    row = {"row": 0, "name": "base", "train_seconds": 125,
           "suites": {"in_distribution": {"direct": figures, "reason": figures | {"success": 0.25, "latency_ms": 90}}}}
    table = markdown([row, row | {"row": 1, "train_seconds": 0}], ["in_distribution"], 20)
    assert "| 0 | base | 0.50 [0.30, 0.70] / 0.25 | 0.10 | - | 20 / 90 | - | 2:05 |" in table
    assert "(an earlier row's model)" in table
    vs = {"row": 0, "pairs": 20, "difference": 0.05, "ci95": [-0.1, 0.2], "p": 0.5}
    direct_only = {"row": 1, "name": "more", "train_seconds": 60,
                   "suites": {"in_distribution": {"direct": figures | {"per_scenario": {"merge": 0.75}, "vs": vs,
                                                                       "tokens": 4.75, "malformed": {
                                                                           "decisions": 3, "of": 120}}}}}
    table = markdown([direct_only], ["in_distribution"], 20)
    assert ("| 1 | more | 0.50 [0.30, 0.70] | 0.10 | row 0: +0.05 [-0.10, +0.20], p = 0.50 | 20 | 4.8, 3 of 120 | "
            "1:00 |") in table
    assert "reasoning" not in table
    assert "| 1 | 0.75 |" in table  # action-only success per scenario


@pytest.mark.slow
def test_an_ablation_trains_drives_and_tabulates_its_rows(model_data, tmp_path):
    """Two rows on the tiny data: one trained through the launcher on the given shards, one re-driving its model
    with another execution; the table, the reports and a rerun that reuses everything."""
    import json

    import yaml
    from unified.eval.ablation import ablation

    spec = tmp_path / "ablation.yaml"
    spec.write_text(yaml.safe_dump({
        "store": str(model_data / "store"), "operators": str(model_data / "operators"),
        "tokenizer": str(model_data / "tok"), "shards": str(model_data / "shards"),
        "suites": {"in_distribution": str(model_data / "suite.yaml")}, "episodes": 1, "workers": 1, "ranks": 2,
        "recipe": str(ROOT / "recipes" / "debug.yaml"), "base": ["steps=2", "sample_every=0", "model.horizon=4"],
        "modes": ["direct"],
        "rows": [{"name": "base", "replan_every": 2},
                 {"name": "+ blended", "same_model_as": 0, "replan_every": 1, "ensemble": 0.5}]}))
    out = tmp_path / "out"
    result = ablation(spec=spec, out=out)
    rows = result["rows"]
    assert [r["name"] for r in rows] == ["base", "+ blended"]
    assert rows[0]["train_seconds"] > 0 and rows[1]["train_seconds"] == 0 and rows[1]["model"] == rows[0]["model"]
    assert not (out / "rows" / "0" / "shards").exists()  # the given shards were used, not written again
    assert (out / "rows" / "0" / "model" / "model.safetensors").is_file()
    for r in rows:
        report = json.loads((out / "rows" / str(r["row"]) / "direct_in_distribution.json").read_text())
        assert report["overall"]["episodes"] == 1
        assert r["suites"]["in_distribution"]["direct"]["success"] == report["overall"]["success_rate"]["mean"]
    table = (out / "ablation.md").read_text()
    assert "| 1 | + blended |" in table and "(an earlier row's model)" in table
    assert json.loads((out / "ablation.json").read_text())["report"] == "ablation"
    again = ablation(spec=spec, out=out)  # a rerun reuses the run (finished) and drives again on the same seeds
    assert again["rows"] == rows  # nothing trained or driven again: the same time, the same reports
    vs = rows[1]["suites"]["in_distribution"]["direct"]["vs"]  # paired with row 0 on the same episodes
    assert vs["row"] == 0 and vs["pairs"] == 1 and vs["p"] == 1.0
