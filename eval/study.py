"""`unified eval distill`: does a policy that reasons before it acts keep its performance when distilled to emit
actions directly, and how much faster is it then?

A reasoning teacher (the joint recipe) is trained or loaded; action-only students are trained on the ground
truth and distilled from the teacher, each through the DeepSpeed launcher; the teacher (reasoning, and prompted
to skip its reasoning), the students and the scripted baselines drive the in- and out-of-distribution suites;
the report answers the question. Every step keeps its output, so a rerun resumes where the last one stopped:

    OUT/runs/NAME/              training runs (reused when finished with the same configuration, else resumed)
    OUT/models/NAME/            exported models; OUT/student_action_only/ the distilled student, --action-only
    OUT/eval/*.json             closed-loop, reasoning and latency reports (reused when they match)
    OUT/report.md, OUT/report.json, OUT/success.png, OUT/latency.png
"""

from __future__ import annotations

import json as jsonlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from unified.eval.modes import Mode, mode_flags
from unified.tokenizers.action import READOUT

from unified.config import apply_overrides, from_dict, load_yaml, to_dict
from unified.errors import UnifiedError


@dataclass
class RunSpec:
    recipe: str  # a training recipe, e.g. recipes/joint.yaml
    overrides: list[str] = field(default_factory=list)  # key=value applied to the recipe
    run_dir: str | None = None  # None: OUT/runs/NAME; a run that finished with the same configuration is reused


@dataclass
class StudentSpec(RunSpec):
    # How it acts: "direct" (action tokens, all steps at once) or "continuous" (its continuous head, one forward
    # pass; needs model.action_head=true). The first mode is the one the answer speaks of; each is evaluated.
    modes: list[Literal["direct", "continuous"]] = field(default_factory=lambda: ["direct"])
    distill: bool = False  # learn from the teacher (its export becomes distill.teacher)
    init_from_teacher: bool = False  # start from the teacher's weights


@dataclass
class StudyConfig:
    name: str = "distill_study"
    data: str = "runs/demo/shards"  # token shards (or an episode store + tokenizer override) every run trains on
    ranks: int = 2  # DeepSpeed ranks of every training run
    teacher: RunSpec = field(default_factory=lambda: RunSpec("recipes/joint.yaml"))
    teacher_model: str | None = None  # an exported teacher to use as it is (nothing is trained for it)
    # How the teacher drives: reasoning first, then prompted to skip it. [reason, direct] writes action tokens;
    # [reason_continuous, continuous] reads the continuous head (model.action_head) after the reasoning or without.
    teacher_modes: list[Mode] = field(default_factory=lambda: ["reason", "direct"])
    students: dict[str, StudentSpec] = field(default_factory=dict)
    export_student: str = "distilled"  # the student exported --action-only
    suites: dict[str, str] = field(default_factory=lambda: {
        "in_distribution": "recipes/data/train.yaml", "out_of_distribution": "recipes/data/ood.yaml"})
    episodes: int = 10  # closed-loop episodes per scenario
    # How every learned driver executes its chunks: re-plan every N steps (None: the chunk length) and blend the
    # chunks that cover a step with weights exp(-ensemble * i), oldest first (None: no blending).
    replan_every: int | None = None
    ensemble: float | None = None
    # A reasoning driver (the teacher reasoning first) writes a new explanation every N steps and reads its last one
    # again at the decisions between (None: a new one at every decision).
    reason_every: int | None = None
    readout: str = READOUT  # how action tokens become values: mode, mean or median of each token's bins
    workers: int = 2
    device: str = "auto"  # where the models run in evaluation: auto (cuda when a GPU is present), cpu or cuda
    baselines: list[str] = field(default_factory=lambda: ["expert", "random", "constant"])
    # Held-out episodes per suite (same keys as suites): reasoning accuracy and the observations timed.
    stores: dict[str, str] = field(default_factory=lambda: {
        "in_distribution": "runs/demo/data/train", "out_of_distribution": "runs/demo/data/ood"})
    # The stores every run trained on: no evaluation episode may share a simulator seed with one of theirs, and
    # those whose traffic replays one of theirs are counted in the report.
    train_stores: list[str] = field(default_factory=lambda: ["runs/demo/data/train"])
    reasoning_episodes: int = 5
    latency_decisions: int = 40
    videos: int = 2  # the first N episodes of every scenario, per driver and suite, as rollout GIFs in OUT/videos

    aim_success_ratio: float = 0.9  # the student should keep this fraction of the teacher's success
    aim_speedup: float = 3.0  # and decide this many times faster

    def __post_init__(self):
        if not self.students:
            raise UnifiedError("study: `students` is empty; name at least one action-only student")
        if self.export_student not in self.students:
            raise UnifiedError(f"study: export_student {self.export_student!r} is not a student "
                               f"({', '.join(self.students)})")
        if self.device not in ("auto", "cpu", "cuda"):
            raise UnifiedError(f"study: device {self.device!r} is not auto, cpu or cuda")
        if not self.stores:
            raise UnifiedError("study: `stores` is empty; reasoning and latency read held-out episodes of a store")
        if set(self.stores) - set(self.suites):
            raise UnifiedError(f"study: stores {sorted(set(self.stores) - set(self.suites))} name no suite "
                               f"({', '.join(self.suites)})")
        if len(self.teacher_modes) != 2 or not mode_flags(self.teacher_modes[0])["reason"] \
                or mode_flags(self.teacher_modes[1])["reason"]:
            raise UnifiedError(f"study: teacher_modes {self.teacher_modes} must be two: one that reasons first "
                               "(reason or reason_continuous), then one that skips it (direct or continuous)")
        for name, spec in self.students.items():
            if not spec.modes:
                raise UnifiedError(f"study: students.{name}.modes is empty; give direct and/or continuous")
        if self.ranks < 1 or self.episodes < 1 or self.workers < 1:
            raise UnifiedError("study: ranks, episodes and workers must each be at least 1")
        if self.reason_every is not None and self.reason_every < 1:
            raise UnifiedError(f"study: reason_every is a number of steps, at least 1; got {self.reason_every}")
        if self.videos < 0:
            raise UnifiedError(f"study: videos is a number of episodes per scenario, at least 0; got {self.videos}")


