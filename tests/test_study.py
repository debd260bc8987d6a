"""The distillation study: its config, reuse of finished runs, and the whole study on tiny settings (students
trained through the DeepSpeed launcher, closed loop in and out of distribution, reasoning, latency, report)."""

import json
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image
from unified.eval.study import load_study, train_run

from unified.errors import UnifiedError

ROOT = Path(__file__).resolve().parents[1]
STUDY = ROOT / "recipes" / "study.yaml"
TINY = ["model.hidden_size=64", "model.num_layers=2", "model.num_heads=4", "model.intermediate_size=128",
        "model.max_position_embeddings=256", "model.horizon=4", "data.seq_len=256", "data.batch_size=2",
        "steps=2", "save_every=2"]
OOD_SUITE = """\
name: tiny-ood
image_size: [32, 32]
scenarios:
  merge:
    env: merge-v0
    max_steps: 16
"""


def test_the_shipped_study_maps_onto_its_config():
    config = load_study(STUDY, ["episodes=3", "students.distilled.modes=[direct]", "teacher.run_dir=runs/x"])
    assert config.episodes == 3 and config.students["distilled"].modes == ["direct"]
    assert config.teacher.run_dir == "runs/x" and config.export_student in config.students
    assert set(config.stores) <= set(config.suites)
    with pytest.raises(UnifiedError, match=r"unknown key 'episode'.*valid keys: name, data, ranks"):
        load_study(STUDY, ["episode=3"])
    with pytest.raises(UnifiedError, match="export_student 'nobody' is not a student"):
        load_study(STUDY, ["export_student=nobody"])
    with pytest.raises(UnifiedError, match=r"students.distilled: unknown key\(s\) 'mode'"):
        load_study(STUDY, ["students.distilled.mode=direct"])
    # The teacher drives reasoning first, then skipping it: by its continuous head (the shipped study, whose
    # recipes all train one) or by its action tokens; every learned driver plans at every step.
    shipped = load_study(STUDY)
    assert shipped.teacher_modes == ["reason_continuous", "continuous"]
    assert (shipped.replan_every, shipped.ensemble, shipped.reason_every) == (1, None, 5)
    assert all(spec.modes == ["continuous"] for spec in shipped.students.values())
    assert load_study(STUDY, ["teacher_modes=[reason, direct]"]).teacher_modes == ["reason", "direct"]
    for wrong in ("[direct, reason]", "[reason]", "[reason_continuous, reason]"):
        with pytest.raises(UnifiedError, match="must be two: one that reasons first"):
            load_study(STUDY, [f"teacher_modes={wrong}"])
    with pytest.raises(UnifiedError, match="teacher_modes"):
        load_study(STUDY, ["teacher_modes=[reason, head]"])


def test_the_report_splits_success_on_starts_that_replay_training_traffic():
    """Each driver's success on the near-replays and on the other episodes, and the sentence that says it."""
    from unified.eval.report import _replays, _split_success

    episodes = [{"scenario": "ring", "seed": 1, "success": True}, {"scenario": "ring", "seed": 2, "success": False},
                {"scenario": "road", "seed": 1, "success": True}, {"scenario": "road", "seed": 3, "success": False}]
    split = _split_success(episodes, {("ring", 1), ("ring", 2)})
    assert split == {"episodes": 2, "successes": 1, "success_rate_of_the_others": 0.5}
    assert _split_success(episodes, set()) == {"episodes": 0, "successes": 0, "success_rate_of_the_others": 0.5}

    def row(name, mode, label, near):
        return {"name": name, "mode": mode, "label": label, "suites": {"in_distribution": {"near_replays": near}}}

    report = {"config": {"teacher_modes": ["reason_continuous", "continuous"]}, "figures": {"student": "student d"},
              "models": [row("teacher", "reason_continuous", "teacher r", split),
                         row("teacher", "continuous", "teacher c", split), row("d", "continuous", "student d", split),
                         row("expert", None, "expert", split)]}
    sentence = _replays(report, ["in_distribution"])
    assert sentence == ("; on those, success of the teacher r: in distribution 1 of 2 (the others 0.50); "
                        "student d: in distribution 1 of 2 (the others 0.50)")
    for r in report["models"]:
        r["suites"]["in_distribution"]["near_replays"] = _split_success(episodes, set())
    assert _replays(report, ["in_distribution"]) == ""  # no near-replay: nothing to say


