"""`unified eval ablation`: what made the driver drive. Each row of an ablation YAML (recipes/ablation.yaml) trains
the teacher with one more lever than the row above it, through the DeepSpeed launcher, on the same data, and
drives both suites closed loop on the same evaluation seeds, action-only and (with `modes: [direct, reason]`)
reasoning first. The table says, per row, success in and out of distribution, collisions, the decision latency and
the training time.

    OUT/rows/K/  tokenizers (if the row fits its own), shards, run, model, closed-loop reports
    OUT/ablation.json, OUT/ablation.md
"""

from __future__ import annotations

import json as jsonlib
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from unified.tokenizers.action import FAST_DECODINGS, READOUTS

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
    compare_with: int | None = None  # the row its lever is added to (default: dagger_from, else the row above)
    readout: str = "mode"  # how the action tokens become values: mode, mean or median of each token's bins
    # An existing run of this row's training (e.g. the demo's teacher, runs/demo/joint), exported and driven
    # instead of training the same configuration again.
    run: str | None = None
    fast_decoding: str = "whole"  # a model that writes FAST tokens: whole chunks only, or free until </act>


@dataclass
class AblationConfig:
    rows: list[Row]
    name: str = "ablation"
    store: str = "runs/demo/data/train"
    operators: str = "runs/demo/data/operators"
    tokenizer: str = "runs/demo/tokenizers"
    shards: str | None = None  # `tokenizer`'s shards of `store`: rows with neither their own tokenizers nor DAgger
    modes: list[str] = field(default_factory=lambda: ["direct", "reason"])  # how each row's model is driven
    suites: dict[str, str] = field(default_factory=dict)
    episodes: int = 20
    workers: int = 2
    ranks: int = 2
    base: list[str] = field(default_factory=list)  # overrides every row starts from
    recipe: str = "recipes/joint.yaml"
    dagger_episodes: int = 100

    def __post_init__(self):
        if not self.modes or set(self.modes) - {"direct", "reason"}:
            raise UnifiedError(f"ablation modes: expected a non-empty list of direct and reason, got {self.modes}")
        for k, row in enumerate(self.rows):
            if row.readout not in READOUTS:
                raise UnifiedError(f"ablation rows[{k}].readout: {row.readout!r} is not one of {', '.join(READOUTS)}")
            if row.fast_decoding not in FAST_DECODINGS:
                raise UnifiedError(f"ablation rows[{k}].fast_decoding: {row.fast_decoding!r} is not one of "
                                   f"{', '.join(FAST_DECODINGS)}")
            for ref in (row.same_model_as, row.dagger_from, row.compare_with):
                if ref is not None and not 0 <= ref < k:
                    raise UnifiedError(f"ablation rows[{k}]: refers to row {ref}, which is not an earlier row")