def load_study(path: str | Path, overrides: list[str] = ()) -> StudyConfig:
    """A study YAML with `key=value` overrides (dotted paths, e.g. teacher.run_dir=runs/joint, episodes=20)."""
    data = apply_overrides(StudyConfig, load_yaml(path), list(overrides))
    return from_dict(StudyConfig, data, str(path))


def _stage(k: int, n: int, text: str, started: float) -> None:
    elapsed = int(time.monotonic() - started)
    print(f"== study {k}/{n} (at {elapsed // 60}:{elapsed % 60:02d}): {text}", flush=True)


def train_run(recipe: str, overrides: list[str], run_dir: Path, ranks: int) -> None:
    """Train `recipe` into `run_dir` through the DeepSpeed launcher: reused when it already finished with the same
    configuration, resumed when it stopped early, refused when it was trained with another configuration."""
    import yaml

    from unified import checkpoint
    from unified.launcher import train
    from unified.train_config import TrainConfig, load_recipe

    overrides = [*overrides, f"run_dir={run_dir}"]
    wanted = to_dict(load_recipe(recipe, overrides))
    resume = (run_dir / "config.yaml").is_file()  # a run was started there
    if resume:
        saved = yaml.safe_load((run_dir / "config.yaml").read_text()) if (run_dir / "config.yaml").is_file() else {}
        # Read back through the config class, so that a field added since (at its default) is no difference.
        saved = to_dict(from_dict(TrainConfig, saved or {}, str(run_dir / "config.yaml")))
        differs = _differences(saved, wanted)
        if differs:
            raise UnifiedError(f"{run_dir} was trained with another configuration ({', '.join(differs[:4])}); "
                               "remove it or give the study another run_dir")
        found = checkpoint.latest(run_dir)
        step = checkpoint.read_info(found)["step"] if found is not None else 0
        if step >= wanted["steps"]:
            print(f"{run_dir}: finished ({step} steps), reused", flush=True)
            return
        print(f"{run_dir}: resuming at step {step} of {wanted['steps']}", flush=True)
    train(overrides, recipe=Path(recipe), ranks=ranks, resume=resume)


def _differences(saved, wanted, prefix: str = "") -> list[str]:
    if isinstance(saved, dict) and isinstance(wanted, dict):
        return [d for k in sorted(set(saved) | set(wanted))
                for d in _differences(saved.get(k), wanted.get(k), f"{prefix}{k}.")]
    return [] if saved == wanted else [f"{prefix[:-1]}: {saved!r} then, {wanted!r} now"]


