"""`unified eval ablation`: what made the driver drive. Each row of an ablation YAML (recipes/ablation.yaml) trains
the teacher with one more lever than the row above it, through the DeepSpeed launcher, on the same data, and
drives both suites closed loop on the same evaluation seeds, action-only and reasoning first. The table says, per
row, success in and out of distribution, collisions, the decision latency and the training time.

    OUT/rows/K/  tokenizers (if the row fits its own), shards, run, model, closed-loop reports
    OUT/ablation.json, OUT/ablation.md
"""

from __future__ import annotations

import json as jsonlib
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from unified.config import apply_overrides, from_dict, load_yaml
from unified.errors import UnifiedError


@dataclass
class Row:
    name: str
    train: list[str] = field(default_factory=list)  # key=value overrides of the joint recipe
    tokenizer_options: list[str] = field(default_factory=list)  # `unified tokenizer fit` flags: its own tokenizers
    replan_every: int | None = None
    ensemble: float | None = None
    same_model_as: int | None = None  # evaluate that row's model again (an execution-only lever)
    dagger_from: int | None = None  # fine-tune that row's model on a DAgger round it drove (its execution)


@dataclass
class AblationConfig:
    rows: list[Row]
    name: str = "ablation"
    store: str = "runs/demo/data/train"
    operators: str = "runs/demo/data/operators"
    tokenizer: str = "runs/demo/tokenizers"
    suites: dict[str, str] = field(default_factory=dict)
    episodes: int = 20
    workers: int = 2
    ranks: int = 2
    base: list[str] = field(default_factory=list)  # overrides every row starts from
    recipe: str = "recipes/joint.yaml"
    dagger_episodes: int = 100

    def __post_init__(self):
        for k, row in enumerate(self.rows):
            for ref in (row.same_model_as, row.dagger_from):
                if ref is not None and not 0 <= ref < k:
                    raise UnifiedError(f"ablation rows[{k}]: refers to row {ref}, which is not an earlier row")


def ablation(overrides: list[str] = (), *, spec: Path, out: Path) -> dict:
    """Run every row of the ablation `spec` (a YAML; key=value overrides it) into `out` and write the table."""
    from unified.eval.closed_loop import Evaluation, evaluate, write_report

    from unified.outputs import check_dir, write_text_atomic
    from unified.outputs import write_report as write_json

    config = from_dict(AblationConfig, apply_overrides(AblationConfig, load_yaml(spec), list(overrides)), str(spec))
    out = Path(out)
    inputs = [spec, config.store, config.operators, config.tokenizer, *config.suites.values()]
    if check_dir(out, "ablation", inputs) == "new":  # resumable: a rerun continues an ablation directory
        write_text_atomic(out / "ablation_dir.json", jsonlib.dumps({"format": "unified-ablation"}) + "\n")
    results = []
    for k, row in enumerate(config.rows):
        print(f"== ablation row {k}: {row.name}", flush=True)
        where = out / "rows" / str(k)
        started = time.monotonic()
        if row.same_model_as is not None:
            model, seconds = results[row.same_model_as]["model"], 0.0
        else:
            model = _train_row(config, row, where, results)
            seconds = time.monotonic() - started
        figures = {"row": k, "name": row.name, "model": str(model), "train_seconds": round(seconds),
                   "replan_every": row.replan_every, "ensemble": row.ensemble, "suites": {}}
        for mode in ("direct", "reason"):
            evaluations = {label: Evaluation(str(model), path, mode, row.replan_every, row.ensemble)
                           for label, path in config.suites.items()}
            reports = evaluate(list(evaluations.values()), config.episodes, config.workers)
            for label, e in evaluations.items():
                report = reports[e]
                write_report(report, where / f"{mode}_{label}.json")
                o = report["overall"]
                figures["suites"].setdefault(label, {})[mode] = {
                    "success": o["success_rate"]["mean"], "ci95": o["success_rate"]["ci95"],
                    "collision": o["collision_rate"]["mean"], "latency_ms": o["decision_latency_ms"]["median"],
                    "per_scenario": {n: v["success_rate"]["mean"] for n, v in report["scenarios"].items()}}
        results.append(figures)
        write_json(out / "ablation.json", {"spec": str(spec), "rows": results}, "ablation")
    write_text_atomic(out / "ablation.md", markdown(results, list(config.suites), config.episodes))
    print(markdown(results, list(config.suites), config.episodes), flush=True)
    return {"rows": results}