def ablation(overrides: list[str] = (), *, spec: Path, out: Path) -> dict:
    """Run every row of the ablation `spec` (a YAML; key=value overrides it) into `out` and write the table.

    Resumable: a row's finished run and export are reused (its training time is read from the run itself), and so
    is a closed-loop report of the same weights, execution, suite and episode count."""
    from unified.eval.closed_loop import Evaluation, evaluate, write_report

    from unified.model_dir import weights_fingerprint
    from unified.outputs import check_dir, write_text_atomic
    from unified.outputs import write_report as write_json

    config = from_dict(AblationConfig, apply_overrides(AblationConfig, load_yaml(spec), list(overrides)), str(spec))
    out = Path(out)
    inputs = [spec, config.store, config.operators, config.tokenizer, *config.suites.values(),
              *([config.shards] if config.shards else [])]
    if check_dir(out, "ablation", inputs) == "new":  # resumable: a rerun continues an ablation directory
        write_text_atomic(out / "ablation_dir.json", jsonlib.dumps({"format": "unified-ablation"}) + "\n")
    results = []
    for k, row in enumerate(config.rows):
        print(f"== ablation row {k}: {row.name}", flush=True)
        where = out / "rows" / str(k)
        if row.same_model_as is not None:
            model, seconds = results[row.same_model_as]["model"], 0.0
        elif row.run is not None:
            from unified.export import export_once

            if not (Path(row.run) / "checkpoints" / "latest").is_file():
                raise UnifiedError(f"ablation rows[{k}].run: {row.run} holds no finished training run")
            model, seconds = export_once(Path(row.run), where / "model"), _training_seconds(Path(row.run))
        else:
            model = _train_row(config, row, where, results)
            seconds = _training_seconds(where / "run")
        figures = {"row": k, "name": row.name, "model": str(model), "train_seconds": round(seconds),
                   "replan_every": row.replan_every, "ensemble": row.ensemble, "suites": {}}
        # Each row is compared, pair by pair on the same episodes, with the row its lever was added to.
        against = next((r for r in (row.compare_with, row.dagger_from) if r is not None), k - 1)
        fingerprint = weights_fingerprint(model)
        for mode in config.modes:
            evaluations = {label: Evaluation(str(model), path, mode, row.replan_every, row.ensemble, row.readout,
                                             fast_decoding=row.fast_decoding)
                           for label, path in config.suites.items()}
            reports = {}
            for label, e in evaluations.items():
                report = _reusable(where / f"{mode}_{label}.json", e, config.episodes, fingerprint)
                if report is not None:
                    reports[e] = report
            missing = [e for e in evaluations.values() if e not in reports]
            if missing:
                reports |= evaluate(missing, config.episodes, config.workers)
            for label, e in evaluations.items():
                report = reports[e]
                write_report(report, where / f"{mode}_{label}.json")
                o = report["overall"]
                figures["suites"].setdefault(label, {})[mode] = entry = {
                    "success": o["success_rate"]["mean"], "ci95": o["success_rate"]["ci95"],
                    "collision": o["collision_rate"]["mean"], "latency_ms": o["decision_latency_ms"]["median"],
                    "tokens": o.get("tokens_per_decision"), "malformed": o.get("malformed_decodes"),
                    "per_scenario": {n: v["success_rate"]["mean"] for n, v in report["scenarios"].items()}}
                previous = out / "rows" / str(against) / f"{mode}_{label}.json"
                if against >= 0 and previous.is_file():
                    entry["vs"] = _paired(jsonlib.loads(previous.read_text()), report, against)
        results.append(figures)
        write_json(out / "ablation.json", {"spec": str(spec), "rows": results}, "ablation")
    write_text_atomic(out / "ablation.md", markdown(results, list(config.suites), config.episodes))
    print(markdown(results, list(config.suites), config.episodes), flush=True)
    return {"rows": results}


def _training_seconds(run: Path) -> float:
    """How long the run trained: from its configuration, written as it started, to its last checkpoint (the same
    figure whether the run was trained now or reused from an earlier invocation)."""
    return (run / "checkpoints" / "latest").stat().st_mtime - (run / "config.yaml").stat().st_mtime


def _reusable(path: Path, e, episodes: int, fingerprint: str) -> dict | None:
    """The closed-loop report at `path` if it drove the weights of `fingerprint` the same way on the same suite and
    episode count; else None."""
    from unified.eval.closed_loop import writes_fast

    from unified.sim.suite import load_suite

    if not path.is_file():
        return None
    report = jsonlib.loads(path.read_text())
    same = (report.get("fingerprint") == fingerprint and report.get("mode") == e.mode
            and report.get("replan_every") == e.replan_every and report.get("ensemble") == e.ensemble
            and report.get("readout", "mode") == e.readout
            # A FAST model's reports written before the option have none: they decoded freely, not whole chunks.
            and report.get("fast_decoding") == (e.fast_decoding if writes_fast(e.model) else None)
            and report.get("episodes_per_scenario") == episodes
            and report.get("suite_hash") == load_suite(e.suite).hash)
    if same:
        print(f"{path}: the same weights driven the same way, reused", flush=True)
    return report if same else None


