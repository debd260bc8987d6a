"""The command line: bad input gives one clear line and a non-zero exit, never a traceback."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

UNIFIED = str(Path(sys.executable).parent / "unified")


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([UNIFIED, *args], capture_output=True, text=True, timeout=300)


def assert_clean_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr
    for fragment in fragments:
        assert fragment in result.stderr, result.stderr


def test_data_info_json(tiny_store):
    result = run("data", "info", str(tiny_store), "--json")
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert isinstance(info["episodes"], int) and isinstance(info["steps"], int)
    assert set(info["scenarios"]) == {"highway", "merge"}
    for s in info["scenarios"].values():
        assert {"episodes", "expert_success_rate", "expert_collision_rate"} <= set(s)
    assert set(info["action_stats"]) >= {"mean", "std", "min", "max", "q01", "q99"}


def test_data_info_table(tiny_store):
    result = run("data", "info", str(tiny_store))
    assert result.returncode == 0 and "expert success" in result.stdout and "q99" in result.stdout


def test_data_info_of_one_scenario(tiny_store, capsys):
    """--scenario: the statistics of that scenario's episodes alone, over the same split as the store's own."""
    import numpy as np

    from unified.data.store import EpisodeStore, data_info

    store = EpisodeStore(tiny_store)
    for scenario in ("highway", "merge"):
        mine = [i for i in store.train_indices() if store.episode_meta(i)["scenario"] == scenario]
        states = np.concatenate([np.stack(store.read_columns(i, ["state"]).column("state").to_pylist())
                                 for i in mine])
        stats = data_info(tiny_store, scenario=scenario)
        assert stats["episodes"] == len(mine) and stats["state_stats"]["count"] == len(states)
        np.testing.assert_allclose(stats["state_stats"]["mean"], states.mean(0), rtol=1e-5, atol=1e-5)
        assert f"scenario {scenario!r}, statistics over its {len(mine)} training episodes" in capsys.readouterr().out
    assert_clean_error(run("data", "info", str(tiny_store), "--scenario", "roundabout"),
                       "--scenario 'roundabout': not a scenario of", "highway, merge")


def test_info_of_a_directory_that_is_not_a_store(tmp_path):
    assert_clean_error(run("data", "info", str(tmp_path)), "not an episode store", str(tmp_path))


def test_info_names_a_truncated_file(tmp_path, tiny_store):
    copy = tmp_path / "copy"
    shutil.copytree(tiny_store, copy)
    victim = copy / "episodes" / "episode_000001.parquet"
    victim.write_bytes(victim.read_bytes()[:100])
    info = json.loads((copy / "meta" / "info.json").read_text())
    info["episodes"] = 0  # stale counts make `info` reread every file
    (copy / "meta" / "info.json").write_text(json.dumps(info))
    assert_clean_error(run("data", "info", str(copy)), "episode_000001.parquet", "corrupted or truncated")


@pytest.mark.parametrize(
    "suite, fragments",
    [
        ("scenarios:\n  a: {env: hovercraft-v0}\n", ["hovercraft-v0", "valid ones:", "highway-v0"]),
        ("scenarios:\n  a: {env: merge-v0, config: {trafic: 1}}\n", ["'trafic'", "valid keys:"]),
        ("scenarios:\n  a: {env: merge-v0}\nframe_size: 3\n", ["'frame_size'", "valid keys:", "image_size"]),
    ],
)
def test_generate_with_a_bad_suite(tmp_path, suite, fragments):
    path = tmp_path / "bad.yaml"
    path.write_text(suite)
    result = run("data", "generate", "--suite", str(path), "--episodes", "1", "--out", str(tmp_path / "out"))
    assert_clean_error(result, "bad.yaml", *fragments)


def test_generate_into_a_store_of_another_suite(tmp_path, tiny_store, tiny_suite):
    copy = tmp_path / "copy"
    shutil.copytree(tiny_store, copy)
    result = run("data", "generate", "--suite", str(tiny_suite), "--episodes", "5", "--out", str(copy), "--seed", "3")
    assert_clean_error(result, "seed 3", "use another --out")


def test_operators_rejects_a_bad_scratchpad(tmp_path):
    result = run("data", "operators", "--out", str(tmp_path), "--scratchpad", "sometimes")
    assert result.returncode == 2 and "invalid choice" in result.stderr and "Traceback" not in result.stderr


def test_unknown_driver(tmp_path, tiny_suite):
    result = run("eval", "closed-loop", "--model", "superhuman", "--scenarios", str(tiny_suite))
    assert_clean_error(result, "superhuman", "expert, random, constant")