def _cached(path: Path, **expected) -> dict | None:
    """The report at `path` if it exists and matches `expected` on every key, else None."""
    if not path.is_file():
        return None
    try:
        report = jsonlib.loads(path.read_text())
    except ValueError:
        return None
    return report if all(report.get(k) == v for k, v in expected.items()) else None


def distill(overrides: list[str] = (), *, study: Path, out: Path) -> dict:
    """Run the distillation study of `study` (a YAML; key=value overrides it) into `out` and write the report."""
    from unified.eval.latency import latency
    from unified.eval.report import write_study_report

    from unified.export import export_once
    from unified.model_dir import weights_fingerprint
    from unified.outputs import check_dir, write_report, write_text_atomic

    config = load_study(study, overrides)
    out = Path(out)
    # A study directory is resumable: a new one, or one of an earlier study; never a directory holding anything else.
    inputs = [study, config.data, *config.stores.values(), *config.suites.values(), *config.train_stores]
    if check_dir(out, "study", inputs) == "new":
        write_text_atomic(out / "study.json", jsonlib.dumps({"format": "unified-study", "name": config.name}) + "\n")
    stages, started = 6, time.monotonic()
    _stage(1, stages, "the reasoning teacher", started)
    teacher = _teacher(config, out)
    _stage(2, stages, f"action-only students ({', '.join(config.students)})", started)
    models = {"teacher": teacher}
    for name, spec in config.students.items():
        extra = ([f"distill.teacher={teacher}"] if spec.distill else []) + \
                ([f"init_from={teacher}"] if spec.init_from_teacher else [])
        run_dir = Path(spec.run_dir or out / "runs" / name)
        train_run(spec.recipe, [f"data={config.data}", *extra, *spec.overrides], run_dir, config.ranks)
        models[name] = out / "models" / name
        export_once(run_dir, models[name])
    export_once(models[config.export_student], out / "student_action_only", action_only=True)
    prints = {name: weights_fingerprint(path) for name, path in models.items()}

    # What drives: the teacher reasoning first and prompted to skip it, each student as it acts, the baselines.
    entries = [("teacher", mode) for mode in config.teacher_modes] + \
        [(s, mode) for s, spec in config.students.items() for mode in spec.modes]
    _stage(3, stages, f"closed loop: {len(entries)} learned drivers and {len(config.baselines)} baselines, "
                      f"{config.episodes} episodes per scenario of {', '.join(config.suites)}", started)
    closed = _closed_loop(config, out, entries + [(b, None) for b in config.baselines], models, prints)
    overlap = _overlap(config, closed)
    _stage(4, stages, "reasoning: the teacher's explanations against the simulator's causation records", started)
    explained = _reasoning(config, out, teacher, prints["teacher"])
    _stage(5, stages, "decision latency, every learned driver on the same observations, interleaved", started)
    timing = latency(models=[f"{models[name]}:{mode}" for name, mode in entries],
                     data=Path(next(iter(config.stores.values()))), decisions=config.latency_decisions,
                     device=config.device)
    write_report(out / "eval" / "latency.json", timing, "latency")  # the study's own directory
    _stage(6, stages, "report", started)
    distilled = [n for n, spec in config.students.items() if spec.distill]
    report = write_study_report(config, out, models, closed, explained, timing, study=str(study),
                                overrides=list(overrides), teacher_reasoning=_teacher_reasoning(config, distilled),
                                overlap=overlap)
    print(f"report: {out / 'report.md'} (and report.json, success.png, latency.png); the distilled student, "
          f"action-only: {out / 'student_action_only'}", flush=True)
    return report


def _teacher_reasoning(config: StudyConfig, distilled: list[str]) -> str:
    """What the distilled students' teacher read before its chunks: `generated` (its own) or `recorded`."""
    from unified.train_config import load_recipe

    used = {load_recipe(config.students[n].recipe, config.students[n].overrides).distill.teacher_reasoning
            for n in distilled}
    return "/".join(sorted(used)) if used else "none (no distilled student)"


def _overlap(config: StudyConfig, closed: dict) -> dict:
    """The evaluation episodes (the same seeds for every driver) checked once against the training stores."""
    from unified.eval.overlap import check_overlap

    from unified.sim.suite import load_suite

    reports = next(iter(closed.values()))
    episodes = [(load_suite(config.suites[label]), e["scenario"], e["seed"])
                for label, report in reports.items() for e in report["episodes"]]
    found = check_overlap(episodes, [Path(s) for s in config.train_stores])
    print(f"evaluation against training: {found['evaluation_episodes']} episodes, {len(found['shared_seeds'])} share "
          f"a seed, {len(found['near_replays'])} replay a training episode's traffic", flush=True)
    return found