def _paired(first: dict, second: dict, row: int) -> dict:
    """McNemar's test and the paired difference in success of `second` against `first` (row `row`)."""
    from unified.eval.stats import compare_paired

    c = compare_paired(first, second)
    return {"row": row, "pairs": c["pairs"], "difference": c["difference"]["difference"],
            "ci95": c["difference"]["ci95"], "p": c["mcnemar"]["p_value"]}


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
    if config.shards and not row.tokenizer_options and row.dagger_from is None:
        shards = Path(config.shards)  # the same tokenizers over the same store: the same shards
    elif not (shards / "meta.json").is_file():
        tokenize(data=store, tokenizer=tokenizer, out=shards, operators=Path(config.operators),
                 tasks="policy_reason,policy,world,text")
    train_run(config.recipe, [f"data={shards}", *config.base, *row.train, *init], where / "run", config.ranks)
    return export_once(where / "run", where / "model")


def markdown(rows: list[dict], suites: list[str], episodes: int) -> str:
    """The table (success with its interval, action-only and, where driven so, reasoning first; collisions; the
    paired comparison with the row each lever was added to; latency; training time), then action-only success
    per scenario."""
    from unified.eval.stats import format_p

    reason = any("reason" in r["suites"][s] for r in rows for s in suites)
    both = " (action-only / reasoning first)" if reason else " (action-only)"
    shown = [s.replace("_", " ") for s in suites]
    header = (["#", "setting"] + [f"success {s}{both}" for s in shown] + [f"collision {s}" for s in shown]
              + [f"action-only vs the row it changes, {s}: difference [95%], McNemar p" for s in shown]
              + [f"latency ms{both}", f"action tokens a decision, malformed decodes (action-only, {shown[0]})",
                 "training time"])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        cells = [str(r["row"]), r["name"]]
        for s in suites:
            d, q = r["suites"][s]["direct"], r["suites"][s].get("reason")
            cells.append(f"{d['success']:.2f} [{d['ci95'][0]:.2f}, {d['ci95'][1]:.2f}]"
                         + (f" / {q['success']:.2f}" if q else ""))
        cells += [f"{r['suites'][s]['direct']['collision']:.2f}" for s in suites]
        for s in suites:
            vs = r["suites"][s]["direct"].get("vs")
            cells.append("-" if vs is None else f"row {vs['row']}: {vs['difference']:+.2f} "
                         f"[{vs['ci95'][0]:+.2f}, {vs['ci95'][1]:+.2f}], p {format_p(vs['p'])}")
        first = r["suites"][suites[0]]
        cells.append(f"{first['direct']['latency_ms']:.0f}"
                     + (f" / {first['reason']['latency_ms']:.0f}" if "reason" in first else ""))
        tokens, bad = first["direct"].get("tokens"), first["direct"].get("malformed")
        cells.append("-" if tokens is None or bad is None else f"{tokens:.1f}, {bad['decisions']} of {bad['of']}")
        cells.append(f"{r['train_seconds'] // 60}:{r['train_seconds'] % 60:02d}" if r["train_seconds"] else
                     "(an earlier row's model)")
        lines.append("| " + " | ".join(cells) + " |")
    scenarios = [n for s in suites for n in rows[0]["suites"][s]["direct"].get("per_scenario", {})] if rows else []
    if scenarios:
        lines += ["", "Action-only success per scenario:", "",
                  "| # | " + " | ".join(n.replace("_", " ") for n in scenarios) + " |",
                  "|---|" + "---|" * len(scenarios)]
        for r in rows:
            per = {n: v for s in suites for n, v in r["suites"][s]["direct"].get("per_scenario", {}).items()}
            lines.append(f"| {r['row']} | " + " | ".join(f"{per[n]:.2f}" if n in per else "-" for n in scenarios)
                         + " |")
    return (f"{episodes} episodes per scenario, the same evaluation seeds for every row; success [95% Wilson "
            "interval].\n\n" + "\n".join(lines) + "\n")
