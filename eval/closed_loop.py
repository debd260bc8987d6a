"""`unified eval closed-loop`: drive every scenario of a suite with a driver, in parallel, and report
success, collisions, progress, speed and jerk with 95% confidence intervals, and decision latency."""

from __future__ import annotations

import json as jsonlib
import math
import multiprocessing as mp
import signal
from pathlib import Path
from typing import Any, Literal

import numpy as np
from tqdm import tqdm

from unified.errors import UnifiedError
from unified.sim.drivers import DRIVERS
from unified.sim.env import make_env
from unified.sim.rollout import run_episode
from unified.sim.suite import Suite, load_suite

EVAL_SEED = 1000  # evaluation episodes use seeds that data generation (default seed 0) never does
Z95 = 1.959964


def wilson_interval(successes: int, n: int) -> tuple[float, float]:
    """95% Wilson score interval of a rate; sound at 0 and 1, unlike the normal approximation."""
    if n == 0:
        return (0.0, 1.0)
    p = successes / n
    denominator = 1 + Z95**2 / n
    centre = (p + Z95**2 / (2 * n)) / denominator
    half = Z95 * math.sqrt(p * (1 - p) / n + Z95**2 / (4 * n * n)) / denominator
    # At 0 and n the bound is exact; computed, it would miss by a rounding error.
    low = 0.0 if successes == 0 else max(0.0, centre - half)
    high = 1.0 if successes == n else min(1.0, centre + half)
    return (low, high)


def mean_interval(values: np.ndarray) -> tuple[float, float]:
    """95% normal-approximation interval of a mean."""
    if len(values) < 2:
        return (float(np.mean(values)), float(np.mean(values))) if len(values) else (0.0, 0.0)
    half = Z95 * float(np.std(values, ddof=1)) / math.sqrt(len(values))
    return (float(np.mean(values)) - half, float(np.mean(values)) + half)


class _Worker:
    suite: Suite
    envs: dict
    policy = None

    setup_error: Exception | None = None

    @classmethod
    def setup(cls, suite_path: str, model: str | None = None, mode: str = "reason",
              replan_every: int | None = None) -> None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        # A pool whose initializer raises restarts workers forever: keep the error and raise it from run().
        try:
            cls.suite = load_suite(suite_path)
            cls.envs = {}
            if model is not None and model not in DRIVERS:
                import torch

                from unified.policy import Policy

                torch.set_num_threads(1)  # one thread per worker: workers are the parallelism
                cls.policy = Policy.from_pretrained(model)
                cls.mode, cls.replan_every = mode, replan_every
        except Exception as e:  # noqa: BLE001 - re-raised in run()
            cls.setup_error = e

    @classmethod
    def run(cls, job: tuple[str, str, int, int]) -> dict[str, Any]:
        if cls.setup_error is not None:
            raise cls.setup_error
        driver_name, scenario_name, index, seed = job
        scenario = cls.suite.scenarios[scenario_name]
        learned = driver_name not in DRIVERS
        if scenario_name not in cls.envs:
            cls.envs[scenario_name] = make_env(cls.suite, scenario, render=learned)
        if learned:
            from unified.eval.model_driver import ModelDriver

            driver = ModelDriver(cls.policy, cls.mode, cls.replan_every)
        else:
            driver = DRIVERS[driver_name]()
        episode = run_episode(
            cls.suite, scenario, driver, seed, index=index, render=False, env=cls.envs[scenario_name]
        )
        decisions = getattr(driver, "decisions", None)
        s = episode.summary
        # Jerk of the commanded acceleration, m/s^3: a comfort measure a passenger would feel.
        jerk = np.abs(np.diff(episode.actions[:, 0])) * cls.suite.policy_frequency
        return {
            "scenario": scenario_name, "index": index, "seed": seed, "success": s.success, "collision": s.collision,
            "offroad": s.offroad, "end": s.end, "steps": s.steps, "progress_m": s.progress_m,
            "mean_speed": s.mean_speed, "mean_jerk": float(jerk.mean()) if len(jerk) else 0.0,
            # A learned policy decides once per chunk; the scripted drivers at every step.
            "latencies_ms": [d["latency_ms"] for d in decisions] if decisions is not None
            else episode.latencies_ms.tolist(),
            "tokens_per_decision": float(np.mean([d["tokens"] for d in decisions])) if decisions else 0.0,
            "reasoning": [d["reasoning"] for d in decisions[:3]] if decisions else [],
        }


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
    out["decision_latency_ms"] = {
        "median": float(np.median(latencies)) if len(latencies) else 0.0,
        "p95": float(np.percentile(latencies, 95)) if len(latencies) else 0.0,
        "decisions": int(len(latencies)),
    }
    return out