def test_a_run_trained_with_another_configuration_is_refused(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "latest").write_text("step_0000002\n")
    from unified.config import to_dict
    from unified.train_config import load_recipe

    saved = to_dict(load_recipe(ROOT / "recipes" / "debug.yaml", ["steps=5", f"run_dir={run}"]))
    (run / "config.yaml").write_text(yaml.safe_dump(saved))
    with pytest.raises(UnifiedError, match=r"trained with another configuration \(steps: 5 then, 4 now\)"):
        train_run(str(ROOT / "recipes" / "debug.yaml"), [], run, ranks=1)


@pytest.mark.slow
def test_the_study_end_to_end_on_tiny_settings(model_data, tmp_path, capsys):
    from unified.eval.study import distill
    from unified.tokenizers.fit import Tokenizers

    from unified.model import ModelConfig, UnifiedModel
    from unified.model_dir import save_model
    from unified.policy import WorldModel

    tokenizers = Tokenizers.from_pretrained(model_data / "tok")
    torch.manual_seed(0)
    # The shipped study's teacher: a continuous head reading the standardised state through an MLP of its own.
    head = dict(action_head=True, action_head_state=True, action_head_standardize=True, action_head_state_mlp=True)
    teacher = UnifiedModel(ModelConfig(hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128,
                                       max_position_embeddings=256, horizon=4, max_reason_tokens=8, **head),
                           tokenizers.layout, state_dim=tokenizers.state.dim)
    save_model(teacher, tokenizers, tmp_path / "teacher")
    (tmp_path / "ood.yaml").write_text(OOD_SUITE)
    study = {
        "name": "tiny", "data": str(model_data / "shards"), "ranks": 1, "teacher_model": str(tmp_path / "teacher"),
        "teacher_modes": ["reason_continuous", "continuous"], "replan_every": 1, "ensemble": None,
        "reason_every": 2,
        "students": {  # the shipped recipes train the same head
            "ground_truth": {"recipe": str(ROOT / "recipes" / "action_only.yaml"), "overrides": TINY,
                             "init_from_teacher": True, "modes": ["continuous"]},
            "distilled": {"recipe": str(ROOT / "recipes" / "distill_action_only.yaml"),
                          "overrides": [*TINY, "distill.head_target=teacher_head"], "distill": True,
                          "modes": ["continuous", "direct"]},
        },
        "suites": {"in_distribution": str(model_data / "suite.yaml"),
                   "out_of_distribution": str(tmp_path / "ood.yaml")},
        "stores": {"in_distribution": str(model_data / "store")},
        "train_stores": [str(model_data / "store")],
        "episodes": 2, "workers": 1, "reasoning_episodes": 1, "latency_decisions": 2,
    }
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(study))
    out = tmp_path / "out"
    report = distill(study=tmp_path / "study.yaml", out=out)

    saved = json.loads((out / "report.json").read_text())
    assert saved["answer"] == report["answer"] and saved["answer"].count(". ") == 1 and saved["answer"].endswith(".")
    rows = {(r["name"], r["mode"]): r for r in saved["models"]}
    assert set(rows) == {("teacher", "reason_continuous"), ("teacher", "continuous"), ("ground_truth", "continuous"),
                         ("distilled", "continuous"), ("distilled", "direct"), ("expert", None), ("random", None),
                         ("constant", None)}
    for row in rows.values():
        assert set(row["suites"]) == {"in_distribution", "out_of_distribution"}
        for figures in row["suites"].values():
            lo, hi = figures["success_rate"]["ci95"]
            assert 0 <= lo <= figures["success_rate"]["mean"] <= hi <= 1 and figures["episodes"] == 2
    # The baselines differ: the expert drives, random driving leaves the road.
    assert rows[("expert", None)]["suites"]["in_distribution"]["success_rate"]["mean"] > \
        rows[("random", None)]["suites"]["in_distribution"]["success_rate"]["mean"]
    # Reasoning costs tokens; the continuous head generates none, the action tokens 4 steps x 2 dimensions.
    tokens = {k: r["latency"]["tokens_per_decision"] for k, r in rows.items() if "latency" in r}
    assert tokens[("teacher", "reason_continuous")] > 0 == tokens[("teacher", "continuous")] == \
        tokens[("distilled", "continuous")] and tokens[("distilled", "direct")] == 8
    assert rows[("teacher", "reason_continuous")]["latency"]["speedup_vs_teacher"] == 1.0
    assert set(rows[("teacher", "reason_continuous")]["reasoning_accuracy"]) == {"in_distribution"}
    assert saved["figures"]["student"] == rows[("distilled", "continuous")]["label"]
    assert set(saved["figures"]["success_ratio"]) == {"in_distribution", "out_of_distribution"}
    # Its head reads the standardised state through an MLP of its own (the recipes' head), through training, export
    # and loading.
    from unified.model_dir import load_model

    head = load_model(out / "models" / "distilled")[0].action_head
    assert head.state_out is not None and head.standardize and float(head.state_std.min()) > 0
    # The distilled student learned from the teacher reading its own reasoning, and the report says so.
    assert saved["teacher_reasoning"] == "generated"
    assert list((tmp_path / "teacher" / "cache").glob("reasoning-*.npz"))
    # Every learned driver and baseline is compared with the teacher pair by pair, on the same episodes.
    for key, row in rows.items():
        if key != ("teacher", "reason_continuous"):
            for suite, paired in row["paired_vs_teacher"].items():
                assert paired["pairs"] == 2 and 0 <= paired["mcnemar"]["p_value"] <= 1, (key, suite)
                lo, hi = paired["difference"]["ci95"]
                assert lo <= paired["difference"]["difference"] <= hi
    assert saved["overlap_with_training"]["shared_seeds"] == [] and \
        saved["overlap_with_training"]["evaluation_episodes"] == 4
    replays = len(saved["overlap_with_training"]["near_replays"])
    assert all(sum(r["suites"][s]["near_replays"]["episodes"] for s in r["suites"]) == replays for r in rows.values())
    markdown = (out / "report.md").read_text()
    assert f"**Answer.** {saved['answer']}" in markdown and "| expert (scripted) |" in markdown
    assert "**Paired test**" in markdown and "McNemar p =" in markdown
    assert "![success in and out of distribution](success.png)" in markdown
    for png in ("success.png", "latency.png"):
        assert Image.open(out / png).size[0] > 300
    # Rollout videos (the study's default: the first 2 episodes of every scenario), linked from the report; the
    # teacher's explained decisions are checked against what its car did.
    teacher_row = rows[("teacher", "reason_continuous")]["suites"]["in_distribution"]
    linked = [v for v in teacher_row["videos"].values() if v]
    assert linked and all((out / v).is_file() and v.startswith("videos/teacher_reason_continuous_in_distribution/")
                          for v in linked)
    assert len(list((out / "videos").rglob("*.gif"))) == 8 * 2 * 2  # 8 drivers, 2 suites of 1 scenario, 2 episodes
    assert "## Rollout videos" in markdown and f"]({linked[0]})" in markdown
    consistency = teacher_row["reasoning_consistency"]
    # The teacher explained every 2 steps and read its last explanation between; every learned driver planned at
    # every step.
    driven = json.loads((out / "eval" / "teacher_reason_continuous_in_distribution.json").read_text())
    assert (driven["reason_every"], driven["replan_every"], driven["ensemble"]) == (2, 1, None)
    assert consistency["decisions"] >= 2 and rows[("teacher", "continuous")]["suites"]["in_distribution"][
        "reasoning_consistency"] is None
    # The distilled student, exported action-only: a policy without an image decoder.
    assert json.loads((out / "student_action_only" / "unified.json").read_text())["action_only"] is True
    with pytest.raises(UnifiedError, match="action-only"):
        WorldModel.from_pretrained(out / "student_action_only")

    # A rerun trains nothing and drives nothing again: finished runs and matching reports are reused.
    checkpoint = out / "runs" / "distilled" / "checkpoints" / "step_0000002" / "model.safetensors"
    before = checkpoint.stat().st_mtime_ns
    capsys.readouterr()
    again = distill(study=tmp_path / "study.yaml", out=out)
    printed = capsys.readouterr().out
    assert printed.count("finished (2 steps), reused") == 2 and printed.count(".json: reused") == 17
    assert checkpoint.stat().st_mtime_ns == before
    assert again["figures"]["success_ratio"] == saved["figures"]["success_ratio"]
