"""The operator data set: every stored answer follows from its premises, checked by an independent solver."""

import json
import re

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from unified.data.operators import RELATIONS, make_example, operators, parse_hops, shortcut_first_step
from unified.errors import UnifiedError

OPPOSITE = {less: more for more, less in RELATIONS}


def solve(premises: list[str], question: str) -> tuple[str, int]:
    """Answer by graph search over the premises alone; returns (answer, hops on the deciding path)."""
    above: dict[str, set[str]] = {}
    relation = re.match(r"Is (\w+) (\w+) than (\w+)\?", question).group(2)
    for premise in premises:
        a, rel, b = re.match(r"(\w+) is (\w+) than (\w+)\.", premise).groups()
        if rel == relation:
            above.setdefault(a, set()).add(b)
        else:
            assert OPPOSITE[rel] == relation, premise
            above.setdefault(b, set()).add(a)

    def distance(x: str, y: str) -> int | None:
        frontier, seen, d = {x}, {x}, 0
        while frontier:
            d += 1
            frontier = {n for f in frontier for n in above.get(f, ())} - seen
            if y in frontier:
                return d
            seen |= frontier
        return None

    x, _, y = re.match(r"Is (\w+) (\w+) than (\w+)\?", question).groups()
    forward, backward = distance(x, y), distance(y, x)
    assert (forward is None) != (backward is None), "the premises must decide the question"
    return ("yes", forward) if forward is not None else ("no", backward)


@settings(max_examples=200, deadline=None)
@given(hops=st.integers(2, 12), seed=st.integers(0, 2**32 - 1), pad=st.sampled_from(["none", "full", "inductive"]),
       phrasing=st.sampled_from(["both", "greater-first"]), steps=st.sampled_from(["interval", "walk"]),
       padded=st.booleans())
def test_answer_follows_from_premises(hops, seed, pad, phrasing, steps, padded):
    premises = 24 if padded else 0
    example = make_example(hops, pad, np.random.default_rng(seed), phrasing=phrasing, steps=steps, premises=premises)
    words = {re.match(r"\w+ is (\w+) than", p).group(1) for p in example["premises"]}
    assert words == {example["relation"]} if phrasing == "greater-first" else words <= set(RELATIONS[
        [more for more, _ in RELATIONS].index(example["relation"])])
    answer, distance = solve(example["premises"], example["question"])
    assert example["answer"] == answer
    assert distance == hops and len(example["premises"]) == (24 if padded else 2 * hops)
    if padded:  # the same question, chain and scratchpad as without the second chain; every question as long
        plain = make_example(hops, pad, np.random.default_rng(seed), phrasing=phrasing, steps=steps)
        assert {k: plain[k] for k in ("question", "scratchpad", "answer")} == {
            k: example[k] for k in ("question", "scratchpad", "answer")}
        assert set(plain["premises"]) <= set(example["premises"]) and len(example["prompt"].split()) == 5 * 24 + 5
    # Both names are inside the chain: each has a greater and a smaller neighbour, so no premise alone says which
    # end of the chain a name is near.
    x, relation, y = re.match(r"Is (\w+) (\w+) than (\w+)\?", example["question"]).groups()
    pairs = _relations(example["premises"], relation)
    for name in (x, y):
        assert sum(a == name for a, b in pairs) == 1 and sum(b == name for a, b in pairs) == 1
    assert example["target"].endswith(answer)
    if pad != "none":  # a step per hop (the walk: per link walked, all of them for a yes), and the verdict
        sentences = example["scratchpad"].count(".")
        assert sentences == hops + 1 if steps == "interval" or answer == "yes" else 2 <= sentences <= hops


@settings(max_examples=100, deadline=None)
@given(hops=st.integers(2, 12), seed=st.integers(0, 2**32 - 1), phrasing=st.sampled_from(["both", "greater-first"]),
       steps=st.sampled_from(["interval", "walk"]), padded=st.booleans())