def _train_row(config: AblationConfig, row: Row, where: Path, results: list[dict]) -> Path:
    """Tokenizers (the demo's, or the row's own), shards, a DAgger round where asked, the run, the export."""
    from unified.eval.study import train_run

    from unified.cli import main as unified
    from unified.data.dagger import ROUND_STRIDE, dagger
    from unified.data.store import EpisodeStore
    from unified.data.tokenize import tokenize
    from unified.export import export_once

    tokenizer = Path(config.tokenizer)
    if row.tokenizer_options:
        tokenizer = where / "tokenizers"
        if not (tokenizer / "fit.json").is_file():
            code = unified(["tokenizer", "fit", "--data", config.store, "--out", str(tokenizer),
                            "--operators", config.operators, *row.tokenizer_options])
            if code:
                raise UnifiedError(f"ablation: fitting the tokenizers of row {row.name!r} failed")
    store, init = Path(config.store), []
    if row.dagger_from is not None:
        source = results[row.dagger_from]
        store = where / "store"
        if not (store / "meta" / "info.json").is_file():  # the expert's episodes only, then this row's round
            shutil.copytree(config.store, store, ignore=shutil.ignore_patterns("episode_1*", "episode_2*"))
            kept = [p for p in (store / "episodes").glob("episode_*.parquet") if int(p.stem[8:]) >= ROUND_STRIDE]
            for p in kept:
                p.unlink()
            EpisodeStore(store).refresh_info()
        dagger(model=Path(source["model"]), out=store, episodes=config.dagger_episodes, round=1,
               replan_every=source["replan_every"], ensemble=source["ensemble"], workers=config.workers)
        init = [f"init_from={source['model']}"]
    shards = where / "shards"
    if not (shards / "meta.json").is_file():
        tokenize(data=store, tokenizer=tokenizer, out=shards, operators=Path(config.operators),
                 tasks="policy_reason,policy,world,text")
    train_run(config.recipe, [f"data={shards}", *config.base, *row.train, *init], where / "run", config.ranks)
    return export_once(where / "run", where / "model")


def markdown(rows: list[dict], suites: list[str], episodes: int) -> str:
    shown = [s.replace("_", " ") for s in suites]
    header = (["#", "setting"] + [f"success {s} (action-only / reasoning first)" for s in shown]
              + [f"collision {s}" for s in shown] + ["latency ms (action-only / reasoning)", "training time"])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        cells = [str(r["row"]), r["name"]]
        for s in suites:
            d, q = r["suites"][s]["direct"], r["suites"][s]["reason"]
            cells.append(f"{d['success']:.2f} [{d['ci95'][0]:.2f}, {d['ci95'][1]:.2f}] / {q['success']:.2f}")
        cells += [f"{r['suites'][s]['direct']['collision']:.2f}" for s in suites]
        first = r["suites"][suites[0]]
        cells.append(f"{first['direct']['latency_ms']:.0f} / {first['reason']['latency_ms']:.0f}")
        cells.append(f"{r['train_seconds'] // 60}:{r['train_seconds'] % 60:02d}" if r["train_seconds"] else
                     "(row above)")
        lines.append("| " + " | ".join(cells) + " |")
    return (f"{episodes} episodes per scenario, the same evaluation seeds for every row; success [95% Wilson "
            "interval].\n\n" + "\n".join(lines) + "\n")

