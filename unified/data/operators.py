"""`unified data operators`: synthetic multi-hop transitive comparisons for measuring length generalisation.

Each example hides a chain of 2H + 1 names, p0 > p1 > ... > p2H, behind its 2H premises, each stated as
"A is taller than B" or, equivalently, "B is shorter than A", and asks about two names H links apart, both inside
the chain: p_u and p_{u+H} for a random u in 1..H-1, in either order (so yes and no are balanced). Neither name is
an end of the chain, so no premise or short walk from the question's names tells which is the greater: the
answer needs the H links between them. (An earlier version asked about the chain's two ends; the first name's one
premise then decided the answer at any hop count, a shortcut that made the task no test of length.)
`premises` pads every question to that many premises with a second chain of other names, so that a 12-hop
question is as long as a 2-hop one: what grows with the hop count is then the reasoning alone, not the input (a
model trained on short questions would otherwise meet, beyond the hop counts it knows, premises further back than
any it learned to look to). `steps` chooses what a scratchpad step does: widen an interval around the first name
one link each way (two lookups a step) or walk down one link (one lookup). `premise_form` symbols states the
premises as the walk's steps do ("A > B.", "A is more <relation> than B"; or "B < A."): shorter than a sentence,
and the premise a walk's step needs reads exactly as that step.
Files are split by hop count so that a model can train on few hops and be tested on more.
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
FORMAT_VERSION = 2  # 2: questions about names inside the chain
RELATIONS = (("taller", "shorter"), ("older", "younger"), ("faster", "slower"), ("heavier", "lighter"))
NAMES = (
    "Ada", "Alan", "Alice", "Amir", "Ana", "Anton", "Aria", "Ben", "Bianca", "Bob", "Carla", "Chen", "Chloe",
    "Dario", "Dev", "Diana", "Elena", "Emil", "Eva", "Farah", "Felix", "Gita", "Hana", "Hugo", "Ines", "Ivan",
    "Jade", "Jonas", "Kai", "Kenji", "Lara", "Leon", "Lina", "Luca", "Maya", "Marco", "Mina", "Nadia", "Noor",
    "Olga", "Omar", "Pablo", "Patricia", "Priya", "Quinn", "Rafael", "Rosa", "Sami", "Sara", "Sofia", "Tariq",
    "Tess", "Umar", "Vera", "Victor", "Wen", "Yara", "Yusuf", "Zoe", "Zane",
)
Scratchpad = Literal["none", "full", "inductive"]
Phrasing = Literal["both", "greater-first"]
Steps = Literal["interval", "walk"]
PremiseForm = Literal["words", "symbols"]
MIN_HOPS = 2
# The drawing options of `make_example` beyond the hop count and scratchpad, with the values that sets written
# before an option existed hold (read so by `read_info` and by the same-set check of `operators`).
OPTION_DEFAULTS = {"phrasing": "both", "steps": "interval", "premises": 0, "min_premises": 0, "premise_form": "words",
                   "drills": False}


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
    if not values or min(values) < MIN_HOPS:
        raise UnifiedError(f"--hops: hop counts must be at least {MIN_HOPS} (both names inside the chain), "
                           f"got {hops!r}")
    if chain_length(max(values)) > len(NAMES):
        raise UnifiedError(f"--hops: at most {(len(NAMES) - 1) // 2} hops (a chain of 2 x hops + 1 names, there are "
                           f"{len(NAMES)} names), got {hops!r}")
    return values


def chain_length(hops: int) -> int:
    """Names in the chain of a `hops`-hop question: the H + 1 between and including the question's two, and H more
    above and below them together (at least one on each side)."""
    return 2 * hops + 1


def make_example(
    hops: int, scratchpad: Scratchpad, rng: np.random.Generator, index: int = 0, answer: str | None = None,
    phrasing: Phrasing = "both", steps: Steps = "interval", premises: int = 0, min_premises: int = 0,
    premise_form: PremiseForm = "words", drills: bool = False,
) -> dict:
    """One example needing `hops` steps of transitive reasoning; `answer` ('yes'/'no') is drawn when None.
    `phrasing`: each premise stated one way or the other ("A is taller than B." or "B is shorter than A."), or
    always the greater name first ("A is taller than B."). `steps`: the scratchpad's form (`_interval`, `_walk`).
    `premises`: 0 for the chain's 2 x hops; more adds a second chain of other names to make up that many (drawn after
    everything else, so the question, its chain and its scratchpad are those of the example without it);
    `min_premises` > 0 draws the number uniformly from max(min_premises, 2 x hops) to `premises`.
    `premise_form`: premises as sentences ("A is taller than B.") or as symbols ("A > B."; `_premise`).
    `drills` (the walk's inductive scratchpad only): the example also gets `drills`, walk steps from the other names
    of its chains (`_drills`), which training adds as extra groups of the scratchpad; nothing else changes."""
    if hops < MIN_HOPS:
        raise UnifiedError(f"an operator question needs at least {MIN_HOPS} hops, got {hops}")
    if premises and not 2 * hops <= premises <= len(NAMES) - 2:
        raise UnifiedError(f"--premises: a {hops}-hop question has {2 * hops} premises of its own, and there are "
                           f"names for at most {len(NAMES) - 2}; got {premises}")
    more, less = RELATIONS[int(rng.integers(len(RELATIONS)))]
    chain = [NAMES[i] for i in rng.choice(len(NAMES), size=chain_length(hops), replace=False)]
    stated = [_premise(a, b, more, less, phrasing, rng, premise_form) for a, b in zip(chain, chain[1:])]
    stated = [stated[i] for i in rng.permutation(len(stated))]
    if answer is None:
        answer = "yes" if rng.random() < 0.5 else "no"
    upper = int(rng.integers(1, hops))  # names above the question's greater one: 1..H-1, so H-1..1 below the other
    high, low = chain[upper], chain[upper + hops]
    x, y = (high, low) if answer == "yes" else (low, high)
    if min_premises and premises:
        premises = int(rng.integers(max(min_premises, len(stated)), premises + 1))
    second: list[str] = []
    if premises > len(stated):
        others = [name for name in NAMES if name not in chain]
        second = [others[i] for i in rng.choice(len(others), size=premises - len(stated) + 1, replace=False)]
        stated += [_premise(a, b, more, less, phrasing, rng, premise_form) for a, b in zip(second, second[1:])]
        stated = [stated[i] for i in rng.permutation(len(stated))]
    question = f"Is {x} {more} than {y}?"
    text = "" if scratchpad == "none" else (_walk if steps == "walk" else _interval)(chain, more, x, y)
    extra = {}
    if drills:
        if steps != "walk" or scratchpad != "inductive":
            raise UnifiedError("--drills: drills are groups of the walk's inductive scratchpad (--steps walk "
                               f"--scratchpad inductive), got --steps {steps} --scratchpad {scratchpad}")
        extra["drills"] = _drills([chain, second], y, text)
    return {
        "id": f"h{hops}-{index:06d}",
        "hops": hops,
        "relation": more,
        "premises": stated,
        "question": question,
        "prompt": " ".join(stated) + " " + question,
        "scratchpad": text,
        "answer": answer,
        "target": (text + " " if text else "") + answer,
        **extra,
    }


def _drills(chains: list[list[str]], y: str, walk: str) -> list[list[str]]:
    """Lookup drills for the walk's inductive scratchpad: for every name b with a name a above and c below it in
    one of `chains` (greatest first), the pair ["a > b.", "b > c."], a walk step's context (the previous state) and
    the step written from it. The walk's own steps are left out (the scratchpad trains them already), and so are the
    steps from the question's second name `y`, after which the walk gives its verdict instead. Each drill is a
    lookup the question does not ask for but that its premises answer, with the walk's rule (go on from the name
    reached, stop at `y`), so that training meets every premise as a lookup target rather than the two to four the
    walk uses."""
    from unified.data.tokenize import split_steps

    own = set(split_steps(walk))
    return [[f"{a} > {b}.", f"{b} > {c}."] for names in chains for a, b, c in zip(names, names[1:], names[2:])
            if b != y and f"{b} > {c}." not in own]


def _premise(a: str, b: str, more: str, less: str, phrasing: Phrasing, rng: np.random.Generator,
             form: PremiseForm = "words") -> str:
    """"a is <more> than b." (symbols: "a > b."), or (phrasing both, at random) the same said the other way round,
    "b is <less> than a." ("b < a.")."""
    one_way = phrasing == "greater-first" or rng.random() < 0.5
    if form == "symbols":
        return f"{a} > {b}." if one_way else f"{b} < {a}."
    return f"{a} is {more} than {b}." if one_way else f"{b} is {less} than {a}."


def _interval(chain: list[str], more: str, x: str, y: str) -> str:
    """Step-by-step text widening an interval around the question's first name `x` one link each way per step,
    "b < x < a." (b below x, a above it, in the question's relation), until one end reaches `y`; then the verdict.
    An end that reaches the top or bottom of the chain stays there. Every step needs the question and the previous
    step only: the first finds the two premises naming `x`'s neighbours, each later one the premise going on from
    each end, the verdict whether `y` is the lower or the upper end."""
    i = chain.index(x)
    lines = []
    for k in range(1, len(chain)):
        below, above = chain[min(i + k, len(chain) - 1)], chain[max(i - k, 0)]
        lines.append(f"{below} < {x} < {above}.")
        if y in (below, above):
            break
    verdict = f"So {x} is {more} than {y}." if y == below else f"So {x} is not {more} than {y}."
    return " ".join(lines) + " " + verdict


def _walk(chain: list[str], more: str, x: str, y: str) -> str:
    """Step-by-step text walking down the chain from the question's first name `x`, one link a step: "m > n." goes
    from the name m the walk has reached to the next one below it, n (in the question's relation), until the walk
    reaches `y` (then x is the greater) or the bottom of the chain (then it is not); then the verdict. Every step
    needs the question and the previous step only: the first finds the premise naming `x`'s smaller neighbour,
    each later one the premise going on from the name the previous step reached, the verdict whether that name is
    `y` or one with nothing below it. A yes takes `hops` steps, a no fewer."""
    below = chain[chain.index(x) + 1:]
    lines, reached = [], x
    for name in below:
        lines.append(f"{reached} > {name}.")
        reached = name
        if name == y:
            break
    verdict = f"So {x} is {more} than {y}." if y in below else f"So {x} is not {more} than {y}."
    return " ".join(lines) + " " + verdict


def premise_pairs(example: dict) -> list[tuple[str, str]]:
    """An example's premises as (greater, smaller) pairs in its relation, however each is stated (either way round,
    in words or as symbols)."""
    import re

    more = example["relation"]
    pairs = []
    for premise in example["premises"]:
        a, word, symbol, b = re.fullmatch(r"(\w+) (?:is (\w+) than|([<>])) (\w+)\.", premise).groups()
        pairs.append((a, b) if word == more or symbol == ">" else (b, a))
    return pairs


def shortcut_first_step(example: dict) -> str:
    """The walk's first step as a model can write it without looking up the premise of the question's first name
    x: for a yes, from x to the name right above the question's second name y (the premise into y); for a no, from
    x to the bottom of x's chain (a name below another and above none). At 2 hops this is always the right step
    (a yes is x > w > y; a no's x is one link above the bottom), so 2-hop questions do not show whether a model
    looks x up; from 3 hops on it is right for some questions only, and `eval operators` reports the first step
    apart on the others."""
    import re

    x, y = re.fullmatch(r"Is (\w+) \w+ than (\w+)\?", example["question"]).groups()
    pairs = premise_pairs(example)
    if example["answer"] == "yes":
        reached = next(a for a, b in pairs if b == y)
    else:
        below, reached = dict(pairs), x
        while reached in below:
            reached = below[reached]
    return f"{x} > {reached}."


def as_words(text: str, steps: str) -> str:
    """An operator question or step as the text tokenizer is given it, in a data set of scratchpad form `steps`: in
    the walk form with a leading space, so that a name at the start of the prompt or of a step is the token it is
    everywhere else (the tokenizer writes a word at the very start of a text as another token, "Rosa" against
    "_Rosa", which a model must then learn to match with the first, name by name, before any lookup can work); the
    interval form keeps the encoding its models, the demo's teacher among them, were trained with."""
    return " " + text if steps == "walk" else text


def operators(
    *, out: Path, hops: str = "2-6", scratchpad: Scratchpad = "none", n: int = 1000, seed: int = 0,
    phrasing: Phrasing = "both", steps: Steps = "interval", premises: int = 0, min_premises: int = 0,
    premise_form: PremiseForm = "words", drills: bool = False, exclude: list[Path] = (), overwrite: bool = False,
    progress: bool = True,
) -> dict:
    """Write `n` examples per hop count to `out/hops_{h}.jsonl` plus `out/meta/info.json`; returns the info.
    `steps` and `premises`: the scratchpad's form and the premises of every question (0: the chain's own), as in
    `make_example`; with `min_premises`, the number is drawn per question from min_premises (or the chain's own,
    if more) to `premises`; `premise_form`: premises as sentences (words) or as "A > B." (symbols).

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
    if phrasing not in ("both", "greater-first"):
        raise UnifiedError(f"--phrasing: expected both or greater-first, got {phrasing!r}")
    if steps not in ("interval", "walk"):
        raise UnifiedError(f"--steps: expected interval or walk, got {steps!r}")
    if premise_form not in ("words", "symbols"):
        raise UnifiedError(f"--premise-form: expected words or symbols, got {premise_form!r}")
    if drills and (steps != "walk" or scratchpad != "inductive"):
        raise UnifiedError("--drills: drills are groups of the walk's inductive scratchpad (--steps walk "
                           f"--scratchpad inductive), got --steps {steps} --scratchpad {scratchpad}")
    hop_counts = parse_hops(hops)
    if premises and not 2 * max(hop_counts) <= premises <= len(NAMES) - 2:
        raise UnifiedError(f"--premises: at least the {2 * max(hop_counts)} premises of a {max(hop_counts)}-hop "
                           f"question, at most {len(NAMES) - 2} (there are names for no more), or 0; got {premises}")
    if min_premises and not (premises and 1 <= min_premises <= premises):
        raise UnifiedError(f"--min-premises: with --premises N, from 1 to N (each question then has a number of "
                           f"premises drawn from it to N); got {min_premises} with --premises {premises}")
    out = Path(out)
    excluded = _prompts(exclude)
    options = {"phrasing": phrasing, "steps": steps, "premises": premises, "min_premises": min_premises,
               "premise_form": premise_form, "drills": drills}
    if check_dir(out, "operators") == "same":
        existing = json.loads((out / "meta" / "info.json").read_text())
        wanted = {"format_version": FORMAT_VERSION, "hops": hop_counts, "examples_per_hop": n,
                  "scratchpad": scratchpad, "seed": seed, **options, "excluding": sorted(str(p) for p in exclude)}
        if all(existing.get(k, OPTION_DEFAULTS.get(k)) == v for k, v in wanted.items()):
            print(f"{out}: already holds these {existing['examples']} examples, kept", flush=True)
            return existing
        if existing.get("format_version", 1) != FORMAT_VERSION and not overwrite:
            raise UnifiedError(f"--out {out}: holds an operator data set of format version "
                               f"{existing.get('format_version', 1)} (questions about the chain's two ends); pass "
                               "--overwrite to make it again in this version's format, then fit the tokenizers and "
                               "tokenize the shards that read it again (make demo into a new DEMO_DIR does all)")
    with staged_dir(out, "operators", overwrite=overwrite) as staging:
        info = _write(staging, hop_counts, scratchpad, n, seed, progress, excluded, options)
        info["excluding"] = sorted(str(p) for p in exclude)
        (staging / "meta" / "info.json").write_text(json.dumps(info, indent=2) + "\n")
    print(f"{out}: {info['examples']} examples, hops {hops}, scratchpad {scratchpad}", flush=True)
    return info


def read_info(directory: Path, what: str = "") -> dict:
    """The meta/info.json of the operator data set at `directory`, an option it does not record read as its default
    (`OPTION_DEFAULTS`: it was written before the option existed); a clear error when it is none, or one an earlier
    version of this command wrote (its questions asked about the chain's ends). `what` prefixes the error (an
    option's name)."""
    path = Path(directory) / "meta" / "info.json"
    if not path.is_file():
        raise UnifiedError(f"{what}{directory}: not an operator data set (no meta/info.json); make one with "
                           "`unified data operators`")
    try:
        info = json.loads(path.read_text())
    except ValueError as e:
        raise UnifiedError(f"{path}: not JSON ({e})") from None
    if info.get("format") != FORMAT:
        raise UnifiedError(f"{path}: format {info.get('format')!r}, expected {FORMAT!r}")
    if info.get("format_version", 1) != FORMAT_VERSION:
        raise UnifiedError(f"{what}{directory}: an operator data set of format version {info.get('format_version', 1)}"
                           f" (questions about the chain's two ends), this version reads {FORMAT_VERSION}; make it "
                           "again with `unified data operators ... --overwrite`")
    return OPTION_DEFAULTS | info


def _prompts(data_sets: list[Path]) -> set[str]:
    """Every prompt of the operator data sets `data_sets` (all their hop files)."""
    prompts: set[str] = set()
    for directory in data_sets:
        directory = Path(directory)
        read_info(directory, "--exclude ")
        for path in sorted(directory.glob("hops_*.jsonl")):
            for line_number, line in enumerate(path.read_text().splitlines(), 1):
                try:
                    prompts.add(json.loads(line)["prompt"])
                except (ValueError, KeyError) as e:
                    raise UnifiedError(f"{path}:{line_number}: not an operator example ({e})") from None
    return prompts


def _write(out: Path, hop_counts: list[int], scratchpad: str, n: int, seed: int, progress: bool,
           excluded: set[str] = frozenset(), options: dict | None = None) -> dict:
    """`n` examples per hop count, each drawn again while `excluded` holds its prompt; `options` are
    `make_example`'s drawing options (`OPTION_DEFAULTS` where left out), recorded in the returned info."""
    options = OPTION_DEFAULTS | (options or {})
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
                example = make_example(h, scratchpad, rng, i, answer=str(balanced[i]), **options)
                for _ in range(1000):
                    if example["prompt"] not in excluded:
                        break
                    redrawn[h] += 1
                    example = make_example(h, scratchpad, rng, i, answer=str(balanced[i]), **options)
                else:
                    raise UnifiedError(f"--exclude: no {h}-hop question left that the excluded sets do not hold")
                counts[example["answer"]] += 1
                f.write(json.dumps(example) + "\n")
        answers[h] = counts
    info = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "hops": hop_counts,
        "examples_per_hop": n,
        "examples": n * len(hop_counts),
        "scratchpad": scratchpad,
        **options,
        "seed": seed,
        "files": {str(h): f"hops_{h}.jsonl" for h in hop_counts},
        "yes_fraction": {str(h): answers[h]["yes"] / n for h in hop_counts},
        "redrawn_as_excluded": {str(h): redrawn[h] for h in hop_counts},
    }
    (out / "meta" / "info.json").write_text(json.dumps(info, indent=2) + "\n")
    return info