def test_premises_as_symbols_state_the_same_premises(hops, seed, phrasing, steps, padded):
    """--premise-form symbols: the same example, each premise "A is taller than B." written "A > B." and "B is
    shorter than A." written "B < A."; the question, scratchpad and answer unchanged."""
    options = dict(phrasing=phrasing, steps=steps, premises=24 if padded else 0)
    words = make_example(hops, "full", np.random.default_rng(seed), **options)
    symbols = make_example(hops, "full", np.random.default_rng(seed), premise_form="symbols", **options)
    more = words["relation"]
    as_symbols = [re.sub(r"(\w+) is (\w+) than (\w+)\.", lambda m: f"{m[1]} {'>' if m[2] == more else '<'} {m[3]}.", p)
                  for p in words["premises"]]
    assert symbols["premises"] == as_symbols
    assert all(re.fullmatch(r"\w+ [<>] \w+\.", p) for p in symbols["premises"])
    assert symbols["prompt"] == " ".join(as_symbols) + " " + words["question"]
    assert {k: symbols[k] for k in ("question", "scratchpad", "answer", "relation")} == {
        k: words[k] for k in ("question", "scratchpad", "answer", "relation")}
    if phrasing == "greater-first":
        assert all(" > " in p for p in symbols["premises"])


def test_bad_premise_form(tmp_path):
    with pytest.raises(UnifiedError, match="--premise-form: expected words or symbols"):
        operators(out=tmp_path, hops="2-3", premise_form="arrows", progress=False)
    assert not any(tmp_path.iterdir())


def test_the_premise_form_is_recorded_and_a_set_of_the_other_form_is_not_taken_for_it(tmp_path):
    info = operators(out=tmp_path, hops="2-3", n=10, steps="walk", premise_form="symbols", progress=False)
    assert json.loads((tmp_path / "meta/info.json").read_text())["premise_form"] == info["premise_form"] == "symbols"
    assert operators(out=tmp_path, hops="2-3", n=10, steps="walk", premise_form="symbols", progress=False) == info
    with pytest.raises(UnifiedError, match="--overwrite"):
        operators(out=tmp_path, hops="2-3", n=10, steps="walk", progress=False)
    words = operators(out=tmp_path, hops="2-3", n=10, steps="walk", overwrite=True, progress=False)
    assert words["premise_form"] == "words" and " is " in (tmp_path / "hops_2.jsonl").read_text()


def test_files_split_by_hops_balanced_and_shuffled(tmp_path):
    info = operators(out=tmp_path, hops="2-4", scratchpad="full", n=50, progress=False)
    assert info["hops"] == [2, 3, 4] and info["examples"] == 150
    for h in (2, 3, 4):
        rows = [json.loads(line) for line in (tmp_path / f"hops_{h}.jsonl").read_text().splitlines()]
        assert len(rows) == 50 and {r["hops"] for r in rows} == {h}
        assert sum(r["answer"] == "yes" for r in rows) == 25
        for r in rows:
            assert solve(r["premises"], r["question"])[0] == r["answer"]
        # Premises are not in chain order: the first premise does not always mention the question's subject.
        assert len({r["premises"][0].split()[0] == r["question"].split()[1] for r in rows}) == 2
    assert json.loads((tmp_path / "meta" / "info.json").read_text())["yes_fraction"] == {"2": 0.5, "3": 0.5, "4": 0.5}


def test_same_seed_same_data(tmp_path):
    operators(out=tmp_path / "a", hops="3", n=20, progress=False)
    operators(out=tmp_path / "b", hops="3", n=20, progress=False)
    assert (tmp_path / "a/hops_3.jsonl").read_text() == (tmp_path / "b/hops_3.jsonl").read_text()


@pytest.mark.parametrize("bad", ["", "a-b", "0-3", "1-3", "3-1", "2,x", "2-30"])
def test_bad_hops(bad):
    with pytest.raises(UnifiedError, match="--hops"):
        parse_hops(bad)


