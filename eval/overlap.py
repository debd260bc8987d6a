"""Evaluation episodes checked against training stores: an evaluation episode must share no (env, simulator
seed) with a training episode (by construction: `unified.sim.seeds` gives the two disjoint seed ranges), and should
not be a near-replay of one (the same vehicles at nearly the same places and speeds, which an env that barely
randomises its traffic can produce from different seeds)."""

from __future__ import annotations

from pathlib import Path

from tqdm import tqdm

from unified.errors import UnifiedError


def check_overlap(episodes: list[tuple], stores: list[Path], progress: bool = True) -> dict:
    """`episodes`: (suite, scenario name, seed) of the evaluation episodes. Returns the shared seeds and the near
    replays found in the training episodes of `stores` (for the same env id), and raises if any seed is shared."""
    from unified.data.store import EpisodeStore
    from unified.sim.env import make_env
    from unified.sim.rollout import start_episode
    from unified.sim.traffic import initial_traffic, same_traffic

    training: dict[str, list[tuple]] = {}  # env id -> (store, suite, scenario, seed) of its training episodes
    for root in stores:
        store = EpisodeStore(root)
        suite = store.suite
        for index in store.train_indices():
            meta = store.episode_meta(index)
            scenario = suite.scenarios[meta["scenario"]]
            training.setdefault(scenario.env, []).append((str(root), suite, scenario, int(meta["seed"])))
    shared, near = [], []
    envs: dict[tuple, object] = {}

    def start(suite, scenario, seed):
        key = (suite.hash, scenario.name)
        if key not in envs:
            envs[key] = make_env(suite, scenario, render=False)
        start_episode(envs[key], suite, scenario, seed)
        return initial_traffic(envs[key])

    starts: dict[tuple, object] = {}
    for suite, name, seed in tqdm(episodes, desc="overlap with training", unit="ep", disable=not progress):
        scenario = suite.scenarios[name]
        mine = training.get(scenario.env, [])
        if any(seed == s for *_, s in mine):
            shared.append({"scenario": name, "seed": seed})
        if not mine:
            continue
        traffic = start(suite, scenario, seed)
        for root, train_suite, train_scenario, train_seed in mine:
            key = (root, train_scenario.name, train_seed)
            if key not in starts:
                starts[key] = start(train_suite, train_scenario, train_seed)
            if same_traffic(traffic, starts[key]):
                near.append({"scenario": name, "seed": seed, "store": root, "training_scenario": train_scenario.name,
                             "training_seed": train_seed})
                break
    for env in envs.values():
        env.close()
    report = {"stores": [str(s) for s in stores], "training_episodes": sum(map(len, training.values())),
              "evaluation_episodes": len(episodes), "shared_seeds": shared, "near_replays": near}
    if shared:
        raise UnifiedError(f"{len(shared)} evaluation episode(s) use a simulator seed of a training episode of "
                           f"{', '.join(map(str, stores))} (first: {shared[0]}); evaluate with another --seed")
    return report
