"""Shared fixtures: a tiny suite (32x32 frames, few vehicles, a handful of steps) that runs in seconds."""

from pathlib import Path

import pytest
from hypothesis import settings

# The CI machine is shared and noisy: property tests check behaviour, never time.
settings.register_profile("unified", deadline=None)
settings.load_profile("unified")

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