@pytest.mark.parametrize("premises, least", [(-1, 0), (10, 0), (59, 0), (24, 25), (0, 4)])
def test_bad_premises(tmp_path, premises, least):
    with pytest.raises(UnifiedError, match="--premises" if least == 0 else "--min-premises"):
        operators(out=tmp_path, hops="2-6", premises=premises, min_premises=least, progress=False)
    assert not any(tmp_path.iterdir())


def test_premises_drawn_from_a_range(tmp_path):
    """--min-premises M --premises N: each question has from max(M, its chain's own) to N premises, the counts
    spread over the range, every answer still following from the premises."""
    info = operators(out=tmp_path / "mixed", hops="2-4", n=200, premises=24, min_premises=6, steps="walk",
                     scratchpad="full", progress=False)
    assert (info["premises"], info["min_premises"]) == (24, 6)
    plain = operators(out=tmp_path / "plain", hops="2-4", n=200, steps="walk", scratchpad="full", progress=False)
    assert plain["min_premises"] == 0
    for h in (2, 3, 4):
        mixed_rows = [json.loads(line) for line in (tmp_path / "mixed" / f"hops_{h}.jsonl").read_text().splitlines()]
        counts = {len(r["premises"]) for r in mixed_rows}
        assert min(counts) >= max(6, 2 * h) and max(counts) <= 24 and len(counts) >= 10
        for r in mixed_rows:
            assert solve(r["premises"], r["question"])[0] == r["answer"]


def _relations(premises: list[str], relation: str) -> set[tuple[str, str]]:
    """(greater, smaller) pairs the premises state, in terms of `relation`."""
    pairs = set()
    for premise in premises:
        a, rel, b = re.match(r"(\w+) is (\w+) than (\w+)\.", premise).groups()
        pairs.add((a, b) if rel == relation else (b, a))
    return pairs


def _next(pairs: set[tuple[str, str]], name: str, below: bool = True) -> str | None:
    """The name right below (or above) `name` in the (greater, smaller) `pairs`; None at the end of its chain."""
    found = [b if below else a for a, b in pairs if (a if below else b) == name]
    assert len(found) <= 1
    return found[0] if found else None


@settings(max_examples=200, deadline=None)
@given(hops=st.integers(2, 12), seed=st.integers(0, 2**32 - 1))
def test_every_inductive_step_follows_from_the_previous_one_and_the_premises_at_its_ends(hops, seed):
    """The inductive scratchpad is local: step 1 from the two premises naming the question's first name, every
    later step from the previous step's two ends and the premise going on from each (an end with none stays), the
    verdict from the last step and the question. No step needs the whole chain, and the question is decided at
    step `hops` exactly."""
    example = make_example(hops, "inductive", np.random.default_rng(seed))
    x, relation, y = re.match(r"Is (\w+) (\w+) than (\w+)\?", example["question"]).groups()
    pairs = _relations(example["premises"], relation)
    next_below = lambda name: _next(pairs, name) or name  # noqa: E731 (an end with none stays)
    next_above = lambda name: _next(pairs, name, below=False) or name  # noqa: E731

    *steps, verdict = example["scratchpad"].split(". ")
    assert len(steps) == hops
    below = above = x
    for k, step in enumerate(steps, 1):
        low, middle, high = re.fullmatch(r"(\w+) < (\w+) < (\w+)\.?", step).groups()
        assert middle == x
        below, above = next_below(below), next_above(above)
        assert (low, high) == (below, above)
        assert (y in (low, high)) == (k == hops)  # the walk stops the step it reaches y
    assert verdict == (f"So {x} is {relation} than {y}." if below == y else f"So {x} is not {relation} than {y}.")
    assert example["answer"] == ("yes" if below == y else "no")
    assert make_example(hops, "full", np.random.default_rng(seed))["scratchpad"] == example["scratchpad"]


