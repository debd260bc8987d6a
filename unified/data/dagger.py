"""`unified data dagger`: drive with a learned policy, label every state it visits with the expert, and append
those episodes to the store it learned from (DAgger: Ross, Gordon and Bagnell, 2011).

A policy trained only on the expert's states drifts into states the expert never visits (it brakes at the merge
and never speeds up again); the expert is a pure function of the simulator state, so it can say what it would do
there. With probability `beta` the expert's action is executed instead of the learner's (the DAgger mixture).

Episodes of round k have indices from k * 1,000,000 on, so rounds never collide with each other or with the
expert's episodes, the scenario of each comes from the suite's round robin, and its seed from the data half of
the seed space. Each episode's `action` column holds the expert's label for the state (what training reads); how
the learner's drive ended is its summary, and the round, the model and the mixture are its `source`. Writes are
the store's own (complete files only, resumable: a rerun of the same round fills in what is missing).
"""

from __future__ import annotations

import signal
import time
from pathlib import Path
from typing import Literal

import numpy as np
from tqdm import tqdm

from unified.data.store import EpisodeStore
from unified.errors import UnifiedError
from unified.eval.model_driver import execution
from unified.eval.modes import MODES, Mode
from unified.sim.drivers import ExpertDriver, Intent
from unified.sim.env import make_env
from unified.sim.rollout import run_episode
from unified.sim.seeds import data_seed
from unified.sim.suite import load_suite
from unified.tokenizers.action import READOUT
from unified.workers import pool_results

ROUND_STRIDE = 1_000_000  # episode indices of round k: k * ROUND_STRIDE + i


def round_index(round_: int, i: int) -> int:
    return round_ * ROUND_STRIDE + i


class LabelledDriver:
    """The learner drives (or, with probability `beta`, the expert); the expert labels every step."""

    name = "dagger"

    def __init__(self, learner, beta: float, seed: int):
        self.learner, self.beta, self.expert = learner, beta, ExpertDriver()
        self.rng = np.random.default_rng([seed, 3])

    def reset(self, env, scenario, seed: int) -> None:
        self.expert.reset(env, scenario, seed)
        self.learner.reset(env, scenario, seed)
        self.rng = np.random.default_rng([seed, 3])

    def act(self, env) -> Intent:
        label = self.expert.act(env)
        learned = self.learner.action(env)  # the learner plans on its own schedule whoever drives this step
        label.executed = label.action if self.rng.random() < self.beta else learned.astype(np.float32)
        return label


class _Worker:
    store: EpisodeStore
    policy = None
    envs: dict
    settings: dict

    @classmethod
    def setup(cls, root: str, model: str, settings: dict) -> None:
        import torch

        from unified.policy import Policy

        signal.signal(signal.SIGINT, signal.SIG_IGN)
        torch.set_num_threads(1)
        cls.store, cls.envs, cls.settings = EpisodeStore(root), {}, settings
        cls.policy = Policy.from_pretrained(model)

    @classmethod
    def run(cls, index: int) -> tuple[int, int, bool]:
        from unified.eval.model_driver import ModelDriver

        s, suite = cls.settings, cls.store.suite
        scenario = suite.scenario_for_episode(index)
        if scenario.name not in cls.envs:
            cls.envs[scenario.name] = make_env(suite, scenario, render=True)
        seed = data_seed(cls.store.info["seed"], index)
        learner = ModelDriver(cls.policy, s["mode"], s["replan_every"], s["ensemble"], s["readout"])
        episode = run_episode(suite, scenario, LabelledDriver(learner, s["beta"], seed), seed, index=index,
                              env=cls.envs[scenario.name])
        episode.source = {"round": s["round"], "model": s["model"], "fingerprint": s["fingerprint"],
                          "beta": s["beta"], "mode": s["mode"], "replan_every": s["replan_every"],
                          "ensemble": s["ensemble"], "readout": s["readout"],
                          "actions": "expert labels; the learner drove",
                          "executed": np.round(episode.executed, 6).tolist()}
        cls.store.write_episode(episode)
        return index, episode.summary.steps, episode.summary.success


