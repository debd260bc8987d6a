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
    with pytest.raises(UnifiedError, match="refers to row 2, which is not an earlier row"):
        from_dict(AblationConfig, {"rows": [{"name": "a", "same_model_as": 2}]}, "x")


def test_the_table_shows_both_modes_and_the_training_time():
    figures = {"success": 0.5, "ci95": [0.3, 0.7], "collision": 0.1, "latency_ms": 20.0}
    row = {"row": 0, "name": "base", "train_seconds": 125,
           "suites": {"in_distribution": {"direct": figures, "reason": figures | {"success": 0.25, "latency_ms": 90}}}}
    table = markdown([row, row | {"row": 1, "train_seconds": 0}], ["in_distribution"], 20)
    assert "| 0 | base | 0.50 [0.30, 0.70] / 0.25 | 0.10 | 20 / 90 | 2:05 |" in table
    assert "(row above)" in table