@settings(max_examples=200, deadline=None)
@given(hops=st.integers(2, 12), seed=st.integers(0, 2**32 - 1), phrasing=st.sampled_from(["both", "greater-first"]))
def test_every_walk_step_follows_from_the_previous_one_and_one_premise(hops, seed, phrasing):
    """The inductive scratchpad is local: step 1 from the premise naming the question's first name as the greater,
    every later step from the name the previous step reached and the premise going on from it, the verdict from the
    last step and the question (the walk reached the question's second name, or a name with nothing below it). No
    step needs the whole chain; a yes takes exactly `hops` steps, a no fewer (the walk goes down from the smaller
    name and meets the bottom of the chain)."""
    example = make_example(hops, "inductive", np.random.default_rng(seed), phrasing=phrasing, steps="walk")
    x, relation, y = re.match(r"Is (\w+) (\w+) than (\w+)\?", example["question"]).groups()
    pairs = _relations(example["premises"], relation)
    next_below = lambda name: _next(pairs, name)  # noqa: E731

    *steps, verdict = example["scratchpad"].split(". ")
    reached = x
    for k, step in enumerate(steps, 1):
        first, name = re.fullmatch(r"(\w+) > (\w+)\.?", step).groups()
        assert first == reached and name == next_below(reached)
        reached = name
        assert (name == y) == (k == len(steps) and example["answer"] == "yes")
    if example["answer"] == "yes":
        assert len(steps) == hops and verdict == f"So {x} is {relation} than {y}."
    else:
        assert 1 <= len(steps) < hops and next_below(reached) is None
        assert verdict == f"So {x} is not {relation} than {y}."
    full = make_example(hops, "full", np.random.default_rng(seed), phrasing=phrasing, steps="walk")
    assert full["scratchpad"] == example["scratchpad"] and full["prompt"] == example["prompt"]


def test_an_operator_set_of_the_earlier_format_is_refused(tmp_path):
    operators(out=tmp_path / "old", hops="2", n=4, progress=False)
    info_path = tmp_path / "old/meta/info.json"
    info_path.write_text(json.dumps(json.loads(info_path.read_text()) | {"format_version": 1}))
    with pytest.raises(UnifiedError, match="format version 1 .*--overwrite"):
        operators(out=tmp_path / "test", hops="2", n=4, exclude=[tmp_path / "old"], progress=False)
    with pytest.raises(UnifiedError, match="--out .*format version 1 .*pass --overwrite to make it again"):
        operators(out=tmp_path / "old", hops="2", n=4, progress=False)
    assert operators(out=tmp_path / "old", hops="2", n=4, overwrite=True, progress=False)["format_version"] == 2


def test_a_test_set_excluding_the_training_set_shares_no_question(tmp_path):
    train = tmp_path / "train"
    operators(out=train, hops="2-3", n=300, seed=0, progress=False)
    # The same seed repeats the first question of each file: it is drawn again, and none is left in common.
    info = operators(out=tmp_path / "test", hops="2-3", n=300, seed=0, exclude=[train], progress=False)
    assert info["redrawn_as_excluded"]["2"] >= 1 and info["excluding"] == [str(train)]

    def prompts(d, h):
        return {json.loads(line)["prompt"] for line in (d / f"hops_{h}.jsonl").read_text().splitlines()}

    for h in (2, 3):
        assert not prompts(train, h) & prompts(tmp_path / "test", h)
        assert len(prompts(tmp_path / "test", h)) == 300
    with pytest.raises(UnifiedError, match="--exclude .*not an operator data set"):
        operators(out=tmp_path / "other", hops="2", n=5, exclude=[tmp_path / "missing"], progress=False)


@settings(max_examples=200, deadline=None)
@given(hops=st.integers(2, 12), seed=st.integers(0, 2**32 - 1), padded=st.booleans(),
       answer=st.sampled_from(["yes", "no"]))
