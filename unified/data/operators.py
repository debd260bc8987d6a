"""`unified data operators`: synthetic multi-hop transitive comparisons for measuring length generalisation.

Each example hides a chain p0 > p1 > ... > pH behind H shuffled premises, each stated as "A is taller than
B" or, equivalently, "B is shorter than A", and asks about p0 and pH (in either order, so yes and no are
balanced). Answering takes exactly H hops. Files are split by hop count so that a model can train on few
hops and be tested on more.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Literal

import numpy as np
from tqdm import tqdm

from unified.errors import UnifiedError

FORMAT = "unified-operators"
RELATIONS = (("taller", "shorter"), ("older", "younger"), ("faster", "slower"), ("heavier", "lighter"))
NAMES = (
    "Ada", "Alan", "Alice", "Amir", "Ana", "Anton", "Aria", "Ben", "Bianca", "Bob", "Carla", "Chen", "Chloe",
    "Dario", "Dev", "Diana", "Elena", "Emil", "Eva", "Farah", "Felix", "Gita", "Hana", "Hugo", "Ines", "Ivan",
    "Jade", "Jonas", "Kai", "Kenji", "Lara", "Leon", "Lina", "Luca", "Maya", "Marco", "Mina", "Nadia", "Noor",
    "Olga", "Omar", "Pablo", "Patricia", "Priya", "Quinn", "Rafael", "Rosa", "Sami", "Sara", "Sofia", "Tariq",
    "Tess", "Umar", "Vera", "Victor", "Wen", "Yara", "Yusuf", "Zoe", "Zane",
)
Scratchpad = Literal["none", "full", "inductive"]


def parse_hops(hops: str) -> list[int]:
    """'2-6' -> [2, 3, 4, 5, 6]; '2,4,8' -> [2, 4, 8]; '3' -> [3]."""
    try:
        if "-" in hops:
            low, high = (int(x) for x in hops.split("-", 1))
            values = list(range(low, high + 1))
        else:
            values = [int(x) for x in hops.split(",")]
    except ValueError:
        raise UnifiedError(f"--hops: expected a range like 2-6 or a list like 2,4,8, got {hops!r}") from None
    if not values or min(values) < 1:
        raise UnifiedError(f"--hops: hop counts must be at least 1, got {hops!r}")
    if max(values) + 1 > len(NAMES):
        raise UnifiedError(f"--hops: at most {len(NAMES) - 1} hops (there are {len(NAMES)} names), got {hops!r}")
    return values


def make_example(
    hops: int, scratchpad: Scratchpad, rng: np.random.Generator, index: int = 0, answer: str | None = None
) -> dict:
    """One example needing `hops` steps of transitive reasoning; `answer` ('yes'/'no') is drawn when None."""
    more, less = RELATIONS[int(rng.integers(len(RELATIONS)))]
    chain = [NAMES[i] for i in rng.choice(len(NAMES), size=hops + 1, replace=False)]
    premises = []
    for a, b in zip(chain, chain[1:]):
        premises.append(f"{a} is {more} than {b}." if rng.random() < 0.5 else f"{b} is {less} than {a}.")
    premises = [premises[i] for i in rng.permutation(hops)]
    if answer is None:
        answer = "yes" if rng.random() < 0.5 else "no"
    x, y = (chain[0], chain[-1]) if answer == "yes" else (chain[-1], chain[0])
    question = f"Is {x} {more} than {y}?"
    steps = _reasoning(chain, more, x, y, scratchpad)
    return {
        "id": f"h{hops}-{index:06d}",
        "hops": hops,
        "relation": more,
        "premises": premises,
        "question": question,
        "prompt": " ".join(premises) + " " + question,
        "scratchpad": steps,
        "answer": answer,
        "target": (steps + " " if steps else "") + answer,
    }


def _reasoning(chain: list[str], more: str, x: str, y: str, scratchpad: Scratchpad) -> str:
    """Step-by-step text walking the chain from the question's first name `x` towards `y`: down the chain when `x`
    is its top (each step finds the premise where the last name reached is the greater one), up it when `x` is its
    bottom. Every step needs the question and the previous step only: the first finds the one premise naming `x`,
    the next ones the premise that goes on from the name just reached; the verdict compares the last name with `y`.
    'inductive' states only the carried conclusion (`x > c.` or `x < c.`), 'full' the premise used as well."""
    if scratchpad == "none":
        return ""
    down = x == chain[0]
    walk = chain if down else chain[::-1]
    less = dict(RELATIONS)[more]
    word, symbol = (more, ">") if down else (less, "<")
    lines = []
    for i in range(1, len(walk)):
        if scratchpad == "full":
            if i == 1:
                lines.append(f"{x} is {word} than {walk[1]}.")
            else:
                lines.append(f"{x} is {word} than {walk[i - 1]} and {walk[i - 1]} is {word} than {walk[i]}, "
                             f"so {x} is {word} than {walk[i]}.")
        else:  # inductive: each step depends on the previous state and one premise only
            lines.append(f"{x} {symbol} {walk[i]}.")
    verdict = f"So {x} is {more} than {y}." if down else f"So {x} is not {more} than {y}."
    return " ".join(lines) + " " + verdict


def operators(
    *, out: Path, hops: str = "2-6", scratchpad: Scratchpad = "none", n: int = 1000, seed: int = 0,
    exclude: list[Path] = (), overwrite: bool = False, progress: bool = True,
) -> dict:
    """Write `n` examples per hop count to `out/hops_{h}.jsonl` plus `out/meta/info.json`; returns the info.

    No example repeats a question (premises and question) of the operator data sets in `exclude`: one that
    would is drawn again, so a test set made with `--exclude TRAIN` holds no question a model trained on TRAIN saw.
    The same data set already at `out` (same options) is kept as it is; another one is replaced only with
    `overwrite`; a directory holding anything else (an episode store, a user's files) is refused."""
    from unified.outputs import check_dir, staged_dir

    if n < 1:
        raise UnifiedError(f"--n must be at least 1, got {n}")
    if seed < 0:
        raise UnifiedError(f"--seed must be 0 or more, got {seed}")
    if scratchpad not in ("none", "full", "inductive"):
        raise UnifiedError(f"--scratchpad: expected none, full or inductive, got {scratchpad!r}")
    hop_counts = parse_hops(hops)
    out = Path(out)
    excluded = _prompts(exclude)
    if check_dir(out, "operators") == "same":
        existing = json.loads((out / "meta" / "info.json").read_text())
        wanted = {"hops": hop_counts, "examples_per_hop": n, "scratchpad": scratchpad, "seed": seed,
                  "excluding": sorted(str(p) for p in exclude)}
        if all(existing.get(k) == v for k, v in wanted.items()):
            print(f"{out}: already holds these {existing['examples']} examples, kept", flush=True)
            return existing
    with staged_dir(out, "operators", overwrite=overwrite) as staging:
        info = _write(staging, hop_counts, scratchpad, n, seed, progress, excluded)
        info["excluding"] = sorted(str(p) for p in exclude)
        (staging / "meta" / "info.json").write_text(json.dumps(info, indent=2) + "\n")
    print(f"{out}: {info['examples']} examples, hops {hops}, scratchpad {scratchpad}", flush=True)
    return info


def _prompts(data_sets: list[Path]) -> set[str]:
    """Every prompt of the operator data sets `data_sets` (all their hop files)."""
    prompts: set[str] = set()
    for directory in data_sets:
        directory = Path(directory)
        if not (directory / "meta" / "info.json").is_file():
            raise UnifiedError(f"--exclude {directory}: not an operator data set (no meta/info.json)")
        for path in sorted(directory.glob("hops_*.jsonl")):
            for line_number, line in enumerate(path.read_text().splitlines(), 1):
                try:
                    prompts.add(json.loads(line)["prompt"])
                except (ValueError, KeyError) as e:
                    raise UnifiedError(f"{path}:{line_number}: not an operator example ({e})") from None
    return prompts


def _write(out: Path, hop_counts: list[int], scratchpad: str, n: int, seed: int, progress: bool,
           excluded: set[str] = frozenset()) -> dict:
    (out / "meta").mkdir(parents=True, exist_ok=True)
    answers: dict[int, Counter] = {}
    redrawn: Counter = Counter()
    for h in tqdm(hop_counts, desc="operators", unit="hop count", disable=not progress):
        rng = np.random.default_rng([seed, h])
        path = out / f"hops_{h}.jsonl"
        counts = Counter()
        # Exactly balanced answers, in random order.
        balanced = rng.permutation(np.array(["yes", "no"] * (n // 2 + 1))[:n])
        with open(path, "w") as f:  # in the staging directory: the whole set appears at once
            for i in range(n):
                example = make_example(h, scratchpad, rng, i, answer=str(balanced[i]))
                for _ in range(1000):
                    if example["prompt"] not in excluded:
                        break
                    redrawn[h] += 1
                    example = make_example(h, scratchpad, rng, i, answer=str(balanced[i]))
                else:
                    raise UnifiedError(f"--exclude: no {h}-hop question left that the excluded sets do not hold")
                counts[example["answer"]] += 1
                f.write(json.dumps(example) + "\n")
        answers[h] = counts
    info = {
        "format": FORMAT,
        "format_version": 1,
        "hops": hop_counts,
        "examples_per_hop": n,
        "examples": n * len(hop_counts),
        "scratchpad": scratchpad,
        "seed": seed,
        "files": {str(h): f"hops_{h}.jsonl" for h in hop_counts},
        "yes_fraction": {str(h): answers[h]["yes"] / n for h in hop_counts},
        "redrawn_as_excluded": {str(h): redrawn[h] for h in hop_counts},
    }
    (out / "meta" / "info.json").write_text(json.dumps(info, indent=2) + "\n")
    return info
