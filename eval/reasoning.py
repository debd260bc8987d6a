"""`unified eval reasoning`: does the generated explanation name the right critical agent, cause and decision?

Ground truth is the simulator's causation record of the same step. A generated sentence is read back with
the grammar that `unified.sim.causation.describe` writes, so a sentence outside that grammar counts as wrong.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

import numpy as np
from tqdm import tqdm

from unified.errors import UnifiedError
from unified.sim.causation import _DO

AGENT_TOLERANCE_M = 5.0  # a stated distance within this of the true one names the same vehicle
_CAUSES = [
    (re.compile(r"^The car (-?\d+) m ahead is (\d+) m/s slower"), "slower vehicle ahead"),
    (re.compile(r"^I follow the car (-?\d+) m ahead"), "vehicle ahead"),
    (re.compile(r"^A car merges (\d+) m (?:ahead|behind)"), "merging vehicle"),
    (re.compile(r"^A car with right of way crosses my path (\d+) m"), "crossing vehicle"),
    (re.compile(r"^The (?:left|right) lane is free and faster"), "free faster lane"),
    (re.compile(r"^I am above my target speed"), "above target speed"),
    (re.compile(r"^The road ahead is clear"), "clear road"),
]
_DECISIONS = {phrase: decision for decision, phrase in _DO.items()}


def parse(text: str) -> dict | None:
    """'The car 18 m ahead is 4 m/s slower, so I change to the left lane.' -> cause, decision, distance (m)."""
    text = (text or "").strip()
    found = next(((m, c) for m, c in ((p.match(text), c) for p, c in _CAUSES) if m), None)
    if found is None:
        return None
    match, cause = found
    decision = next((d for phrase, d in _DECISIONS.items() if text.endswith(f"so I {phrase}.")), None)
    if decision is None:
        return None
    distance = float(match.group(1)) if match.groups() else None
    return {"cause": cause, "decision": decision, "distance_m": distance}


def judge(generated: str, truth) -> dict[str, bool]:
    """Compare a generated sentence with a `Causation` record."""
    parsed = parse(generated)
    if parsed is None:
        return {"parsed": False, "decision": False, "cause": False, "agent": False, "all": False}
    has_agent = truth.critical_id >= 0
    true_distance = float(np.hypot(*truth.critical_position)) if has_agent else None
    if has_agent and parsed["distance_m"] is not None:
        # describe() states the longitudinal gap for vehicles ahead and the distance otherwise.
        gap = abs(float(truth.critical_position[0])) if truth.cause in ("slower vehicle ahead", "vehicle ahead") \
            else true_distance
        agent = abs(parsed["distance_m"] - gap) <= AGENT_TOLERANCE_M
    else:
        agent = (parsed["distance_m"] is None) == (not has_agent or truth.cause == "free faster lane")
    decision, cause = parsed["decision"] == truth.decision, parsed["cause"] == truth.cause
    return {"parsed": True, "decision": decision, "cause": cause, "agent": agent, "all": decision and cause and agent}


def reasoning(*, model: Path, data: Path, json: Path | None = None, episodes: int = 10, every: int = 10,
              device: Literal["auto", "cpu", "cuda"] = "auto", progress: bool = True) -> dict:
    """Generate the explanation at every `every`-th step of up to `episodes` held-out episodes of `data`, taken
    round robin over its scenarios, with the model on `device` (auto: cuda when a GPU is present)."""
    from unified.data.store import EpisodeStore
    from unified.model_dir import resolve_device, weights_fingerprint
    from unified.outputs import check_file, write_report
    from unified.policy import Policy

    if episodes < 1 or every < 1:
        raise UnifiedError(f"--episodes and --every must be at least 1, got {episodes} and {every}")
    if json is not None:
        check_file(json, "reasoning", [model, data])
    policy = Policy.from_pretrained(model, device=resolve_device(device))
    store = EpisodeStore(data)
    indices = store.held_out_indices(stratified=True)[:episodes]
    if not indices:
        raise UnifiedError(f"{data}: no held-out episodes ({store.rule.description})")
    verdicts, examples, asked = [], [], []
    for index in tqdm(indices, desc="reasoning", unit="ep", disable=not progress):
        episode = store.read_episode(index)
        history = policy.config.history
        for t in range(0, len(episode.actions), every):
            result = policy.act(episode.frames[max(0, t - history + 1):t + 1], episode.instruction,
                                state=episode.states[t], reason=True)
            verdict = judge(result.reasoning, episode.causation[t])
            verdicts.append(verdict)
            asked.append({"episode": index, "step": t, **verdict})
            if len(examples) < 5:
                examples.append({"episode": index, "step": t, "generated": result.reasoning,
                                 "truth": episode.causation[t].text, **verdict})
    rate = {k: float(np.mean([v[k] for v in verdicts])) for k in ("parsed", "decision", "cause", "agent", "all")}
    report = {"model": str(model), "fingerprint": weights_fingerprint(model), "data": str(data),
              "episodes_asked": episodes, "episodes": len(indices), "episode_indices": indices,
              "scenarios": sorted({store.suite.scenario_for_episode(i).name for i in indices}),
              "held_out": store.rule.description, "explanations": len(verdicts),
              "reasoning_accuracy": rate["all"], "decision_accuracy": rate["decision"],
              "cause_accuracy": rate["cause"], "agent_accuracy": rate["agent"], "parsed_rate": rate["parsed"],
              "examples": examples, "verdicts": asked}
    print(f"{len(verdicts)} explanations: all correct {rate['all']:.1%} (decision {rate['decision']:.1%}, "
          f"cause {rate['cause']:.1%}, critical agent {rate['agent']:.1%}; well-formed {rate['parsed']:.1%})")
    if json is not None:
        write_report(Path(json), report, "reasoning")
    return report


def paired_verdicts(first: dict, second: dict, key: str = "all") -> tuple[np.ndarray, np.ndarray]:
    """The verdicts `key` of two reasoning reports on the explanations both asked for (matched on episode and
    step), in the same order."""
    def by_step(report: dict) -> dict:
        return {(v["episode"], v["step"]): bool(v[key]) for v in report["verdicts"]}

    a, b = by_step(first), by_step(second)
    common = sorted(set(a) & set(b))
    return np.array([a[k] for k in common], bool), np.array([b[k] for k in common], bool)


def compare_reasoning(*, first: list[Path], second: list[Path],
                      key: Literal["all", "decision", "cause", "agent", "parsed"] = "all") -> dict:
    """One lever on several training runs, by their reasoning: `first[k]` and `second[k]` are `eval reasoning`
    reports (`--json`) of run k without and with it, on the same store. Prints each run's paired difference in the
    share of explanations right (`key`: all, decision, cause, agent or parsed) and McNemar's p, then the pooled
    test over all runs' explanations (`stats.compare_pooled`)."""
    import json as jsonlib

    from unified.eval.stats import compare_pooled, pooled_table

    if len(first) != len(second) or not first:
        raise UnifiedError(f"--first and --second name one report per training run each, in the same order; got "
                           f"{len(first)} and {len(second)}")
    reports = []
    for path in [*first, *second]:
        try:
            report = jsonlib.loads(Path(path).read_text())
        except (OSError, ValueError) as e:
            raise UnifiedError(f"{path}: not a readable reasoning report ({e})") from None
        if "verdicts" not in report:
            raise UnifiedError(f"{path}: has no per-explanation verdicts; make it again with `unified eval reasoning "
                               "--json` (reports before them cannot be paired)")
        reports.append(report)
    pairs = list(zip(reports[:len(first)], reports[len(first):]))
    for (a, b), pa, pb in zip(pairs, first, second):
        if a["data"] != b["data"]:
            raise UnifiedError(f"{pa} and {pb}: reports of different stores ({a['data']}, {b['data']}) do not pair")
    try:
        result = compare_pooled(pairs, key, match=paired_verdicts)
    except ValueError as e:
        raise UnifiedError(f"compare-reasoning: {e}") from None
    print(pooled_table([(a["model"], b["model"]) for a, b in pairs], result, f"{key} right", 3), flush=True)
    return result
