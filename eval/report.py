"""The distillation study's report: `report.json` (every figure), `report.md` (the table, the answer in two plain
sentences, the plots) and two PNG plots (success in and out of distribution per driver; decision latency)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
from unified.eval import stats
from unified.eval.modes import mode_flags
from unified.eval.training_plot import save_figure, subplots

MIN_TEACHER_SUCCESSES = 5  # below this many teacher successes in a suite, no share of them is reported
QUESTION = ("Does a policy that reasons before it acts keep its performance when distilled to emit actions "
            "directly, and how much faster is it then?")


def _label(name: str, mode: str | None) -> str:
    if mode is None:
        return f"{name} (scripted)"
    flags = mode_flags(mode)
    if name == "teacher":
        return ("teacher, reasoning first" if flags["reason"] else "teacher, reasoning skipped") + \
            (" (continuous head)" if flags["continuous"] else "")
    return f"student {name} ({'continuous head' if flags['continuous'] else 'action tokens'})"


def _rate(summary: dict, key: str) -> dict:
    return {"mean": summary[key]["mean"], "ci95": summary[key]["ci95"]}


def _split_success(episodes: list[dict], near: set[tuple[str, int]]) -> dict:
    """Successes on the episodes whose (scenario, seed) is in `near`, and the success rate of the others."""
    replays = [e["success"] for e in episodes if (e["scenario"], e["seed"]) in near]
    others = [e["success"] for e in episodes if (e["scenario"], e["seed"]) not in near]
    return {"episodes": len(replays), "successes": int(sum(replays)),
            "success_rate_of_the_others": sum(others) / len(others) if others else None}


def _answer(student: dict, teacher: dict, suites: list[str], aim_ratio: float, aim_speedup: float) -> tuple[dict, str]:
    """The figures that answer the question, and the answer in two plain sentences: the share of the teacher's
    success the student keeps (its point estimate) and what the paired test on the same episodes says of it."""
    ratios, kept, parts = {}, {}, []
    for suite in suites:
        s, t = student["suites"][suite]["success_rate"]["mean"], teacher["suites"][suite]["success_rate"]["mean"]
        where = suite.replace("_", " ")
        paired = student["paired_vs_teacher"][suite]
        # A share of a handful of successes is noise (1 against 4 would read as 400%): too few to take a share of.
        episodes = teacher["suites"][suite]["episodes"]
        wins = round(t * episodes)
        ratios[suite] = s / t if wins >= MIN_TEACHER_SUCCESSES else None
        kept[suite] = None if ratios[suite] is None else stats.non_inferior(paired, t, aim_ratio)
        d = paired["difference"]
        test = (f"paired difference {d['difference']:+.2f} [{d['ci95'][0]:+.2f}, {d['ci95'][1]:+.2f}], "
                f"McNemar p {stats.format_p(paired['mcnemar']['p_value'])}")
        if ratios[suite] is not None:
            parts.append(f"{ratios[suite]:.0%} {where} ({s:.2f} against {t:.2f}; {test})")
        else:
            parts.append(f"no measurable share {where}, where the teacher succeeds in only {wins} of {episodes} "
                         f"episodes ({s:.2f} against {t:.2f}; {test})")
    measured = [k for k in kept.values() if k is not None]
    meets = bool(measured) and all(measured)
    lat, teacher_lat = student["latency"], teacher["latency"]
    speedup = lat["speedup_vs_teacher"]
    fast = "at or above" if speedup >= aim_speedup else "below"
    verdict = ("and the paired intervals show it keeps at least" if meets else
               "and the paired intervals cannot show that it keeps at least")
    first = (f"Distilled to emit actions directly, the student keeps this share of the reasoning teacher's success "
             f"rate: {' and '.join(parts)}; {verdict} {aim_ratio:.0%} of it.")
    second = (f"It decides {speedup:.1f}x faster (median {lat['median_ms']:.0f} ms against "
              f"{teacher_lat['median_ms']:.0f} ms per decision, {lat['tokens_per_decision']:.0f} tokens generated "
              f"against {teacher_lat['tokens_per_decision']:.0f}), {fast} the aim of {aim_speedup:g}x.")
    figures = {"student": student["label"], "success_ratio": ratios, "keeps_aim_paired": kept, "speedup": speedup,
               "meets_success_aim": meets, "meets_speed_aim": speedup >= aim_speedup,
               "paired_vs_teacher": student["paired_vs_teacher"]}
    return figures, f"{first} {second}"


def write_study_report(config, out: Path, models: dict, closed: dict, explained: dict, timing: dict, study: str,
                       overrides: list[str], teacher_reasoning: str, overlap: dict) -> dict:
    """Assemble the figures of a finished study into OUT/report.{json,md} and the PNG plots."""
    from unified.config import to_dict

    suites = list(config.suites)
    bench = {(r["model"], r["mode"]): r for r in timing["models"]}
    reasoning = config.teacher_modes[0]  # the teacher reasoning first: what every other driver is paired against
    teacher_ms = bench[(str(models["teacher"]), reasoning)]["median_ms"]
    near = {(e["scenario"], e["seed"]) for e in overlap["near_replays"]}
    rows = []
    for (name, mode), by_suite in closed.items():
        row = {"label": _label(name, mode), "name": name, "mode": mode,
               "kind": "baseline" if mode is None else ("teacher" if name == "teacher" else "student"),
               "model_path": str(models[name]) if mode is not None else None, "suites": {}}
        for suite, report in by_suite.items():
            o = report["overall"]
            row["suites"][suite] = {
                "success_rate": _rate(o, "success_rate"), "collision_rate": _rate(o, "collision_rate"),
                "offroad_rate": _rate(o, "offroad_rate"), "mean_progress_m": o["mean_progress"]["mean"],
                "mean_jerk": o["mean_jerk"]["mean"], "episodes": o["episodes"],
                "decision_latency_ms": o["decision_latency_ms"], "tokens_per_decision": o["tokens_per_decision"],
                "per_scenario_success": {k: v["success_rate"]["mean"] for k, v in report["scenarios"].items()},
                "reasoning_consistency": o.get("reasoning_consistency"),
                # Success on the starts that replay a training episode's traffic, and on all the others.
                "near_replays": _split_success(report["episodes"], near),
                # One video of a success and one of a failure, where the recorded episodes hold them.
                "videos": {kind: next((os.path.relpath(v["path"], out) for v in report.get("videos", [])
                                       if v["success"] == (kind == "success")), None)
                           for kind in ("success", "failure")},
            }
        if mode is not None:
            b = bench[(str(models[name]), mode)]
            row["latency"] = {"median_ms": b["median_ms"], "p95_ms": b["p95_ms"],
                              "tokens_per_decision": b["tokens_per_decision"],
                              "speedup_vs_teacher": teacher_ms / b["median_ms"]}
        if name == "teacher" and mode == reasoning:
            row["reasoning_accuracy"] = {suite: r["reasoning_accuracy"] for suite, r in explained.items()}
        else:  # paired against the teacher reasoning first, on the same episodes (scenario, seed)
            row["paired_vs_teacher"] = {
                suite: stats.compare_paired(closed[("teacher", reasoning)][suite], report)
                for suite, report in by_suite.items()}
        rows.append(row)
    teacher = next(r for r in rows if r["name"] == "teacher" and r["mode"] == reasoning)
    headline = config.students[config.export_student].modes[0]
    student = next(r for r in rows if r["name"] == config.export_student and r["mode"] == headline)
    figures, answer = _answer(student, teacher, suites, config.aim_success_ratio, config.aim_speedup)
    report = {
        "question": QUESTION, "answer": answer, "figures": figures, "study": study, "overrides": overrides,
        "teacher_reasoning": teacher_reasoning, "overlap_with_training": overlap,
        "config": to_dict(config), "latency_benchmark": timing, "models": rows,
        "reasoning": {suite: {k: r[k] for k in ("reasoning_accuracy", "decision_accuracy", "cause_accuracy",
                                                 "agent_accuracy", "parsed_rate", "explanations", "examples")}
                      for suite, r in explained.items()},
        "student_action_only": str(out / "student_action_only"),
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    plot_success(rows, suites, out / "success.png")
    plot_latency([r for r in rows if r["mode"] is not None], out / "latency.png")
    (out / "report.md").write_text(markdown(report, suites))
    return report


def _replays(report: dict, suites: list[str]) -> str:
    """How the teacher reasoning first and the headline student did on the starts that replay training traffic,
    and on the others, so that a reader sees whether those starts lift a figure."""
    parts = []
    for row in report["models"]:
        teacher = row["name"] == "teacher" and row["mode"] == report["config"]["teacher_modes"][0]
        if not teacher and row["label"] != report["figures"]["student"]:
            continue
        near = {s: row["suites"][s]["near_replays"] for s in suites}
        split = [f"{s.replace('_', ' ')} {n['successes']} of {n['episodes']} (the others "
                 f"{n['success_rate_of_the_others']:.2f})" for s, n in near.items() if n["episodes"]]
        if split:
            parts.append(f"{row['label']}: {', '.join(split)}")
    return f"; on those, success of the {'; '.join(parts)}" if parts else ""


def markdown(report: dict, suites: list[str]) -> str:
    """The report as Markdown: the question, the answer, one table with the baselines, the plots, provenance."""
    config = report["config"]
    student = report["figures"]["student"]
    tests = "; ".join(
        f"{s.replace('_', ' ')}: " + stats.describe(report["figures"]["paired_vs_teacher"][s], "the teacher",
                                                     "the student")
        for s in suites)
    overlap = report["overlap_with_training"]
    lines = [f"# {config['name']}", "", f"**Question.** {report['question']}", "", f"**Answer.** {report['answer']}",
             "", f"**Paired test** ({student} against the teacher reasoning first, the same episodes): {tests}.", "",
             f"Closed loop: {config['episodes']} episodes per scenario of each suite "
             f"({', '.join(f'{k}: `{v}`' for k, v in config['suites'].items())}); success = no collision, still on "
             "the road, the instruction's destination reached and, on open road, the scenario's distance covered; "
             "[95% Wilson interval]. Every driver meets the same traffic (the same simulator seeds), so drivers are "
             "compared pair by pair: McNemar's exact test on the episodes where exactly one of the two succeeded, and "
             "a 95% paired bootstrap interval of the difference in success. The evaluation seeds share none with the "
             f"training store{'s' if len(overlap['stores']) > 1 else ''} ({', '.join(overlap['stores'])}), and "
             f"{len(overlap['near_replays'])} of {overlap['evaluation_episodes']} evaluation starts replay a training "
             f"episode's traffic (every vehicle within 3 m and 1.5 m/s){_replays(report, suites)}. The teacher "
             "distilled from reads its "
             f"{'own generated' if report['teacher_reasoning'] == 'generated' else 'recorded (simulator)'} reasoning "
             f"(`teacher_reasoning: {report['teacher_reasoning']}`). Latency: median per decision over "
             f"{report['latency_benchmark']['decisions']} held-out observations, all drivers interleaved in one "
             "process on one thread (`unified bench latency`).", ""]
    shown = [s.replace("_", " ") for s in suites]
    header = ["driver"] + [f"success {s}" for s in shown] + [f"collision {s}" for s in shown] + \
        [f"vs teacher {s}: difference [95%], p" for s in shown] + \
        ["latency ms (p95)", "speed-up", "tokens / decision", "reasoning accuracy"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in report["models"]:
        cells = [row["label"]]
        for s in suites:
            r = row["suites"][s]["success_rate"]
            cells.append(f"{r['mean']:.2f} [{r['ci95'][0]:.2f}, {r['ci95'][1]:.2f}]")
        cells += [f"{row['suites'][s]['collision_rate']['mean']:.2f}" for s in suites]
        for s in suites:
            paired = (row.get("paired_vs_teacher") or {}).get(s)
            if paired is None:
                cells.append("-")
            else:
                d = paired["difference"]
                cells.append(f"{d['difference']:+.2f} [{d['ci95'][0]:+.2f}, {d['ci95'][1]:+.2f}], "
                             f"p {stats.format_p(paired['mcnemar']['p_value'])}")
        if "latency" in row:
            lat = row["latency"]
            cells += [f"{lat['median_ms']:.1f} ({lat['p95_ms']:.1f})", f"{lat['speedup_vs_teacher']:.1f}x",
                      f"{lat['tokens_per_decision']:.0f}"]
        else:
            cells += ["-", "-", "-"]
        accuracy = row.get("reasoning_accuracy")
        cells.append(", ".join(f"{v:.2f} {k.replace('_', ' ')}" for k, v in accuracy.items()) if accuracy else "-")
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "![success in and out of distribution](success.png)", "", "![decision latency](latency.png)", ""]
    lines += ["## Reasoning", "", "The teacher's explanations, read back with the grammar of the simulator's "
              "causation records and compared with the record of the same step (decision, cause, critical agent):",
              ""]
    for suite, r in report["reasoning"].items():
        lines.append(f"- {suite.replace('_', ' ')}: {r['reasoning_accuracy']:.1%} of {r['explanations']} explanations "
                     "all correct "
                     f"(decision {r['decision_accuracy']:.1%}, cause {r['cause_accuracy']:.1%}, critical agent "
                     f"{r['agent_accuracy']:.1%}, well-formed {r['parsed_rate']:.1%})")
        for example in r["examples"][:2]:
            lines.append(f"  - generated: \"{example['generated']}\" / simulator: \"{example['truth']}\"")
    teacher = next(row for row in report["models"]
                   if row["kind"] == "teacher" and row["mode"] == config["teacher_modes"][0])
    consistent = {s: teacher["suites"][s].get("reasoning_consistency") for s in suites}
    if any(consistent.values()):
        lines += ["", "Reasoning-action consistency in closed loop: for every decision the teacher explained while "
                  "driving, whether the car then did what the explanation says within 2 s (\"slow down\": a mean "
                  "acceleration below 0; a lane change: 0.5 m towards that side; \"keep lane\": under 1 m either "
                  "way; `eval/model_driver.py`):", ""]
        for s, c in consistent.items():
            if c:
                lo, hi = c["consistent"]["ci95"]
                per = ", ".join(f"{d} {v['consistent']:.2f} of {v['judged']}" for d, v in c["by_decision"].items())
                lines.append(f"- {s.replace('_', ' ')}: {c['consistent']['mean']:.2f} [{lo:.2f}, {hi:.2f}] of "
                             f"{c['judged']} explained decisions ({c['unparsed']} more outside the grammar); {per}")
    videos = [(row["label"], s, row["suites"][s].get("videos") or {}) for row in report["models"] for s in suites]
    if any(v.get("success") or v.get("failure") for _, _, v in videos):
        lines += ["", "## Rollout videos", "", f"The first {config.get('videos', 0)} episodes of every scenario, per "
                  "driver and suite, are in `videos/` (what the driver saw, its explanation, its action, the outcome); "
                  "one success and one failure each where those episodes hold one:", "",
                  "| driver | suite | a success | a failure |", "|---|---|---|---|"]
        for label, s, v in videos:
            link = {k: f"[{Path(p).name}]({p})" if p else "-" for k, p in v.items()}
            lines.append(f"| {label} | {s.replace('_', ' ')} | {link['success']} | {link['failure']} |")
    lines += ["", "## Per scenario (success rate)", ""]
    for s in suites:
        names = list(report["models"][0]["suites"][s]["per_scenario_success"])
        lines += [f"**{s.replace('_', ' ')}**", "", "| driver | " + " | ".join(names) + " |",
                  "|---|" + "---|" * len(names)]
        for row in report["models"]:
            per = row["suites"][s]["per_scenario_success"]
            lines.append(f"| {row['label']} | " + " | ".join(f"{per[n]:.2f}" for n in names) + " |")
        lines.append("")
    command = f"unified eval distill --study {report['study']} --out OUT " + " ".join(report["overrides"])
    lines += ["## How this was made", "", f"`{command.strip()}`; every figure above is in `report.json`, every "
              "closed-loop report in `eval/`. The distilled student, exported action-only: "
              f"`{report['student_action_only']}`.", ""]
    return "\n".join(lines)


def plot_success(rows: list[dict], suites: list[str], path: Path) -> None:
    """Grouped bars: success rate per driver, one bar per suite, with 95% intervals."""
    fig, ax = subplots(figsize=(max(7, 1.3 * len(rows)), 4.2))
    x = np.arange(len(rows))
    width = 0.8 / len(suites)
    for k, suite in enumerate(suites):
        means = np.array([r["suites"][suite]["success_rate"]["mean"] for r in rows])
        ci = np.array([r["suites"][suite]["success_rate"]["ci95"] for r in rows])
        ax.bar(x + (k - (len(suites) - 1) / 2) * width, means, width, label=suite.replace("_", " "),
               yerr=[means - ci[:, 0], ci[:, 1] - means], capsize=3)
    ax.set_xticks(x, [r["label"].replace(", ", ",\n").replace(" (", "\n(") for r in rows], fontsize=7)
    ax.set_ylabel("success rate")
    ax.set_ylim(0, 1.05)
    ax.set_title("closed-loop success in and out of distribution (95% intervals)")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    save_figure(fig, path)


def plot_latency(rows: list[dict], path: Path) -> None:
    """Bars of the median decision latency per learned driver, p95 whiskers, tokens per decision on top."""
    fig, ax = subplots(figsize=(max(6, 1.4 * len(rows)), 4))
    medians = np.array([r["latency"]["median_ms"] for r in rows])
    p95 = np.array([r["latency"]["p95_ms"] for r in rows])
    x = np.arange(len(rows))
    ax.bar(x, medians, 0.6, yerr=[np.zeros_like(medians), p95 - medians], capsize=4, color="tab:gray")
    for k, r in enumerate(rows):
        ax.text(k, p95[k], f"{r['latency']['tokens_per_decision']:.0f} tokens\n"
                f"{r['latency']['speedup_vs_teacher']:.1f}x", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(x, [r["label"].replace(", ", ",\n").replace(" (", "\n(") for r in rows], fontsize=7)
    ax.set_ylabel("ms per decision (median, p95)")
    ax.set_ylim(0, p95.max() * 1.3)
    ax.set_title("decision latency (speed-up against the teacher reasoning first)")
    ax.grid(axis="y", alpha=0.3)
    save_figure(fig, path)