def _teacher(config: StudyConfig, out: Path) -> Path:
    """The exported teacher: given, or trained (or reused) through the launcher and exported to OUT/models."""
    from unified.export import export_once

    if config.teacher_model:
        teacher = Path(config.teacher_model)
        if not (teacher / "unified.json").is_file():
            raise UnifiedError(f"teacher_model {teacher}: not an exported model directory (no unified.json)")
        return teacher
    run_dir = Path(config.teacher.run_dir or out / "runs" / "teacher")
    train_run(config.teacher.recipe, [f"data={config.data}", *config.teacher.overrides], run_dir, config.ranks)
    export_once(run_dir, out / "models" / "teacher")
    return out / "models" / "teacher"


def _closed_loop(config: StudyConfig, out: Path, drivers: list[tuple[str, str | None]], models: dict[str, Path],
                 prints: dict[str, str]) -> dict[tuple[str, str | None], dict[str, dict]]:
    """(driver, mode) -> suite label -> closed-loop report. Reports on disk that match (the same weights, suite
    and episode count) are reused; all the others are driven by one worker pool, each report written as its last
    episode comes in."""
    from unified.eval.closed_loop import REPORT_VERSION, Evaluation, check_video_dir, evaluate, write_report

    from unified.sim.suite import load_suite

    wanted = {}
    for label, suite_path in config.suites.items():
        suite_hash = load_suite(suite_path).hash
        for name, mode in drivers:
            learned = mode is not None
            videos = out / "videos" / f"{name}_{mode or 'scripted'}_{label}"
            reasons = learned and mode_flags(mode)["reason"]
            evaluation = Evaluation(str(models[name]) if learned else name, str(suite_path), mode or "reason",
                                    config.replan_every if learned else None, config.ensemble if learned else None,
                                    config.readout, config.videos, str(videos) if config.videos else None,
                                    reason_every=config.reason_every if reasons else None)
            expected = {"suite_hash": suite_hash, "episodes_per_scenario": config.episodes,
                        "report_version": REPORT_VERSION, "videos_per_scenario": config.videos,
                        **({"mode": mode, "fingerprint": prints[name], "replan_every": config.replan_every,
                            "ensemble": config.ensemble} if learned else {"model": name})}
            if reasons:  # a report without the key (written before the option) reasoned at every decision
                expected["reason_every"] = config.reason_every
            path = out / "eval" / f"{name}_{mode or 'scripted'}_{label}.json"
            cached = _cached(path, **expected)
            # Reports written before the readout was an option were read by the mode.
            if cached is not None and learned and cached.get("readout", "mode") != config.readout:
                cached = None
            wanted[(name, mode, label)] = (evaluation, path, cached)
    for _, path, report in wanted.values():
        if report is not None:
            print(f"{path}: reused", flush=True)
    missing = [evaluation for evaluation, _, report in wanted.values() if report is None]
    for evaluation in missing:
        if evaluation.video_dir:
            check_video_dir(Path(evaluation.video_dir))
    # Each report is written as soon as its episodes are in, so that a study cut short resumes from there.
    paths = {evaluation: path for evaluation, path, report in wanted.values() if report is None}
    fresh = evaluate(missing, config.episodes, config.workers, device=config.device,
                     on_report=lambda evaluation, report: write_report(report, paths[evaluation])) if missing else {}
    closed: dict[tuple[str, str | None], dict[str, dict]] = {driver: {} for driver in drivers}
    for (name, mode, label), (evaluation, _, report) in wanted.items():
        closed[(name, mode)][label] = fresh[evaluation] if report is None else report
    return closed


def _reasoning(config: StudyConfig, out: Path, teacher: Path, fingerprint: str) -> dict[str, dict]:
    """Suite label -> the teacher's reasoning report on that store's held-out episodes (reused when it matches)."""
    from unified.eval.reasoning import reasoning

    from unified.outputs import write_report

    explained = {}
    for label, store in config.stores.items():
        path = out / "eval" / f"reasoning_{label}.json"
        report = _cached(path, fingerprint=fingerprint, episodes_asked=config.reasoning_episodes)
        if report is None:
            report = reasoning(model=teacher, data=Path(store), episodes=config.reasoning_episodes,
                               device=config.device)
            write_report(path, report, "reasoning")
        else:
            print(f"{path}: reused", flush=True)
        explained[label] = report
    return explained
