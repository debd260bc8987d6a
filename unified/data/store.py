"""The episode store: one Parquet file per episode plus `meta/info.json`, readable by any Parquet tool.

Layout (see the README, "Episode store format"):

    DIR/meta/info.json                  counts, shapes, fps, the suite, action/state statistics
    DIR/episodes/episode_000000.parquet one row per step; the episode's summary in the schema metadata

An episode file appears only when complete (written under a temporary name, then renamed), so a crash or
Ctrl-C never leaves half an episode behind. Readers stream file by file and column by column.
"""

from __future__ import annotations

import fcntl
import io
import json
import os
import re
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from unified.data.split import DEFAULT_EVERY, HeldOutRule
from unified.errors import UnifiedError
from unified.sim.causation import Causation
from unified.sim.env import ACTION_NAMES, ACTION_UNITS, STATE_NAMES, STATE_UNITS
from unified.sim.rollout import Episode, EpisodeSummary
from unified.sim.suite import Suite, suite_from_dict

NO_CAUSE = Causation(-1, np.zeros(2, np.float32), np.zeros(2, np.float32), "", "", "")  # an imported step's record
FORMAT = "unified-episodes"
FORMAT_VERSION = 4  # 2: the held-out split in meta/info.json, statistics over training episodes, the nearest
# vehicles in the state; 3: the ego's pose relative to its navigation route and the route's preview in the state;
# 4: that pose measured against the lane the route follows (the expert's target lane), not the nearest route lane
EPISODE_FILE = re.compile(r"^episode_(\d{6,})\.parquet$")

def schema(action_dim: int = 2, state_dim: int = len(STATE_NAMES)) -> pa.Schema:
    """The columns of an episode file. The simulator's stores hold 2 action values and `STATE_NAMES`; a store
    imported from a LeRobot dataset holds that dataset's widths (named in meta/info.json)."""
    return pa.schema([
        ("episode_index", pa.int32()),
        ("frame_index", pa.int32()),
        ("timestamp", pa.float32()),  # seconds since the episode began
        ("image", pa.binary()),  # PNG-encoded (H, W, 3) RGB frame seen before the action
        ("action", pa.list_(pa.float32(), action_dim)),  # simulator: acceleration m/s^2, steering rad
        # simulator: speed m/s, heading relative to the route's lane rad, lane offset m, the route ahead, ...
        ("state", pa.list_(pa.float32(), state_dim)),
        ("instruction", pa.string()),
        # Why the driver acted (the simulator's causation record); an imported episode has none: -1, zeros, "".
        ("critical_id", pa.int32()),  # -1: no critical agent
        ("critical_position", pa.list_(pa.float32(), 2)),  # metres in the ego frame (x ahead, y right)
        ("critical_velocity", pa.list_(pa.float32(), 2)),  # m/s relative to the ego, ego frame
        ("cause", pa.string()),
        ("decision", pa.string()),
        ("reason", pa.string()),  # critical agent, cause and decision as one sentence
    ])


SCHEMA = schema()