def closed_loop(
    *, model: str, scenarios: Path, episodes: int = 20, workers: int = 1, seed: int = EVAL_SEED,
    json: Path | None = None, mode: Literal["reason", "direct", "continuous"] = "reason",
    replan_every: int | None = None, progress: bool = True,
) -> dict[str, Any]:
    """Drive `episodes` episodes of every scenario in the suite `scenarios` with `model` (an exported model
    directory, or the scripted expert, random or constant driver) and return (and with `json`, write) the
    report. A model reasons before acting (`mode reason`), acts directly (`direct`) or reads its continuous
    head (`continuous`), and re-plans every `replan_every` steps (default: its chunk length)."""
    if model not in DRIVERS and not (Path(model) / "unified.json").is_file():
        raise UnifiedError(f"--model: {model!r} is neither an exported model directory (with unified.json) nor a "
                           f"driver ({', '.join(DRIVERS)})")
    if episodes < 1 or workers < 1:
        raise UnifiedError(f"--episodes and --workers must be at least 1, got {episodes} and {workers}")
    suite = load_suite(scenarios)
    jobs = [
        (model, name, i, int(np.random.SeedSequence([seed, s, i]).generate_state(1)[0] & 0x7FFFFFFF))
        for s, name in enumerate(suite.scenarios) for i in range(episodes)
    ]
    records = _run(str(scenarios), jobs, workers, progress, f"{Path(model).name} on {suite.name}",
                   (model, mode, replan_every))
    report = {
        "model": model if model in DRIVERS else f"{Path(model).name} ({mode})",
        "model_path": None if model in DRIVERS else str(model),
        "mode": None if model in DRIVERS else mode,
        "suite": suite.name,
        "suite_path": str(scenarios),
        "suite_hash": suite.hash,
        "episodes_per_scenario": episodes,
        "seed": seed,
        "scenarios": {
            name: summarise([r for r in records if r["scenario"] == name]) for name in suite.scenarios
        },
        "overall": summarise(records),
    }
    print(format_table(report), flush=True)
    if json is not None:
        Path(json).parent.mkdir(parents=True, exist_ok=True)
        Path(json).write_text(jsonlib.dumps(report, indent=2) + "\n")
        print(f"wrote {json}", flush=True)
    return report


def _run(suite_path: str, jobs: list, workers: int, progress: bool, desc: str, model_args: tuple) -> list[dict]:
    records = []
    bar = tqdm(total=len(jobs), desc=desc, unit="ep", disable=not progress, dynamic_ncols=True)
    try:
        if workers == 1:
            _Worker.setup(suite_path, *model_args)
            signal.signal(signal.SIGINT, signal.default_int_handler)
            for job in jobs:
                records.append(_Worker.run(job))
                bar.update(1)
        else:
            with mp.get_context("spawn").Pool(workers, _Worker.setup, (suite_path, *model_args)) as pool:
                for record in pool.imap_unordered(_Worker.run, jobs):
                    records.append(record)
                    bar.update(1)
    finally:
        bar.close()
    return sorted(records, key=lambda r: (r["scenario"], r["index"]))


def format_table(report: dict[str, Any]) -> str:
    """The report as an aligned text table, one row per scenario plus the overall row."""
    header = f"{'scenario':<16}{'episodes':>9}{'success':>18}{'collision':>18}{'progress m':>12}{'speed m/s':>11}"
    rows = [f"{report['model']} on {report['suite']}", header]
    for name, m in [*report["scenarios"].items(), ("overall", report["overall"])]:
        def rate(key: str, m=m) -> str:
            lo, hi = m[key]["ci95"]
            return f"{m[key]['mean']:.2f} [{lo:.2f},{hi:.2f}]"

        rows.append(
            f"{name:<16}{m['episodes']:>9}{rate('success_rate'):>18}{rate('collision_rate'):>18}"
            f"{m['mean_progress']['mean']:>12.1f}{m['mean_speed']['mean']:>11.1f}"
        )
    return "\n".join(rows)


def compare(reports: list[Path]) -> str:
    """Print a Markdown table of closed-loop reports (`--json` outputs): success, collision and off-road rates
    per suite and scenario, one column per model."""
    loaded = []
    for path in reports:
        try:
            report = jsonlib.loads(Path(path).read_text())
            report["overall"], report["model"], report["suite"]  # noqa: B018 - the fields the table needs
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise UnifiedError(f"{path}: not a closed-loop report written by --json ({e})") from None
        loaded.append(report)
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
                cells.append("-" if rates is None else " / ".join(f"{v:.2f}" for v in rates))
            label = f"**{name}**" if name == "overall" else name
            lines.append(f"| {suite} | {label} | " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    print("success / collision / off-road rate per model\n" + table, flush=True)
    return table
