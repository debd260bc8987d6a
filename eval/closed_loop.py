"""`unified eval closed-loop`: drive every scenario of a suite with a driver, in parallel, and report
success, collisions, progress, speed and jerk with 95% confidence intervals, and decision latency."""

from __future__ import annotations

import json as jsonlib
import signal
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from tqdm import tqdm
from unified.eval.model_driver import execution
from unified.eval.modes import MODES, Mode, mode_flags
from unified.eval.state_mlp import StateMLP, StateMLPDriver, is_state_mlp
from unified.eval.stats import compare_paired, mean_interval, wilson_interval
from unified.tokenizers.action import FAST_DECODING, READOUT, READOUTS

from unified.errors import UnifiedError
from unified.sim.drivers import DRIVERS
from unified.sim.env import make_env
from unified.sim.rollout import run_episode
from unified.sim.seeds import evaluation_seed
from unified.sim.suite import load_suite
from unified.workers import spawn_pool

REPORT_VERSION = 3  # 2: per-episode rows, evaluation seeds disjoint from data seeds; 3: reasoning consistency, videos
EVAL_SEED = 1000  # any value: evaluation seeds lie in a range data generation never draws from (unified.sim.seeds)


@dataclass(frozen=True)
class Evaluation:
    """One driver on one suite: a scripted driver's name or an exported model directory with its mode."""

    model: str
    suite: str  # path of the suite YAML
    mode: str = "reason"  # for a model: one of model_driver.MODES
    replan_every: int | None = None  # for a model: steps between decisions (default: its chunk length)
    ensemble: float | None = None  # for a model: temporal ensembling of overlapping chunks (weight exp(-k i))
    readout: str = READOUT  # for a model acting by tokens: mode, mean or median of each action token's bins
    videos: int = 0  # the first N episodes of every scenario are written as rollout videos ...
    video_dir: str | None = None  # ... into this directory
    fast_decoding: str = FAST_DECODING  # for a model that writes FAST tokens: whole chunks only, or free
    reason_every: int | None = None  # for a reasoning model: steps between explanations (default: every decision)

    @property
    def learned(self) -> bool:
        return self.model not in DRIVERS


class _Worker:
    """One process of the pool: suites, environments and models are loaded on first use and kept."""

    suites: dict = {}
    envs: dict = {}
    policies: dict = {}
    device: str = "cpu"

    @classmethod
    def setup(cls, device: str = "cpu") -> None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        import torch

        torch.set_num_threads(1)  # one thread per worker: workers are the parallelism
        cls.device = device

    @classmethod
    def run(cls, job: tuple[Evaluation, str, int, int]) -> dict[str, Any]:
        evaluation, scenario_name, index, seed = job
        if evaluation.suite not in cls.suites:
            cls.suites[evaluation.suite] = load_suite(evaluation.suite)
        suite = cls.suites[evaluation.suite]
        scenario = suite.scenarios[scenario_name]
        state_only = evaluation.learned and is_state_mlp(evaluation.model)
        video = index < evaluation.videos
        key = (evaluation.suite, scenario_name, (evaluation.learned and not state_only) or video)
        if key not in cls.envs:
            cls.envs[key] = make_env(suite, scenario, render=key[2])
        if state_only:
            if evaluation.model not in cls.policies:  # loaded once per worker, as a policy is
                cls.policies[evaluation.model] = StateMLP.load(evaluation.model)
            driver = StateMLPDriver(cls.policies[evaluation.model], evaluation.replan_every, evaluation.ensemble,
                                    evaluation.readout)
        elif evaluation.learned:
            from unified.eval.model_driver import ModelDriver

            from unified.policy import Policy
            from unified.serve import PolicyClient, is_url

            if evaluation.model not in cls.policies:
                cls.policies[evaluation.model] = PolicyClient(evaluation.model) if is_url(evaluation.model) else \
                    Policy.from_pretrained(evaluation.model, device=cls.device)
            driver = ModelDriver(cls.policies[evaluation.model], evaluation.mode, evaluation.replan_every,
                                 evaluation.ensemble, evaluation.readout, evaluation.fast_decoding,
                                 evaluation.reason_every)
        else:
            driver = DRIVERS[evaluation.model]()
        episode = run_episode(suite, scenario, driver, seed, index=index, render=video, env=cls.envs[key])
        if hasattr(driver, "close_windows"):  # judge the explanations whose window the episode's end cut short
            driver.close_windows(cls.envs[key], final=True)
        decisions = getattr(driver, "decisions", None)
        video_path = _video(evaluation, scenario_name, index, seed, episode, decisions, suite.policy_frequency) \
            if video else None
        s = episode.summary
        # Jerk of the commanded acceleration, m/s^3: a comfort measure a passenger would feel.
        jerk = np.abs(np.diff(episode.actions[:, 0])) * suite.policy_frequency
        return {
            "evaluation": evaluation, "scenario": scenario_name, "index": index, "seed": seed,
            "success": s.success, "collision": s.collision, "offroad": s.offroad, "end": s.end, "steps": s.steps,
            "progress_m": s.progress_m, "mean_speed": s.mean_speed,
            "mean_jerk": float(jerk.mean()) if len(jerk) else 0.0,
            # A learned policy decides once per chunk; the scripted drivers at every step.
            "latencies_ms": [d["latency_ms"] for d in decisions] if decisions is not None
            else episode.latencies_ms.tolist(),
            "tokens_per_decision": float(np.mean([d["tokens"] for d in decisions])) if decisions else 0.0,
            "reasoning": [d["reasoning"] for d in decisions[:3]] if decisions else [],
            # Decisions whose action tokens did not make a whole chunk (`ActionResult.malformed`): what went wrong.
            "malformed": [f"step {d['step']}: {d['malformed']}" for d in decisions or [] if d.get("malformed")],
            # Each explained decision: the decision it states (None: outside the grammar) and whether the car did it.
            "stated": [{"decision": d["stated"], "consistent": d.get("consistent")}
                       for d in decisions or [] if "stated" in d],
            "video": video_path,
        }