def encode_png(frame: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(frame).save(buffer, format="PNG", compress_level=6)
    return buffer.getvalue()


def decode_png(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


class EpisodeStore:
    """A directory of episodes. Open an existing one with `EpisodeStore(dir)`, start one with `create`."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.info_path = self.root / "meta" / "info.json"
        if not self.root.is_dir():
            raise UnifiedError(f"{self.root}: no such directory")
        if not self.info_path.is_file():
            raise UnifiedError(
                f"{self.root}: not an episode store (no meta/info.json); make one with `unified data generate`"
            )
        self.info = self._read_info()
        self.episodes_dir = self.root / "episodes"

    # -- creating and writing -------------------------------------------------------------------------

    @classmethod
    def create(cls, root: str | Path, suite: Suite, seed: int, held_out_every: int = DEFAULT_EVERY) -> EpisodeStore:
        """Open `root` for writing episodes of `suite` with `seed`, creating it if needed.

        An existing store must hold the same suite, seed and held-out rule: mixing them would make a data set no
        one can reproduce, or move episodes between the training and the held-out split.
        """
        root = Path(root)
        info_path = root / "meta" / "info.json"
        rule = HeldOutRule(held_out_every)
        if info_path.is_file():
            store = cls(root)
            if store.info["suite_hash"] != suite.hash or store.info["seed"] != seed:
                raise UnifiedError(
                    f"{root} holds episodes of suite {store.info['suite']['name']!r} "
                    f"(hash {store.info['suite_hash']}, seed {store.info['seed']}), not of suite {suite.name!r} "
                    f"(hash {suite.hash}, seed {seed}); use another --out or the same suite and seed"
                )
            if store.rule != rule:
                raise UnifiedError(
                    f"{root} holds out every {store.rule.every}th episode of each scenario, not every "
                    f"{rule.every}th; use --held-out-every {store.rule.every} or another --out"
                )
            return store
        if root.exists() and not root.is_dir():
            raise UnifiedError(f"{root}: exists and is a file, not an episode store; choose another --out")
        if root.exists() and any(root.iterdir()):
            listed = ", ".join(sorted(p.name for p in root.iterdir())[:3])
            raise UnifiedError(f"{root}: holds {listed} and is not an episode store; choose an empty or new directory "
                               "(nothing was changed)")
        return cls._initialise(root, suite, rule, fps=suite.policy_frequency, action_names=list(ACTION_NAMES),
                               action_units=list(ACTION_UNITS), state_names=list(STATE_NAMES),
                               state_units=list(STATE_UNITS), driver="expert", seed=seed)

    @classmethod
    def _initialise(cls, root: Path, suite: Suite, rule: HeldOutRule, **fields) -> EpisodeStore:
        """Make the empty store's directories and meta/info.json: counts at zero, no statistics yet, the suite and
        its split, and `fields` (fps, the action and state names and units, driver, seed, ...)."""
        from unified.config import to_dict

        (root / "meta").mkdir(parents=True, exist_ok=True)
        (root / "episodes").mkdir(exist_ok=True)
        h, w = suite.image_size
        info = {"format": FORMAT, "format_version": FORMAT_VERSION, "episodes": 0, "steps": 0,
                "image_shape": [h, w, 3], "image_encoding": "png", "suite": to_dict(suite), "suite_hash": suite.hash,
                "scenarios": {}, "split": rule.to_info(suite, []), "action_stats": None, "state_stats": None, **fields}
        _write_json_atomic(root / "meta" / "info.json", info)
        return cls(root)

    @classmethod
    def create_imported(cls, root: str | Path, *, name: str, fps: float, image_size: tuple[int, int],
                        action_names: list[str], state_names: list[str], source: dict,
                        held_out_every: int = DEFAULT_EVERY) -> EpisodeStore:
        """Start an empty store at `root` (new or empty) for episodes imported from another data set (`source`
        says which: format, path, keys). Its one scenario, named `imported`, is no simulator's: the store trains
        and tokenizes as any other, with its held-out split (every `held_out_every`th episode), but cannot be
        driven in closed loop."""
        from unified.sim.suite import Scenario

        root = Path(root)
        if root.exists() and any(root.iterdir()):
            raise UnifiedError(f"{root}: not empty; choose an empty or new directory (nothing was changed)")
        suite = Suite(scenarios={"imported": Scenario(env="imported", name="imported")}, name=name,
                      image_size=tuple(image_size), policy_frequency=max(1, round(fps)))
        return cls._initialise(root, suite, HeldOutRule(held_out_every), fps=fps, action_names=list(action_names),
                               action_units=[""] * len(action_names), state_names=list(state_names),
                               state_units=[""] * len(state_names), driver=source.get("format", "imported"), seed=0,
                               imported_from=source)

    def lock(self):
        """An exclusive lock on the store for one writer; raises if another process writes to it."""
        handle = open(self.root / "meta" / ".lock", "w")  # noqa: SIM115 - held for the writer's lifetime
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            raise UnifiedError(f"{self.root}: another process is writing to this store") from None
        return handle

    def remove_partial_files(self) -> int:
        """Delete temporary files left by a writer that was killed; returns how many."""
        stale = list(self.episodes_dir.glob(".*.tmp*"))
        for path in stale:
            path.unlink(missing_ok=True)
        return len(stale)

    def episode_path(self, index: int) -> Path:
        return self.episodes_dir / f"episode_{index:06d}.parquet"

    def write_episode(self, episode: Episode) -> Path:
        """Write one complete episode; it becomes visible only once fully on disk."""
        if episode.frames is None:
            raise UnifiedError(f"episode {episode.index}: no frames to store (it was run without rendering)")
        expected = tuple(self.info["image_shape"])
        if episode.frames.shape[1:] != expected:
            raise UnifiedError(
                f"episode {episode.index}: frames of shape {episode.frames.shape[1:]}, the store holds {expected}"
            )
        n = len(episode.actions)
        c = episode.causation or [NO_CAUSE] * n
        columns = {
            "episode_index": np.full(n, episode.index, np.int32),
            "frame_index": np.arange(n, dtype=np.int32),
            "timestamp": np.arange(n, dtype=np.float32) / self.info["fps"],
            "image": [encode_png(f) for f in episode.frames],
            "action": list(episode.actions.astype(np.float32)),
            "state": list(episode.states.astype(np.float32)),
            "instruction": [episode.instruction] * n,
            "critical_id": np.array([r.critical_id for r in c], np.int32),
            "critical_position": [np.asarray(r.critical_position, np.float32) for r in c],
            "critical_velocity": [np.asarray(r.critical_velocity, np.float32) for r in c],
            "cause": [r.cause for r in c],
            "decision": [r.decision for r in c],
            "reason": [r.text for r in c],
        }
        meta = {
            "index": episode.index, "scenario": episode.scenario, "seed": episode.seed, "driver": episode.driver,
            "instruction": episode.instruction, "summary": asdict(episode.summary),
            **({"source": episode.source} if episode.source else {}),
        }
        schema = self.schema.with_metadata({"unified": json.dumps(meta)})
        table = pa.table(columns, schema=schema)
        final = self.episode_path(episode.index)
        temporary = final.with_name(f".{final.name}.tmp{os.getpid()}")
        try:
            pq.write_table(table, temporary, compression="zstd")
            with open(temporary, "rb") as f:
                os.fsync(f.fileno())
            os.replace(temporary, final)
        except OSError as e:  # a full disk: no partial file stays, the error names the file
            temporary.unlink(missing_ok=True)
            from unified.outputs import disk_error

            raise disk_error(e, final) from None
        return final

    # -- reading --------------------------------------------------------------------------------------

    @property
    def imported(self) -> bool:
        """Whether the episodes came from another data set (`data import-lerobot`): no simulator, no causation."""
        return "imported_from" in self.info

    @property
    def action_names(self) -> list[str]:
        return list(self.info["action_names"])

    @property
    def state_names(self) -> list[str]:
        return list(self.info["state_names"])

    @property
    def schema(self) -> pa.Schema:
        return schema(len(self.action_names), len(self.state_names))

    def indices(self) -> list[int]:
        """Indices of the complete episodes on disk, sorted."""
        if not self.episodes_dir.is_dir():
            raise UnifiedError(f"{self.root}: not an episode store (no episodes/ directory)")
        found = (EPISODE_FILE.match(p.name) for p in self.episodes_dir.iterdir())
        return sorted(int(m.group(1)) for m in found if m)

    def __len__(self) -> int:
        return len(self.indices())

    # -- the held-out split (see unified.data.split) ---------------------------------------------------

    @property
    def rule(self) -> HeldOutRule:
        return HeldOutRule(self.info["split"]["held_out_every"])

    def is_held_out(self, index: int) -> bool:
        return self.rule.is_held_out(self.suite, index)

    def train_indices(self) -> list[int]:
        """The episodes everything that trains may read."""
        return [i for i in self.indices() if not self.is_held_out(i)]

    def held_out_indices(self, stratified: bool = False) -> list[int]:
        """The episodes no training step sees; `stratified` orders them round robin over the scenarios, so that
        the first k of them cover every scenario."""
        held = [i for i in self.indices() if self.is_held_out(i)]
        if not stratified:
            return held
        by_scenario: dict[str, list[int]] = {}
        for i in held:
            by_scenario.setdefault(self.suite.scenario_for_episode(i).name, []).append(i)
        columns = list(by_scenario.values())
        return [c[k] for k in range(max(map(len, columns), default=0)) for c in columns if k < len(c)]

    @property
    def suite(self) -> Suite:
        if getattr(self, "_suite", None) is None:
            # An imported store's one scenario is no simulator's: only its name and the split are read from it.
            self._suite = suite_from_dict(self.info["suite"], f"{self.info_path}: suite", check=not self.imported)
        return self._suite

    def _parquet(self, index: int) -> pq.ParquetFile:
        path = self.episode_path(index)
        try:
            return pq.ParquetFile(path)
        except (OSError, pa.ArrowException) as e:
            raise UnifiedError(
                f"{path}: corrupted or truncated episode file ({e}); delete it and rerun the same "
                "`unified data generate` command to write it again"
            ) from None

    def episode_meta(self, index: int) -> dict[str, Any]:
        """The episode's scenario, seed, instruction and summary, read from the file footer only."""
        path = self.episode_path(index)
        metadata = self._parquet(index).schema_arrow.metadata or {}
        if b"unified" not in metadata:
            raise UnifiedError(f"{path}: not a unified episode file (no 'unified' schema metadata)")
        return json.loads(metadata[b"unified"])

    def read_columns(self, index: int, columns: list[str] | None = None) -> pa.Table:
        path = self.episode_path(index)
        try:
            return self._parquet(index).read(columns=columns)
        except (OSError, pa.ArrowException) as e:
            raise UnifiedError(f"{path}: corrupted or truncated episode file ({e})") from None

    def read_episode(self, index: int, frames: bool = True) -> Episode:
        """One stored episode as an `Episode` (frames (T, H, W, 3) uint8 when `frames`)."""
        meta = self.episode_meta(index)
        columns = [n for n in self.schema.names if frames or n != "image"]
        table = self.read_columns(index, columns).to_pydict()
        causation = [
            Causation(cid, np.asarray(p, np.float32), np.asarray(v, np.float32), cause, decision, text)
            for cid, p, v, cause, decision, text in zip(
                table["critical_id"], table["critical_position"], table["critical_velocity"],
                table["cause"], table["decision"], table["reason"],
            )
        ]
        return Episode(
            index=meta["index"], scenario=meta["scenario"], seed=meta["seed"], driver=meta["driver"],
            instruction=meta["instruction"],
            actions=np.asarray(table["action"], np.float32).reshape(-1, len(self.action_names)),
            states=np.asarray(table["state"], np.float32).reshape(-1, len(self.state_names)),
            causation=causation, summary=EpisodeSummary(**meta["summary"]),
            frames=np.stack([decode_png(b) for b in table["image"]]) if frames else None,
        )

    def iter_episodes(self, frames: bool = True) -> Iterator[Episode]:
        """Every stored episode in index order, one in memory at a time."""
        for index in self.indices():
            yield self.read_episode(index, frames=frames)

    # -- metadata -------------------------------------------------------------------------------------

    def actions_and_states(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """(T, A) actions and (T, S) states of episode `index`, without its frames."""
        table = self.read_columns(index, ["action", "state"])
        return (_fixed_list(table.column("action"), len(self.action_names)),
                _fixed_list(table.column("state"), len(self.state_names)))

    def refresh_info(self) -> dict[str, Any]:
        """Recompute counts, per-scenario expert figures, the split and the statistics from the files on disk.

        The statistics (which normalise actions and states) are computed over the training episodes only, so that
        nothing of a held-out episode shapes a model; over all episodes when every one is held out."""
        scenarios: dict[str, dict[str, Any]] = {}
        actions, states = [], []
        indices = self.indices()
        train = set(self.train_indices()) or set(indices)
        for index in indices:
            meta = self.episode_meta(index)
            if index in train:
                # Statistics need every value for exact quantiles; actions and states are 20 bytes a step, so a
                # store of 10 million steps needs 200 MB here while its frames never leave the disk.
                action, state = self.actions_and_states(index)
                actions.append(action)
                states.append(state)
            s = scenarios.setdefault(meta["scenario"], {"episodes": 0, "steps": 0, "success": 0, "collision": 0,
                                                        "held_out": 0})
            s["held_out"] += self.is_held_out(index)
            s["episodes"] += 1
            s["steps"] += meta["summary"]["steps"]
            s["success"] += bool(meta["summary"]["success"])
            s["collision"] += bool(meta["summary"]["collision"])
        for s in scenarios.values():
            s["expert_success_rate"] = s.pop("success") / s["episodes"]
            s["expert_collision_rate"] = s.pop("collision") / s["episodes"]
        info = dict(self.info)
        info["episodes"] = sum(s["episodes"] for s in scenarios.values())
        info["steps"] = sum(s["steps"] for s in scenarios.values())
        info["scenarios"] = dict(sorted(scenarios.items()))
        info["split"] = self.rule.to_info(self.suite, indices)
        info["stats_over"] = "training episodes" if len(train) < len(indices) or not indices else "all episodes"
        info["action_stats"] = _stats(np.concatenate(actions), self.action_names) if actions else None
        info["state_stats"] = _stats(np.concatenate(states), self.state_names) if states else None
        _write_json_atomic(self.info_path, info)
        self.info = info
        return info

    def _read_info(self) -> dict[str, Any]:
        try:
            info = json.loads(self.info_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise UnifiedError(f"{self.info_path}: corrupted (not valid JSON: {e})") from None
        if isinstance(info, dict) and "codebase_version" in info and "features" in info:
            raise UnifiedError(f"{self.root}: a LeRobot dataset, not an episode store; import it once with `unified "
                               f"data import-lerobot {self.root} --out STORE` and give STORE here")
        if not isinstance(info, dict) or info.get("format") != FORMAT:
            raise UnifiedError(f"{self.info_path}: not an episode store's info (expected \"format\": \"{FORMAT}\")")
        if info.get("format_version") == 1:
            raise UnifiedError(
                f"{self.info_path}: written by an earlier version of unified (format_version 1: no held-out split, "
                "seeds that evaluation could reuse, the ego state alone); generate the store again into a new "
                "directory"
            )
        if info.get("format_version") == 2:
            raise UnifiedError(
                f"{self.info_path}: written by an earlier version of unified (format_version 2: an ego state of "
                f"{len(info.get('state_names', []))} values without the navigation route; this version records "
                f"{len(STATE_NAMES)}: {', '.join(STATE_NAMES)}); generate the store again into a new directory"
            )
        if info.get("format_version") == 3:
            raise UnifiedError(
                f"{self.info_path}: written by an earlier version of unified (format_version 3: the ego's heading and "
                "lane offset measured against the nearest lane of its route, which at a roundabout's entry is not the "
                "lane the expert steers for; this version measures them against the lane the route follows); "
                "generate the store again into a new directory"
            )
        if info.get("format_version") != FORMAT_VERSION:
            raise UnifiedError(
                f"{self.info_path}: format_version {info.get('format_version')!r}; this version of unified reads "
                f"{FORMAT_VERSION}"
            )
        for key in ("episodes", "steps", "fps", "image_shape", "suite", "suite_hash", "seed", "scenarios", "split"):
            if key not in info:
                raise UnifiedError(f"{self.info_path}: missing field {key!r}")
        if "imported_from" in info:
            for key in ("action_names", "state_names"):
                if not isinstance(info.get(key), list) or not info[key]:
                    raise UnifiedError(f"{self.info_path}: {key} must be a non-empty list of names")
        elif info.get("state_names") != list(STATE_NAMES):
            raise UnifiedError(f"{self.info_path}: state_names {info.get('state_names')!r}; this version of unified "
                               f"records {list(STATE_NAMES)}")
        return info


def _fixed_list(column: pa.ChunkedArray, width: int) -> np.ndarray:
    return np.concatenate([c.flatten().to_numpy() for c in column.chunks]).reshape(-1, width).astype(np.float32)


def _stats(values: np.ndarray, names: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """Per-dimension mean, std, min, max and the q01/q99 quantiles used to normalise actions and states."""
    v = values.astype(np.float64)
    return {
        "names": list(names),
        "mean": v.mean(0).tolist(),
        "std": v.std(0).tolist(),
        "min": v.min(0).tolist(),
        "max": v.max(0).tolist(),
        "q01": np.quantile(v, 0.01, axis=0).tolist(),
        "q99": np.quantile(v, 0.99, axis=0).tolist(),
        "count": int(len(v)),
    }


def _write_json_atomic(path: Path, data: Any) -> None:
    from unified.outputs import write_text_atomic

    write_text_atomic(path, json.dumps(data, indent=2) + "\n")


def scenario_stats(store: EpisodeStore, scenario: str) -> dict[str, Any]:
    """The action and state statistics of one scenario's episodes, over the same episodes as the store's own
    statistics (its training episodes; all of them in a store where every episode is held out)."""
    scenarios = store.info["scenarios"]
    if scenario not in scenarios:
        raise UnifiedError(f"--scenario {scenario!r}: not a scenario of {store.root} (its scenarios: "
                           f"{', '.join(scenarios)})")
    indices = store.indices()
    trained = set(store.train_indices())
    actions, states = [], []
    for index in indices:
        if (index in trained or not trained) and store.episode_meta(index)["scenario"] == scenario:
            action, state = store.actions_and_states(index)
            actions.append(action)
            states.append(state)
    if not actions:
        raise UnifiedError(f"--scenario {scenario!r}: {store.root} holds none of its episodes outside the held-out "
                           "split")
    return {"scenario": scenario, "episodes": len(actions),
            "stats_over": "training episodes" if trained else "episodes (every one held out)",
            "action_stats": _stats(np.concatenate(actions), store.action_names),
            "state_stats": _stats(np.concatenate(states), store.state_names)}


def _print_stats(info: dict[str, Any]) -> None:
    for key in ("action_stats", "state_stats"):
        stats = info.get(key)
        if stats:
            for i, name in enumerate(stats["names"]):
                print(f"{key.split('_')[0]} {name:<12} mean {stats['mean'][i]:+8.3f}  std {stats['std'][i]:7.3f}  "
                      f"q01 {stats['q01'][i]:+8.3f}  q99 {stats['q99'][i]:+8.3f}")


def data_info(data: Path, *, json: bool = False, scenario: str | None = None) -> dict:
    """`unified data info`: print what an episode store holds (counts, expert success and collisions per scenario,
    statistics). `scenario NAME`: the statistics of that scenario's episodes alone (what a policy meets there)."""
    import json as json_module  # `json` is the option here
    store = EpisodeStore(data)
    info = store.info
    if info["episodes"] != len(store):  # a run killed before it could update meta/info.json
        info = store.refresh_info()
    if scenario is not None:
        stats = scenario_stats(store, scenario)
        if json:
            print(json_module.dumps(stats, indent=2))
        else:
            print(f"{data}: scenario {scenario!r}, statistics over its {stats['episodes']} {stats['stats_over']}")
            _print_stats(stats)
        return stats
    if json:
        print(json_module.dumps(info, indent=2))
        return info
    shape = "x".join(map(str, info["image_shape"]))
    print(f"{data}: {info['episodes']} episodes, {info['steps']} steps at {info['fps']} Hz, "
          f"frames {shape} ({info['image_encoding']}), suite {info['suite']['name']!r}")
    print(f"held out: {info['split']['description']}; statistics over {info.get('stats_over', 'all episodes')}")
    source = info.get("imported_from")
    if source:  # no simulator: no expert figures
        print(f"imported from {source.get('format')} dataset {source.get('path')} (camera {source.get('camera')!r}, "
              f"action {source.get('action')!r}, state {source.get('state')!r}, {source.get('fps')} fps)")
        print(f"{'scenario':<24}{'episodes':>9}{'held out':>9}{'steps':>8}")
    else:
        print(f"{'scenario':<24}{'episodes':>9}{'held out':>9}{'steps':>8}{'expert success':>16}"
              f"{'expert collision':>18}")
    for name, s in info["scenarios"].items():
        figures = "" if source else f"{s['expert_success_rate']:>16.2f}{s['expert_collision_rate']:>18.2f}"
        print(f"{name:<24}{s['episodes']:>9}{s.get('held_out', 0):>9}{s['steps']:>8}{figures}")
    _print_stats(info)
    return info