def dagger(
    *, model: Path, out: Path, episodes: int, suite: Path | None = None, round: int = 1, beta: float = 0.0,
    mode: Mode = "direct", replan_every: int | None = None, ensemble: float | None = None,
    no_ensemble: bool = False, readout: Literal["mode", "mean", "median"] = READOUT, workers: int = 1,
    progress: bool = True,
) -> dict:
    """Drive `episodes` episodes of the store's suite with `model` (an export), label them with the expert and
    append them to the store `out` as DAgger round `round`. `suite`, if given, must be the store's. The learner
    drives as `eval closed-loop` drives it (`mode`, `replan_every`, `ensemble` or `no_ensemble`, `readout`, with the
    same defaults by mode).
    Returns the round's figures: how the learner drove (success, collisions) and how many steps were labelled."""
    from unified.model_dir import weights_fingerprint

    if episodes < 1 or workers < 1 or round < 1:
        raise UnifiedError(f"--episodes, --workers and --round must be at least 1, got {episodes}, {workers}, {round}")
    if not 0.0 <= beta <= 1.0:
        raise UnifiedError(f"--beta is a probability (0 to 1), got {beta}")
    if mode not in MODES:
        raise UnifiedError(f"--mode: {mode!r} is not one of {', '.join(MODES)}")
    from unified.outputs import check_dir

    if check_dir(out, "episodes", [model]) == "new":
        raise UnifiedError(f"--out {out}: no episode store there; DAgger appends to the store the policy learned from "
                           "(make one with `unified data generate`)")
    store = EpisodeStore(out)
    if suite is not None and load_suite(suite).hash != store.info["suite_hash"]:
        raise UnifiedError(f"{out} holds episodes of suite {store.info['suite']['name']!r} (hash "
                           f"{store.info['suite_hash']}), not of {suite}; DAgger labels states of the suite the "
                           "policy learned from")
    if not (Path(model) / "unified.json").is_file():
        raise UnifiedError(f"--model {model}: not an exported model directory (no unified.json)")
    fingerprint = weights_fingerprint(model)
    wanted = [round_index(round, i) for i in range(episodes)]
    lock = store.lock()
    try:
        store.remove_partial_files()
        done = set(store.indices())
        for index in sorted(done & set(wanted))[:1]:
            made_by = (store.episode_meta(index).get("source") or {}).get("fingerprint")
            if made_by != fingerprint:
                raise UnifiedError(f"{out}: DAgger round {round} was driven by another model ({str(made_by)[:12]}); "
                                   "give this model another --round")
        todo = [i for i in wanted if i not in done]
        replan_every, ensemble = execution(mode, replan_every, ensemble, no_ensemble)
        settings = {"round": round, "model": str(model), "fingerprint": fingerprint, "beta": beta, "mode": mode,
                    "replan_every": replan_every, "ensemble": ensemble, "readout": readout}
        print(f"{out}: DAgger round {round}: {len(wanted) - len(todo)} episode(s) already labelled, {len(todo)} to "
              f"drive with {model} ({mode}, beta {beta})", flush=True)
        start = time.perf_counter()
        try:
            results = _run(str(store.root), str(model), settings, todo, workers, progress)
        finally:
            store.remove_partial_files()
            store.refresh_info()
    finally:
        lock.close()
    metas = [store.episode_meta(i) for i in wanted if i in set(store.indices())]
    success = float(np.mean([m["summary"]["success"] for m in metas])) if metas else 0.0
    collision = float(np.mean([m["summary"]["collision"] for m in metas])) if metas else 0.0
    report = {"round": round, "model": str(model), "episodes": len(metas), "labelled_steps":
              int(sum(m["summary"]["steps"] for m in metas)), "learner_success_rate": success,
              "learner_collision_rate": collision, "seconds": time.perf_counter() - start,
              "by_scenario": {name: float(np.mean([m["summary"]["success"] for m in metas if m["scenario"] == name]))
                              for name in sorted({m["scenario"] for m in metas})}}
    print(f"DAgger round {round}: the learner succeeded in {success:.2f} of {len(metas)} episodes (collisions "
          f"{collision:.2f}; {report['by_scenario']}); {report['labelled_steps']} states labelled by the expert",
          flush=True)
    return report | {"new": len(results)}


def _run(root: str, model: str, settings: dict, todo: list[int], workers: int, progress: bool) -> list:
    bar = tqdm(total=len(todo), desc=f"DAgger round {settings['round']}", unit="ep", disable=not progress or not todo,
               dynamic_ncols=True)
    results = []
    try:
        if workers == 1:
            _Worker.setup(root, model, settings)
            signal.signal(signal.SIGINT, signal.default_int_handler)
            for index in todo:
                results.append(_Worker.run(index))
                bar.update(1)
        else:
            with pool_results(workers, _Worker.setup, (root, model, settings), _Worker.run, todo) as finished:
                for result in finished:
                    results.append(result)
                    bar.update(1)
    finally:
        bar.close()
    return results
