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
    """Step-by-step text walking the chain from its top; 'inductive' states only the carried conclusion."""
    if scratchpad == "none":
        return ""
    top, lines = chain[0], []
    for i in range(1, len(chain)):
        if scratchpad == "full":
            if i == 1:
                lines.append(f"{top} is {more} than {chain[1]}.")
            else:
                lines.append(
                    f"{top} is {more} than {chain[i - 1]} and {chain[i - 1]} is {more} than {chain[i]}, "
                    f"so {top} is {more} than {chain[i]}."
                )
        else:  # inductive: each step depends on the previous state and one premise only
            lines.append(f"{top} > {chain[i]}.")
    verdict = f"So {x} is {more} than {y}." if x == top else f"So {x} is not {more} than {y}."
    return " ".join(lines) + " " + verdict


def operators(
    *, out: Path, hops: str = "2-6", scratchpad: Scratchpad = "none", n: int = 1000, seed: int = 0,
    overwrite: bool = False, progress: bool = True,
) -> dict:
    """Write `n` examples per hop count to `out/hops_{h}.jsonl` plus `out/meta/info.json`; returns the info.

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
    if check_dir(out, "operators") == "same":
        existing = json.loads((out / "meta" / "info.json").read_text())
        wanted = {"hops": hop_counts, "examples_per_hop": n, "scratchpad": scratchpad, "seed": seed}
        if all(existing.get(k) == v for k, v in wanted.items()):
            print(f"{out}: already holds these {existing['examples']} examples, kept", flush=True)
            return existing
    with staged_dir(out, "operators", overwrite=overwrite) as staging:
        info = _write(staging, hop_counts, scratchpad, n, seed, progress)
    print(f"{out}: {info['examples']} examples, hops {hops}, scratchpad {scratchpad}", flush=True)
    return info


def _write(out: Path, hop_counts: list[int], scratchpad: str, n: int, seed: int, progress: bool) -> dict:
    (out / "meta").mkdir(parents=True, exist_ok=True)
    answers: dict[int, Counter] = {}
    for h in tqdm(hop_counts, desc="operators", unit="hop count", disable=not progress):
        rng = np.random.default_rng([seed, h])
        path = out / f"hops_{h}.jsonl"
        counts = Counter()
        # Exactly balanced answers, in random order.
        balanced = rng.permutation(np.array(["yes", "no"] * (n // 2 + 1))[:n])
        with open(path, "w") as f:  # in the staging directory: the whole set appears at once
            for i in range(n):
                example = make_example(h, scratchpad, rng, i, answer=str(balanced[i]))
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
    }
    (out / "meta" / "info.json").write_text(json.dumps(info, indent=2) + "\n")
    return info