def test_lookup_drills_are_walk_steps_the_walk_does_not_take(hops, seed, padded, answer):
    """Each drill is a walk step from a name the walk does not go on from: its context "a > b." and its step
    "b > c." are both premises (read the walk's way), the step goes on from the name the context reached, it is
    not one of the walk's own steps and never goes on from the question's second name (where the walk stops).
    Every premise with a premise above it is drilled or walked. The example is the one drawn without drills."""
    premises = 24 if padded else 0
    rng = lambda: np.random.default_rng(seed)  # noqa: E731
    example = make_example(hops, "inductive", rng(), answer=answer, steps="walk", phrasing="greater-first",
                           premises=premises, drills=True)
    plain = make_example(hops, "inductive", rng(), answer=answer, steps="walk", phrasing="greater-first",
                         premises=premises)
    assert {k: v for k, v in example.items() if k != "drills"} == plain
    x, relation, y = re.match(r"Is (\w+) (\w+) than (\w+)\?", example["question"]).groups()
    pairs = _relations(example["premises"], relation)
    stated = {f"{a} > {b}." for a, b in pairs}
    *walk, _ = example["scratchpad"].split(". ")
    walk = {step.rstrip(".") + "." for step in walk}
    for context, step in example["drills"]:
        (_, b), (first, _) = (re.fullmatch(r"(\w+) > (\w+)\.", s).groups() for s in (context, step))
        assert context in stated and step in stated and first == b
        assert step not in walk and b != y
    above = {b for _, b in pairs}
    expected = {f"{a} > {b}." for a, b in pairs if a in above and a != y} - walk
    assert {step for _, step in example["drills"]} == expected


def test_drills_need_the_walks_inductive_scratchpad(tmp_path):
    for scratchpad, steps in (("full", "walk"), ("inductive", "interval")):
        with pytest.raises(UnifiedError, match="--drills"):
            operators(out=tmp_path / "d", hops="2", n=2, scratchpad=scratchpad, steps=steps, drills=True,
                      progress=False)
    info = operators(out=tmp_path / "d", hops="2", n=2, scratchpad="inductive", steps="walk", drills=True,
                     progress=False)
    assert info["drills"] is True


@settings(max_examples=200, deadline=None)
@given(hops=st.integers(2, 12), seed=st.integers(0, 2**32 - 1), phrasing=st.sampled_from(["both", "greater-first"]),
       padded=st.booleans(), answer=st.sampled_from(["yes", "no"]))
def test_the_walks_shortcut_first_step(hops, seed, phrasing, padded, answer):
    """The first step a model can write without the premise of the question's first name x: the name right above
    the second name y (a yes), the bottom of x's chain (a no); the same whether the premises are words or symbols.
    At 2 hops it is the walk's first step for every question."""
    options = dict(answer=answer, phrasing=phrasing, steps="walk", premises=24 if padded else 0)
    example = make_example(hops, "inductive", np.random.default_rng(seed), **options)
    x, relation, y = re.match(r"Is (\w+) (\w+) than (\w+)\?", example["question"]).groups()
    pairs = _relations(example["premises"], relation)
    if answer == "yes":
        expected = _next(pairs, y, below=False)
    else:
        expected = x
        while _next(pairs, expected) is not None:
            expected = _next(pairs, expected)
    assert shortcut_first_step(example) == f"{x} > {expected}."
    symbols = make_example(hops, "inductive", np.random.default_rng(seed), premise_form="symbols", **options)
    assert shortcut_first_step(symbols) == shortcut_first_step(example)
    if hops == 2:
        assert shortcut_first_step(example) == example["scratchpad"].split(". ")[0] + "."


def test_from_three_hops_the_shortcut_is_the_first_step_of_some_questions_only():
    for hops in (3, 4):
        rng = np.random.default_rng(0)
        examples = [make_example(hops, "inductive", rng, steps="walk") for _ in range(200)]
        same = sum(shortcut_first_step(e) == e["scratchpad"].split(". ")[0] + "." for e in examples)
        assert 0 < same < 100, (hops, same)