def _video(evaluation: Evaluation, scenario: str, index: int, seed: int, episode, decisions, fps: float) -> str:
    """Write one episode's rollout video into the evaluation's video directory; its path."""
    from unified.eval.video import episode_video, outcome_of

    steps = len(episode.actions)
    if not evaluation.learned:  # a scripted driver: the causation record of what it chose, at every step
        explanations, label = [c.text for c in episode.causation], "its reason"
    else:  # a learned one: the explanation of its latest decision (None when it acted without one)
        explanations, latest, label = [], None, "reasoning"
        by_step = {d["step"]: d["reasoning"] for d in decisions or [] if "step" in d}
        for t in range(steps):
            latest = by_step.get(t, latest)
            explanations.append(latest)
    name = Path(evaluation.model).name if evaluation.learned else evaluation.model
    mode = f" ({evaluation.mode})" if evaluation.learned and not is_state_mlp(evaluation.model) else ""
    slug = outcome_of(episode.summary).split(" (")[0].replace(" ", "_")
    path = Path(evaluation.video_dir) / f"{scenario}_{index:03d}_{slug}.gif"
    episode_video(path, episode, explanations, fps, f"{name}{mode} | {scenario}, seed {seed}", label)
    return str(path)


def summarise(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Rates and means with 95% intervals, and latency percentiles, over episode records."""
    n = len(records)
    out: dict[str, Any] = {"episodes": n}
    for key, field in (("success_rate", "success"), ("collision_rate", "collision"), ("offroad_rate", "offroad")):
        k = sum(bool(r[field]) for r in records)
        out[key] = {"mean": k / n if n else 0.0, "ci95": list(wilson_interval(k, n))}
    for key, field in (("mean_progress", "progress_m"), ("mean_speed", "mean_speed"), ("mean_jerk", "mean_jerk")):
        values = np.array([r[field] for r in records], np.float64)
        out[key] = {"mean": float(values.mean()) if n else 0.0, "ci95": list(mean_interval(values))}
    out["tokens_per_decision"] = float(np.mean([r["tokens_per_decision"] for r in records])) if records else 0.0
    latencies = np.concatenate([np.asarray(r["latencies_ms"]) for r in records]) if records else np.zeros(0)
    stated = [d for r in records for d in r.get("stated", [])]
    if stated:
        out["reasoning_consistency"] = consistency(stated)
    out["decision_latency_ms"] = {
        "median": float(np.median(latencies)) if len(latencies) else 0.0,
        "p95": float(np.percentile(latencies, 95)) if len(latencies) else 0.0,
        "decisions": int(len(latencies)),
    }
    malformed = [f"{r['scenario']} episode {r['index']}, {m}" for r in records for m in r.get("malformed", [])]
    out["malformed_decodes"] = {"decisions": len(malformed), "of": int(len(latencies)), "examples": malformed[:5]}
    return out


def consistency(stated: list[dict]) -> dict[str, Any]:
    """Explained decisions -> how often the car did what the explanation said (`model_driver.consistent`), with a
    95% interval, overall and per stated decision."""
    from unified.sim.causation import DECISIONS

    judged = [d for d in stated if d["consistent"] is not None]
    k = sum(d["consistent"] for d in judged)
    by = {}
    for decision in DECISIONS:
        mine = [d["consistent"] for d in judged if d["decision"] == decision]
        if mine:
            by[decision] = {"judged": len(mine), "consistent": sum(mine) / len(mine)}
    return {"decisions": len(stated), "unparsed": sum(d["decision"] is None for d in stated), "judged": len(judged),
            "consistent": {"mean": k / len(judged) if judged else 0.0, "ci95": list(wilson_interval(k, len(judged)))},
            "by_decision": by}


def closed_loop(
    *, model: str, scenarios: Path, episodes: int = 20, workers: int = 1, seed: int = EVAL_SEED,
    json: Path | None = None, mode: Mode = "reason",
    replan_every: int | None = None, ensemble: float | None = None, no_ensemble: bool = False,
    readout: Literal["mode", "mean", "median"] = READOUT, fast_decoding: Literal["whole", "free"] = FAST_DECODING,
    reason_every: int | None = None, train_store: list[Path] = (),
    device: Literal["auto", "cpu", "cuda"] = "auto", videos: int = 0, video_dir: Path | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Drive `episodes` episodes of every scenario in the suite `scenarios` with `model` (an exported model
    directory, or the scripted expert, random or constant driver) and return (and with `json`, write) the
    report. A model reasons before acting (`mode reason`), acts directly (`direct`), reads its continuous
    head (`continuous`) or reasons first and then reads its head (`reason_continuous`), and re-plans every
    `replan_every` steps (its chunk length or more: each chunk executed to its end), blending the chunks that
    cover a step with weights exp(-ensemble * i), oldest first; `no_ensemble` executes the newest plan alone (with
    `replan_every 1`: its first action at every step, receding-horizon control). Defaults by mode: a plan every
    step, executed alone, for the head's modes; every 5 steps, blended with ensemble 0.5, for the token modes.
    `readout` turns a model's action tokens into values: the chosen bin's centre
    (mode, the default), or the mean or median of the bin centres under each token's distribution. A model that
    writes FAST tokens decodes whole chunks only (`fast_decoding whole`, the default) or freely until it writes
    `</act>` (`free`); either way the report counts the decisions whose tokens made no whole chunk.
    `reason_every N`: a reasoning model writes a new explanation every N steps and, at the decisions between,
    reads its last one again instead of writing one (default: a new one at every decision).
    `train_store` (one or more episode stores a model trained on): refuse evaluation episodes that share a
    simulator seed with their training episodes, and report those whose traffic is a near-replay of one.
    `device`: where a model runs (auto: cuda when a GPU is present; every worker holds its own copy).
    `videos N` writes the first N episodes of every scenario as rollout GIFs into `video_dir` (default: beside
    the --json report, JSON_STEM_videos/): the driver's frame, instruction, explanation, action and outcome."""
    from unified.outputs import check_file

    if json is not None:  # a bad path fails now, not after the evaluation
        from unified.serve import is_url

        local = model not in DRIVERS and not is_url(model)
        check_file(json, "closed-loop", [model if local else None, scenarios, *train_store])
    if videos:
        if video_dir is None and json is None:
            raise UnifiedError("--videos: give --video-dir DIR (or --json FILE: the videos go beside it)")
        video_dir = Path(video_dir) if video_dir is not None else Path(json).parent / f"{Path(json).stem}_videos"
        check_video_dir(video_dir)
    replan_every, ensemble = execution(mode, replan_every, ensemble, no_ensemble)
    evaluation = Evaluation(model, str(scenarios), mode, replan_every, ensemble, readout,
                            videos, str(video_dir) if videos else None, fast_decoding, reason_every)
    report = evaluate([evaluation], episodes, workers, seed, progress, device)[evaluation]
    if train_store:
        report["overlap"] = overlap_of(report, list(train_store), progress)
    print(format_table(report), flush=True)
    if train_store:
        o = report["overlap"]
        print(f"against {', '.join(o['stores'])}: {o['evaluation_episodes']} evaluation episodes, "
              f"{len(o['shared_seeds'])} share a seed and {len(o['near_replays'])} replay the traffic of any of "
              f"{o['training_episodes']} training episodes", flush=True)
    if json is not None:
        write_report(report, Path(json))
    return report


def check_video_dir(directory: Path) -> None:
    """A video directory is new, or holds rollout videos only (they are replaced one by one); anything else in it
    is refused, so that a mistyped path never mixes videos into a user's directory."""
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise UnifiedError(f"--video-dir {directory}: is a file; give a directory")
    if directory.is_dir():
        other = sorted(p.name for p in directory.iterdir() if p.suffix != ".gif" and not p.name.startswith("."))
        if other:
            raise UnifiedError(f"--video-dir {directory}: holds {', '.join(other[:3])}, not only rollout videos; "
                               "choose another directory (nothing was changed)")
    directory.mkdir(parents=True, exist_ok=True)


def overlap_of(report: dict[str, Any], stores: list[Path], progress: bool = True) -> dict:
    """The evaluation episodes of a report checked against training stores (`eval.overlap.check_overlap`)."""
    from unified.eval.overlap import check_overlap

    suite = load_suite(report["suite_path"])
    return check_overlap([(suite, e["scenario"], e["seed"]) for e in report["episodes"]], stores, progress)


def write_report(report: dict[str, Any], path: Path) -> None:
    from unified.outputs import write_report as write

    write(Path(path), report, "closed-loop")
    print(f"wrote {path}", flush=True)


def evaluate(evaluations: list[Evaluation], episodes: int, workers: int = 1, seed: int = EVAL_SEED,
             progress: bool = True, device: str = "auto",
             on_report: Callable[[Evaluation, dict[str, Any]], None] | None = None) -> dict[Evaluation, dict[str, Any]]:
    """The closed-loop report of every evaluation, their episodes driven by one pool of `workers` processes
    (each loads a suite, an environment or a model once, on `device`). Episode i of a scenario has the same seed
    whoever drives it, so every driver meets the same traffic. `on_report(evaluation, report)` is called as soon as
    an evaluation's last episode is in (the pool runs them evaluation by evaluation), so that a caller can save each
    report before the pool ends and lose no finished evaluation to a crash."""
    from unified.model_dir import resolve_device
    from unified.serve import is_url

    local = [e for e in evaluations if e.learned and not is_state_mlp(e.model) and not is_url(e.model)]
    device = resolve_device(device) if local else "cpu"
    for e in evaluations:
        if e.learned and not is_url(e.model) and not (Path(e.model) / "unified.json").is_file() \
                and not is_state_mlp(e.model):
            raise UnifiedError(f"--model: {e.model!r} is neither an exported model directory (with unified.json), "
                               f"a state-MLP baseline (with state_mlp.json), a policy server (http://HOST:PORT) "
                               f"nor a driver ({', '.join(DRIVERS)})")
        if e.mode not in MODES:
            raise UnifiedError(f"--mode: {e.mode!r} is not one of {', '.join(MODES)}")
        if e.readout not in READOUTS:
            raise UnifiedError(f"--readout: {e.readout!r} is not one of {', '.join(READOUTS)}")
        if e.readout != READOUT and is_state_mlp(e.model) and not StateMLP.load(e.model).bins:
            raise UnifiedError(f"--readout {e.readout}: {e.model} is a state MLP fitted by regression; a readout "
                               "reads a distribution over bins (fit it with --bins)")
        if e.replan_every is not None and e.replan_every < 1:
            raise UnifiedError(f"--replan-every must be at least 1 step, got {e.replan_every}")
        if e.reason_every is not None and (e.reason_every < 1 or not mode_flags(e.mode)["reason"]):
            raise UnifiedError(f"--reason-every {e.reason_every}: steps between a reasoning model's explanations, at "
                               f"least 1, with --mode reason or reason_continuous (got --mode {e.mode})")
        if e.ensemble is not None and e.ensemble < 0:
            raise UnifiedError(f"--ensemble must not be negative, got {e.ensemble}")
    if episodes < 1 or workers < 1:
        raise UnifiedError(f"--episodes and --workers must be at least 1, got {episodes} and {workers}")
    suites = {path: load_suite(path) for path in dict.fromkeys(e.suite for e in evaluations)}
    jobs = [
        (e, name, i, evaluation_seed(seed, s, i))
        for e in evaluations for s, name in enumerate(suites[e.suite].scenarios) for i in range(episodes)
    ]
    first = evaluations[0]
    desc = f"{Path(first.model).name} on {suites[first.suite].name}" if len(evaluations) == 1 else \
        f"{len(evaluations)} drivers x suites"
    reports: dict[Evaluation, dict[str, Any]] = {}
    finished: dict[Evaluation, list[dict]] = {e: [] for e in evaluations}
    per_evaluation = {e: episodes * len(suites[e.suite].scenarios) for e in evaluations}

    def collect(record: dict) -> None:
        mine = finished[record["evaluation"]]
        mine.append(record)
        if len(mine) == per_evaluation[record["evaluation"]]:
            e = record["evaluation"]
            reports[e] = _report(e, suites[e.suite], sorted(mine, key=lambda r: (r["scenario"], r["index"])),
                                 episodes, seed)
            if on_report is not None:
                on_report(e, reports[e])

    _run(jobs, workers, progress, desc, device, collect)
    return {e: reports[e] for e in evaluations}


def _report(e: Evaluation, suite, mine: list[dict], episodes: int, seed: int) -> dict[str, Any]:
    """The closed-loop report of evaluation `e` from its episode records `mine`, in (scenario, index) order."""
    return {
        "report_version": REPORT_VERSION,
        "model": e.model if not e.learned else
        f"{Path(e.model).name} ({'state MLP' if is_state_mlp(e.model) else e.mode}"
        f"{'' if e.readout == READOUT else ', ' + e.readout + ' readout'})",
        "model_path": str(e.model) if e.learned else None,
        "mode": e.mode if e.learned else None,
        "replan_every": e.replan_every if e.learned else None,
        "reason_every": e.reason_every if e.learned else None,
        "ensemble": e.ensemble if e.learned else None,
        "readout": e.readout if e.learned else None,
        "fast_decoding": e.fast_decoding if writes_fast(e.model) else None,
        "fingerprint": _fingerprint(e.model) if e.learned else None,
        "suite": suite.name,
        "suite_path": e.suite,
        "suite_hash": suite.hash,
        "episodes_per_scenario": episodes,
        "seed": seed,
        "scenarios": {name: summarise([r for r in mine if r["scenario"] == name]) for name in suite.scenarios},
        "overall": summarise(mine),
        # One row per episode, so that drivers evaluated on the same seeds can be compared pair by pair.
        "episodes": [{k: r[k] for k in EPISODE_FIELDS} for r in mine],
        "videos_per_scenario": e.videos,
        "videos": [{"scenario": r["scenario"], "index": r["index"], "success": r["success"], "path": r["video"]}
                   for r in mine if r["video"]],
    }


EPISODE_FIELDS = ("scenario", "index", "seed", "success", "collision", "offroad", "end", "steps", "progress_m")


def _server_info(url: str) -> dict:
    """What a policy server says of the model it serves (its /info)."""
    from unified.serve import PolicyClient

    client = PolicyClient(url)
    client.close()
    return client.info


def writes_fast(model: str) -> bool:
    """Whether `model` (an export, or a policy server) writes its actions as FAST tokens."""
    from unified.serve import is_url

    if model in DRIVERS or is_state_mlp(model):
        return False
    if is_url(model):
        return _server_info(model)["config"].get("action_tokens") == "fast"
    info = Path(model) / "unified.json"
    return info.is_file() and jsonlib.loads(info.read_text())["model"].get("action_tokens") == "fast"


def _fingerprint(model: str) -> str:
    """The weights' fingerprint, after checking every file of the export against its manifest's checksums (the
    workers then load it with the quick size check); a state MLP's: the checksum of its weights file."""
    from unified.serve import is_url

    if is_url(model):  # the server verified its export when it loaded it, and says whose weights it serves
        return _server_info(model)["fingerprint"]
    if is_state_mlp(model):
        import hashlib

        return hashlib.sha256((Path(model) / "model.safetensors").read_bytes()).hexdigest()[:16]
    from unified.model_dir import verify_model, weights_fingerprint  # torch: only where a learned model is evaluated

    verify_model(model, "full")
    return weights_fingerprint(model)


def _run(jobs: list, workers: int, progress: bool, desc: str, device: str, collect: Callable[[dict], None]) -> None:
    """Drive every job, handing each episode record to `collect` as it comes in."""
    def take(record: dict) -> None:
        bar.update(1)
        collect(record)
    bar = tqdm(total=len(jobs), desc=desc, unit="ep", disable=not progress, dynamic_ncols=True)
    try:
        if workers == 1:
            import torch

            threads = torch.get_num_threads()
            _Worker.suites, _Worker.envs, _Worker.policies = {}, {}, {}  # nothing from an earlier call
            _Worker.setup(device)
            signal.signal(signal.SIGINT, signal.default_int_handler)
            try:
                for job in jobs:
                    take(_Worker.run(job))
            finally:
                torch.set_num_threads(threads)
        else:
            with spawn_pool(workers, _Worker.setup, (device,)) as pool:
                # Longest first (a reasoning model's episodes), so that no worker is left with them at the end; a
                # stable sort, so each evaluation's episodes stay together and its report is ready as early as can be.
                order = sorted(jobs, key=lambda j: (j[0].learned, j[0].learned and mode_flags(j[0].mode)["reason"]),
                               reverse=True)
                for record in pool.imap_unordered(_Worker.run, order):
                    take(record)
    finally:
        bar.close()


def format_table(report: dict[str, Any]) -> str:
    """The report as an aligned text table, one row per scenario plus the overall row."""
    width = max(16, *(len(name) + 2 for name in report["scenarios"]))
    header = f"{'scenario':<{width}}{'episodes':>9}{'success':>18}{'collision':>18}{'progress m':>12}{'speed m/s':>11}"
    rows = [f"{report['model']} on {report['suite']}", header]
    for name, m in [*report["scenarios"].items(), ("overall", report["overall"])]:
        def rate(key: str, m=m) -> str:
            lo, hi = m[key]["ci95"]
            return f"{m[key]['mean']:.2f} [{lo:.2f},{hi:.2f}]"

        rows.append(
            f"{name:<{width}}{m['episodes']:>9}{rate('success_rate'):>18}{rate('collision_rate'):>18}"
            f"{m['mean_progress']['mean']:>12.1f}{m['mean_speed']['mean']:>11.1f}"
        )
    bad = report["overall"].get("malformed_decodes")
    if bad and bad["decisions"]:
        rows.append(f"malformed action decodes: {bad['decisions']} of {bad['of']} decisions drove a partial chunk "
                    f"(e.g. {bad['examples'][0]})")
    c = report["overall"].get("reasoning_consistency")
    if c:
        lo, hi = c["consistent"]["ci95"]
        rows.append(f"explanations: {c['decisions']} ({c['unparsed']} outside the grammar); the car did what the "
                    f"explanation said in {c['consistent']['mean']:.2f} [{lo:.2f},{hi:.2f}] of {c['judged']} "
                    f"(" + ", ".join(f"{d} {v['consistent']:.2f} of {v['judged']}" for d, v in c["by_decision"].items())
                    + ")")
    return "\n".join(rows)


def _load_reports(paths: list[Path], fields: tuple[str, ...]) -> list[dict]:
    """Closed-loop reports (`--json` outputs), each refused with its path unless it holds `fields`."""
    loaded = []
    for path in paths:
        try:
            report = jsonlib.loads(Path(path).read_text())
            for name in fields:
                report[name]  # noqa: B018 - a field the caller needs
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise UnifiedError(f"{path}: not a closed-loop report written by --json ({e})") from None
        loaded.append(report)
    return loaded


def compare(reports: list[Path]) -> str:
    """Print a Markdown table of closed-loop reports (`--json` outputs): success, collision and off-road rates and
    the mean progress along the route (m) per suite and scenario, one column per model."""
    loaded = _load_reports(reports, ("overall", "model", "suite"))
    models = list(dict.fromkeys(r["model"] for r in loaded))
    lines = [
        "| suite | scenario | " + " | ".join(models) + " |",
        "|---|---|" + "---|" * len(models),
    ]
    for suite in dict.fromkeys(r["suite"] for r in loaded):
        by_model = {r["model"]: r for r in loaded if r["suite"] == suite}
        names = list(next(iter(by_model.values()))["scenarios"]) + ["overall"]
        for name in names:
            cells = []
            for model in models:
                r = by_model.get(model)
                m = None if r is None else (r["overall"] if name == "overall" else r["scenarios"].get(name))
                keys = ("success_rate", "collision_rate", "offroad_rate")
                rates = None if m is None else [m[k]["mean"] for k in keys]
                cells.append("-" if rates is None else " / ".join(f"{v:.2f}" for v in rates)
                             + f" / {m['mean_progress']['mean']:.0f} m")
            label = f"**{name}**" if name == "overall" else name
            lines.append(f"| {suite} | {label} | " + " | ".join(cells) + " |")
    paired = []
    for suite in dict.fromkeys(r["suite"] for r in loaded):
        same = [r for r in loaded if r["suite"] == suite]
        for other in same[1:]:
            comparison = compare_paired(same[0], other)
            if comparison is not None:
                d, m = comparison["difference"], comparison["mcnemar"]
                paired.append(f"| {suite} | {other['model']} - {same[0]['model']} | {comparison['pairs']} | "
                              f"{d['difference']:+.2f} [{d['ci95'][0]:+.2f}, {d['ci95'][1]:+.2f}] | "
                              f"{m['only_second']} / {m['only_first']} | {m['p_value']:.3g} |")
    table = "\n".join(lines)
    if paired:
        table += ("\n\npaired against the first model on the same episodes (success)\n"
                  "| suite | difference | pairs | success difference [95% paired bootstrap] | "
                  "discordant pairs (first only / other only) | McNemar p |\n|---|---|---|---|---|---|\n"
                  + "\n".join(paired))
    print("success / collision / off-road rate / mean progress per model\n" + table, flush=True)
    return table


def compare_runs(*, first: list[Path], second: list[Path]) -> dict:
    """One lever on several training runs: `first[k]` and `second[k]` are closed-loop reports (`--json`) of run
    k without and with it (e.g. the recipe on training seed k), driven on the same evaluation episodes. Prints each
    run's paired difference and McNemar p, and the pooled test over all runs' episodes."""
    from unified.eval.stats import compare_pooled, pooled_table

    if len(first) != len(second) or not first:
        raise UnifiedError(f"--first and --second name one report per training run each, in the same order; got "
                           f"{len(first)} and {len(second)}")
    loaded = _load_reports([*first, *second], ("episodes", "model", "suite", "suite_hash"))
    pairs = list(zip(loaded[:len(first)], loaded[len(first):]))
    for (a, b), pa, pb in zip(pairs, first, second):
        if a["suite_hash"] != b["suite_hash"]:
            raise UnifiedError(f"{pa} and {pb}: reports of different suites ({a['suite']}, {b['suite']}) do not pair")
    try:
        result = compare_pooled(pairs)
    except ValueError as e:
        raise UnifiedError(f"compare-runs: {e}") from None
    print(pooled_table([(a["model"], b["model"]) for a, b in pairs], result), flush=True)
    return result
