"""Shared fixtures: a tiny suite (32x32 frames, few vehicles, a handful of steps) that runs in seconds."""

import os
from pathlib import Path

import pytest
import torch
from hypothesis import settings

# The CI machine is shared and noisy: property tests check behaviour, never time.
settings.register_profile("unified", deadline=None)
settings.load_profile("unified")

# `make test` runs two pytest workers on 2 cores: one thread each for their in-process work, so that the two do not
# fight over the cores (the processes they start, DeepSpeed ranks and simulator workers, set their own).
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)

TINY_SUITE = """\
name: tiny
image_size: [32, 32]
policy_frequency: 5
scenarios:
  highway:
    env: highway-v0
    config: {lanes_count: 2, vehicles_count: 5, duration: 20}
    max_steps: 6
  merge:
    env: merge-v0
    max_steps: 6
"""


@pytest.fixture
def tiny_suite(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY_SUITE)
    return path


@pytest.fixture(scope="session")
def tiny_store(tmp_path_factory) -> Path:
    """A store of 4 tiny episodes, made once for the tests that only read."""
    from unified.data.generate import generate

    root = tmp_path_factory.mktemp("store")
    suite = root / "tiny.yaml"
    suite.write_text(TINY_SUITE)
    generate(suite=suite, episodes=4, out=root / "data", workers=1, progress=False)
    return root / "data"


@pytest.fixture(scope="session")
def split_store(tmp_path_factory) -> Path:
    """The tiny suite, 5 episodes of each of its 2 scenarios, every 5th of each held out: episodes 8 (highway)
    and 9 (merge)."""
    from unified.data.generate import generate

    root = tmp_path_factory.mktemp("split")
    (root / "tiny.yaml").write_text(TINY_SUITE)
    generate(suite=root / "tiny.yaml", episodes=10, out=root / "data", held_out_every=5, progress=False)
    return root / "data"


MODEL_SUITE = """\
name: model-test
image_size: [32, 32]
scenarios:
  highway:
    env: highway-v0
    config: {lanes_count: 2, vehicles_count: 6, duration: 20}
    max_steps: 24
"""
MODEL_HORIZON = 4


@pytest.fixture(scope="session")
def model_data(tmp_path_factory) -> Path:
    """10 episodes of 24 steps at 32x32, tokenizers fitted on them, token shards (horizon 4) with operators."""
    from unified.tokenizers.fit import fit

    from unified.data.generate import generate
    from unified.data.operators import operators
    from unified.data.tokenize import tokenize

    root = tmp_path_factory.mktemp("model")
    (root / "suite.yaml").write_text(MODEL_SUITE)
    generate(suite=root / "suite.yaml", episodes=10, out=root / "store", progress=False)
    operators(out=root / "operators", hops="2-3", n=20, progress=False)
    fit(data=root / "store", out=root / "tok", operators=root / "operators", image_steps=200, image_batch=32,
        horizon=MODEL_HORIZON, text_vocab=400, fast_vocab=600, progress=False)
    tokenize(data=root / "store", tokenizer=root / "tok", out=root / "shards", horizon=MODEL_HORIZON,
             operators=root / "operators", operator_hops="2-3", progress=False)
    return root


def _overfit(model, shards, episodes, steps: int = 200):
    """Train `model` with a plain loop (AdamW, lr 3e-3) on the policy and world samples of `episodes` of `shards`,
    packed 8 rows of 256; returned in eval mode."""
    import torch

    from unified.packing import pack
    from unified.sequences import build

    samples = [build(shards.sample(task, int(r)), shards.layout, image_weight=1.0) for task in ("policy", "world")
               for r in shards.index(task) if int(shards.arrays["episode"][r]) in episodes]
    batches = [b.to_torch() for b in pack(samples, 256, 8, shards.layout)]
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    for step in range(steps):
        loss, _ = model(batches[step % len(batches)])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


@pytest.fixture
def overfit():
    """The plain training loop of the tests that check what a small trained model writes (`_overfit`)."""
    return _overfit
