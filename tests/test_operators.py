"""The operator data set: every stored answer follows from its premises, checked by an independent solver."""

import json
import re

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from unified.data.operators import RELATIONS, make_example, operators, parse_hops
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
@given(hops=st.integers(1, 12), seed=st.integers(0, 2**32 - 1), pad=st.sampled_from(["none", "full", "inductive"]))
def test_answer_follows_from_premises(hops, seed, pad):
    example = make_example(hops, pad, np.random.default_rng(seed))
    answer, distance = solve(example["premises"], example["question"])
    assert example["answer"] == answer
    assert distance == hops == len(example["premises"])
    assert example["target"].endswith(answer)
    if pad != "none":
        assert example["scratchpad"].count(".") >= hops  # one step per hop


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


@pytest.mark.parametrize("bad", ["", "a-b", "0-3", "3-1", "2,x"])
def test_bad_hops(bad):
    with pytest.raises(UnifiedError, match="--hops"):
        parse_hops(bad)
