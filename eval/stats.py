"""Intervals and tests for closed-loop results, in one place: the closed-loop report, `eval compare` and the
distillation study all call these (scipy computes them).

Drivers compared on the same seeds are a paired design: episode i of a scenario meets the same traffic whoever
drives it. Comparing them with two independent intervals ("they overlap") throws that away; McNemar's exact test
on the discordant pairs and a paired bootstrap of the difference use it.
"""

from __future__ import annotations

import warnings

import numpy as np
from scipy import stats

CONFIDENCE = 0.95
BOOTSTRAP_RESAMPLES = 10_000


def wilson_interval(successes: int, n: int) -> tuple[float, float]:
    """95% Wilson score interval of a rate (sound at 0 and 1, unlike the normal approximation); (0, 1) for n = 0."""
    if n == 0:
        return (0.0, 1.0)
    ci = stats.binomtest(int(successes), int(n)).proportion_ci(CONFIDENCE, method="wilson")
    return (float(ci.low), float(ci.high))


def mean_interval(values) -> tuple[float, float]:
    """95% Student-t interval of a mean; a point for fewer than two values."""
    values = np.asarray(values, np.float64)
    if len(values) < 2:
        mean = float(values.mean()) if len(values) else 0.0
        return (mean, mean)
    if np.all(values == values[0]):
        return (float(values[0]), float(values[0]))
    low, high = stats.t.interval(CONFIDENCE, len(values) - 1, loc=values.mean(), scale=stats.sem(values))
    return (float(low), float(high))


def mcnemar_exact(a, b) -> dict:
    """McNemar's exact test of paired successes `a`, `b` (bool arrays over the same episodes): under the null
    hypothesis the discordant pairs split 50/50. Returns the two counts and the two-sided p-value (1.0 when no
    pair is discordant)."""
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    if a.shape != b.shape:
        raise ValueError(f"paired outcomes must have the same length, got {a.shape} and {b.shape}")
    only_a, only_b = int(np.sum(a & ~b)), int(np.sum(~a & b))
    p = 1.0 if only_a + only_b == 0 else float(stats.binomtest(only_a, only_a + only_b, 0.5).pvalue)
    return {"only_first": only_a, "only_second": only_b, "p_value": min(1.0, p)}


def paired_difference(a, b, seed: int = 0) -> dict:
    """The mean of a - b over paired episodes and its 95% paired bootstrap interval (percentile method,
    10,000 resamples of the pairs)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape or len(a) == 0:
        raise ValueError(f"paired outcomes must have the same, non-zero length, got {a.shape} and {b.shape}")
    difference = float(np.mean(a - b))
    if np.all(a - b == (a - b)[0]):  # no spread: every resample gives the same difference
        return {"difference": difference, "ci95": [difference, difference]}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scipy warns about degenerate resamples on tiny samples
        result = stats.bootstrap((a, b), lambda x, y, axis=-1: np.mean(x - y, axis=axis), paired=True,
                                 n_resamples=BOOTSTRAP_RESAMPLES, confidence_level=CONFIDENCE,
                                 method="percentile", rng=np.random.default_rng(seed))
    ci = result.confidence_interval
    return {"difference": difference, "ci95": [float(ci.low), float(ci.high)]}


def paired_outcomes(first: dict, second: dict, key: str = "success") -> tuple[np.ndarray, np.ndarray]:
    """The per-episode outcomes of two closed-loop reports on the episodes both drove (matched on scenario and
    simulator seed), in the same order."""
    def by_episode(report: dict) -> dict:
        return {(e["scenario"], e["seed"]): bool(e[key]) for e in report.get("episodes", [])}

    a, b = by_episode(first), by_episode(second)
    common = sorted(set(a) & set(b))
    return np.array([a[k] for k in common], bool), np.array([b[k] for k in common], bool)


def compare_paired(first: dict, second: dict, key: str = "success") -> dict | None:
    """McNemar's test and the paired difference (second - first) of two closed-loop reports on their common
    episodes, or None when they share none."""
    a, b = paired_outcomes(first, second, key)
    return _paired(a, b) if len(a) else None


def _paired(a: np.ndarray, b: np.ndarray) -> dict:
    """McNemar's test and the paired difference (b - a) of paired outcomes."""
    return {"pairs": int(len(a)), "first_rate": float(a.mean()), "second_rate": float(b.mean()),
            "mcnemar": mcnemar_exact(b, a), "difference": paired_difference(b, a)}


