"""`unified data generate`: drive a suite with the expert in parallel workers and store the episodes.

Resumable: episode i always has the same scenario and seed, finished episodes are skipped, and a killed
run leaves only complete episodes behind.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path

from tqdm import tqdm

from unified.data.split import DEFAULT_EVERY
from unified.data.store import EpisodeStore
from unified.errors import UnifiedError
from unified.sim.drivers import ExpertDriver
from unified.sim.env import make_env
from unified.sim.rollout import run_episode
from unified.sim.seeds import data_seed
from unified.sim.suite import Suite, load_suite
from unified.workers import pool_results


class _Worker:
    """Per-process state: one env per scenario, reused across episodes."""

    suite: Suite
    store: EpisodeStore
    seed: int
    envs: dict

    @classmethod
    def setup(cls, root: str, seed: int) -> None:
        # Ctrl-C reaches the whole process group; the parent alone handles it and stops the workers.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        cls.store = EpisodeStore(root)
        cls.suite = cls.store.suite
        cls.seed = seed
        cls.envs = {}

    @classmethod
    def run(cls, index: int) -> tuple[int, int]:
        scenario = cls.suite.scenario_for_episode(index)
        if scenario.name not in cls.envs:
            cls.envs[scenario.name] = make_env(cls.suite, scenario, render=True)
        episode = run_episode(
            cls.suite, scenario, ExpertDriver(), data_seed(cls.seed, index), index=index,
            env=cls.envs[scenario.name], jitter=True,
        )
        cls.store.write_episode(episode)
        return index, episode.summary.steps


def generate(
    *, suite: Path, episodes: int, out: Path, workers: int = 1, seed: int = 0, held_out_every: int = DEFAULT_EVERY,
    progress: bool = True,
) -> dict:
    """Make episodes 0..episodes-1 of `suite` in `out`, skipping those already there. Returns the store's info.

    One episode in `held_out_every` of each scenario is held out from everything that trains (1: all of them,
    for a store used only to evaluate)."""
    if episodes < 1:
        raise UnifiedError(f"--episodes must be at least 1, got {episodes}")
    if workers < 1:
        raise UnifiedError(f"--workers must be at least 1, got {workers}")
    if seed < 0:
        raise UnifiedError(f"--seed must be 0 or more, got {seed}")
    loaded = load_suite(suite)
    store = EpisodeStore.create(out, loaded, seed, held_out_every)
    lock = store.lock()
    try:
        removed = store.remove_partial_files()
        done = set(store.indices())
        todo = [i for i in range(episodes) if i not in done]
        note = f", removed {removed} partial file(s) of an interrupted run" if removed else ""
        print(f"{out}: {len(done)} episode(s) already stored, {len(todo)} to generate{note}", flush=True)
        start, steps = time.perf_counter(), 0
        try:
            steps = _run(store, seed, todo, workers, progress)
        finally:
            # Also on Ctrl-C: the info must describe exactly the complete episodes on disk.
            store.remove_partial_files()
            info = store.refresh_info()
        elapsed = time.perf_counter() - start
        if todo:
            print(
                f"generated {len(todo)} episodes ({steps} steps) in {elapsed:.1f} s with {workers} worker(s): "
                f"{len(todo) / elapsed:.2f} episodes/s, {steps / elapsed:.1f} steps/s",
                flush=True,
            )
        split = info["split"]
        print(f"{out}: {info['episodes']} episodes ({split['train_episodes']} to train on, "
              f"{split['held_out_episodes']} held out), {info['steps']} steps", flush=True)
        return info
    finally:
        lock.close()


def _run(store: EpisodeStore, seed: int, todo: list[int], workers: int, progress: bool) -> int:
    steps = 0
    bar = tqdm(total=len(todo), unit="ep", disable=not progress or not todo, dynamic_ncols=True)
    start = time.perf_counter()

    def advance(n: int) -> None:
        nonlocal steps
        steps += n
        bar.update(1)
        bar.set_postfix_str(f"{steps / (time.perf_counter() - start):.0f} steps/s")

    try:
        if workers == 1:
            _Worker.setup(str(store.root), seed)
            signal.signal(signal.SIGINT, signal.default_int_handler)
            for index in todo:
                advance(_Worker.run(index)[1])
        else:
            with pool_results(workers, _Worker.setup, (str(store.root), seed), _Worker.run, todo) as finished:
                for _, n in finished:
                    advance(n)
    finally:
        bar.close()
    return steps