def compare_pooled(pairs: list[tuple[dict, dict]], key: str = "success", match=paired_outcomes) -> dict:
    """The same lever measured on several training runs: `pairs` holds one (first, second) pair of closed-loop
    reports per run (e.g. per training seed, the recipe without and with the lever). Returns each run's paired
    comparison and the pooled one, over the episodes of all runs together (McNemar and the paired bootstrap on
    the concatenated pairs). The pooled test conditions on these runs: it says whether the lever changed these
    models, and, with few runs, nothing about how much another run of the recipe would vary. `match` pairs two
    reports' outcomes (`paired_outcomes`: closed-loop episodes)."""
    outcomes = [match(first, second, key) for first, second in pairs]
    for k, (a, _) in enumerate(outcomes):
        if len(a) == 0:
            what = "episode (scenario and simulator seed)" if match is paired_outcomes else "outcome"
            raise ValueError(f"run {k}: the two reports share no {what}")
    if not outcomes:
        raise ValueError("no pair of reports to compare")
    return {"runs": [_paired(a, b) for a, b in outcomes],
            "pooled": _paired(np.concatenate([a for a, _ in outcomes]), np.concatenate([b for _, b in outcomes]))}


def pooled_table(pairs: list[tuple[str, str]], result: dict, rate: str = "success", digits: int = 2) -> str:
    """`compare_pooled`'s result as a Markdown table: one row per run (`pairs`: its two models' names) and the
    pooled row; rates and differences to `digits` decimals."""
    f = f".{digits}f"
    lines = [f"| run | first | second | pairs | {rate} first / second | difference [95% paired bootstrap] | "
             "discordant (first only / second only) | McNemar p |", "|---|---|---|---|---|---|---|---|"]
    rows = [(str(k), a, b, c) for k, ((a, b), c) in enumerate(zip(pairs, result["runs"]))]
    rows.append(("**pooled**", "", "", result["pooled"]))
    for run, name_a, name_b, c in rows:
        d, m = c["difference"], c["mcnemar"]  # `_paired` tests (second, first): its only_second is first only
        lines.append(f"| {run} | {name_a} | {name_b} | {c['pairs']} | {c['first_rate']:{f}} / {c['second_rate']:{f}} | "
                     f"{d['difference']:+{f}} [{d['ci95'][0]:+{f}}, {d['ci95'][1]:+{f}}] | "
                     f"{m['only_second']} / {m['only_first']} | {m['p_value']:.3g} |")
    return "\n".join(lines)


def non_inferior(comparison: dict, first_rate: float, share: float) -> bool:
    """Whether the second driver keeps at least `share` of the first's rate by the paired interval: the lower
    end of the interval of (second - first) is at least -(1 - share) x the first's rate."""
    return comparison["difference"]["ci95"][0] >= -(1.0 - share) * first_rate


def format_p(p: float) -> str:
    """'= 0.38', '= 0.031', '< 0.001': two significant digits, never a misleading 0.00."""
    return "< 0.001" if p < 0.001 else f"= {p:.2g}" if p < 0.1 else f"= {p:.2f}"


def describe(comparison: dict, first: str, second: str) -> str:
    """One sentence: whether the paired test tells `second` from `first`, with p and the interval."""
    p = comparison["mcnemar"]["p_value"]
    d = comparison["difference"]
    lo, hi = d["ci95"]
    interval = f"{d['difference']:+.2f} [{lo:+.2f}, {hi:+.2f}]"
    if p >= 0.05:
        return (f"{second} is not distinguishable from {first} (McNemar p {format_p(p)} over {comparison['pairs']} "
                f"paired episodes; difference {interval})")
    direction = "better" if d["difference"] > 0 else "worse"
    return (f"{second} is {direction} than {first} by {abs(d['difference']):.2f} [{lo:+.2f}, {hi:+.2f}] "
            f"(McNemar p {format_p(p)} over {comparison['pairs']} paired episodes)")
