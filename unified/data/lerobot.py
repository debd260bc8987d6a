"""Reading a local LeRobot v3 dataset (the format LeRobot 0.4 writes): episodes as arrays, frames decoded from
its videos.

    ROOT/meta/info.json                          codebase_version "v3.x", fps, features, data_path, video_path
    ROOT/meta/tasks.parquet                      task strings (the index) -> task_index
    ROOT/meta/episodes/chunk-*/file-*.parquet    one row per episode: length, tasks, which data and video file
                                                 holds it, and where (dataset_from_index, from_timestamp ...)
    ROOT/meta/stats.json                         per-feature statistics (min, max, mean, std, q01 ... q99)
    ROOT/data/chunk-*/file-*.parquet             one row per frame: action, observation.state, episode_index ...
    ROOT/videos/KEY/chunk-*/file-*.mp4           each camera's frames, several episodes one after another

Nothing here downloads: ROOT is a directory on disk. Every malformed part is an error that names the file and the
field.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from unified.errors import UnifiedError


@dataclass
class LeRobotEpisode:
    index: int
    task: str
    frames: np.ndarray  # (T, H, W, 3) uint8, the camera's frames
    actions: np.ndarray  # (T, A) float32
    states: np.ndarray  # (T, S) float32
    timestamps: np.ndarray  # (T,) seconds since the episode began


class LeRobotDataset:
    """A LeRobot v3 dataset on disk; `episode(i)` reads one episode of `camera`, `action` and `state`."""

    def __init__(self, root: str | Path, camera: str | None = None, action: str = "action",
                 state: str = "observation.state"):
        self.root = Path(root)
        info_path = self.root / "meta" / "info.json"
        if not info_path.is_file():
            raise UnifiedError(f"{self.root}: not a LeRobot dataset (no meta/info.json)")
        try:
            self.info = json.loads(info_path.read_text())
        except json.JSONDecodeError as e:
            raise UnifiedError(f"{info_path}: not JSON ({e})") from None
        version = str(self.info.get("codebase_version", ""))
        if not version.startswith("v3"):
            raise UnifiedError(f"{info_path}: codebase_version {version or 'missing'!r}; only LeRobot v3 datasets "
                               "are read (convert older ones with LeRobot's convert_dataset_v21_to_v30)")
        for key in ("fps", "features", "data_path"):
            if key not in self.info:
                raise UnifiedError(f"{info_path}: no {key!r}")
        self.fps = float(self.info["fps"])
        self.features: dict = self.info["features"]
        cameras = [k for k, f in self.features.items() if f.get("dtype") in ("video", "image")]
        if camera is None:
            if not cameras:
                raise UnifiedError(f"{info_path}: no camera (no feature of dtype video or image)")
            camera = cameras[0]
        for name, key, wanted in (("--camera", camera, cameras), ("--action", action, None),
                                  ("--state", state, None)):
            if key not in self.features or (wanted is not None and key not in wanted):
                choices = wanted if wanted is not None else [k for k, f in self.features.items()
                                                             if f.get("dtype") not in ("video", "image")]
                raise UnifiedError(f"{name} {key!r}: not a feature of {info_path} (it has {', '.join(choices)})")
        self.camera, self.action_key, self.state_key = camera, action, state
        if self.features[camera]["dtype"] != "video":
            raise UnifiedError(f"{info_path}: camera {camera!r} is stored as images, not videos; only video "
                               "cameras are read")
        if "video_path" not in self.info or not self.info["video_path"]:
            raise UnifiedError(f"{info_path}: camera {camera!r} is a video feature but there is no video_path")
        self.episodes = self._episodes()
        self.tasks = self._tasks()
        stats_path = self.root / "meta" / "stats.json"
        self.stats = json.loads(stats_path.read_text()) if stats_path.is_file() else {}

    def _read_parquet(self, path: Path, columns: list[str] | None = None):
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            return pq.read_table(path, columns=columns)
        except (OSError, pa.ArrowInvalid, KeyError) as e:
            raise UnifiedError(f"{path}: cannot be read as the LeRobot dataset's Parquet ({e})") from None

    def _episodes(self) -> list[dict]:
        files = sorted((self.root / "meta" / "episodes").glob("chunk-*/file-*.parquet"))
        if not files:
            raise UnifiedError(f"{self.root}: no episode metadata (meta/episodes/chunk-*/file-*.parquet)")
        video = f"videos/{self.camera}/"
        needed = ["episode_index", "length", "tasks", "data/chunk_index", "data/file_index", "dataset_from_index",
                  "dataset_to_index", video + "chunk_index", video + "file_index", video + "from_timestamp",
                  video + "to_timestamp"]
        rows = []
        for path in files:
            table = self._read_parquet(path)
            missing = [c for c in needed if c not in table.column_names]
            if missing:
                raise UnifiedError(f"{path}: no column(s) {missing} (a LeRobot v3 episodes file has them)")
            rows += table.select(needed).to_pylist()
        rows.sort(key=lambda r: r["episode_index"])
        return rows

    def _tasks(self) -> dict[int, str]:
        path = self.root / "meta" / "tasks.parquet"
        if not path.is_file():
            return {}
        frame = self._read_parquet(path).to_pandas()
        if "task_index" not in frame.columns:
            raise UnifiedError(f"{path}: no task_index column")
        return {int(i): str(task) for task, i in zip(frame.index, frame["task_index"])}

    def __len__(self) -> int:
        return len(self.episodes)

    def episode(self, k: int) -> LeRobotEpisode:
        """The k-th episode (in episode_index order)."""
        meta = self.episodes[k]
        data_path = self.root / self.info["data_path"].format(chunk_index=meta["data/chunk_index"],
                                                              file_index=meta["data/file_index"])
        table = self._read_parquet(data_path)
        for column in (self.action_key, self.state_key, "episode_index", "frame_index", "timestamp"):
            if column not in table.column_names:
                raise UnifiedError(f"{data_path}: no column {column!r}")
        episode_index = np.asarray(table.column("episode_index").to_numpy())
        rows = np.flatnonzero(episode_index == meta["episode_index"])
        if len(rows) != meta["length"]:
            raise UnifiedError(f"{data_path}: episode {meta['episode_index']} has {len(rows)} frames, its metadata "
                               f"says {meta['length']}")
        rows = rows[np.argsort(np.asarray(table.column("frame_index").to_numpy())[rows])]
        actions = _matrix(table, self.action_key, rows, data_path)
        states = _matrix(table, self.state_key, rows, data_path)
        timestamps = np.asarray(table.column("timestamp").to_numpy(), np.float64)[rows]
        frames = self._frames(meta, len(rows))
        task = meta["tasks"][0] if meta["tasks"] else ""
        return LeRobotEpisode(int(meta["episode_index"]), str(task), frames, actions, states, timestamps)

    def _frames(self, meta: dict, length: int) -> np.ndarray:
        """The episode's frames: those of its video file whose time lies in [from_timestamp, to_timestamp)."""
        import av

        video = f"videos/{self.camera}/"
        path = self.root / self.info["video_path"].format(video_key=self.camera,
                                                          chunk_index=meta[video + "chunk_index"],
                                                          file_index=meta[video + "file_index"])
        start, end = float(meta[video + "from_timestamp"]), float(meta[video + "to_timestamp"])
        half = 0.5 / self.fps
        frames = []
        try:
            with av.open(str(path)) as container:
                if not container.streams.video:
                    raise UnifiedError(f"{path}: holds no video stream")
                for frame in container.decode(container.streams.video[0]):
                    if frame.time is None or frame.time < start - half:
                        continue
                    if frame.time >= end - half:
                        break
                    frames.append(frame.to_ndarray(format="rgb24"))
        except (OSError, av.error.FFmpegError) as e:
            raise UnifiedError(f"{path}: cannot decode the video ({e})") from None
        if len(frames) != length:
            raise UnifiedError(f"{path}: {len(frames)} frames between {start:.3f} s and {end:.3f} s, but episode "
                               f"{meta['episode_index']} has {length}")
        return np.stack(frames)


def _matrix(table, column: str, rows: np.ndarray, path: Path) -> np.ndarray:
    values = table.column(column).to_pylist()
    try:
        array = np.asarray([values[r] for r in rows], np.float32)
    except (TypeError, ValueError):
        raise UnifiedError(f"{path}: column {column!r} does not hold fixed-length numbers") from None
    if array.ndim == 1:
        array = array[:, None]
    if not np.isfinite(array).all():
        raise UnifiedError(f"{path}: column {column!r} holds values that are not finite")
    return array


# -- importing: a LeRobot dataset as an episode store ---------------------------------------------------------

def _names(feature: dict, key: str, width: int) -> list[str]:
    """A feature's value names as LeRobot records them (a list, or a dict holding one), else key_0 ... key_N-1."""
    names = feature.get("names")
    if isinstance(names, dict):
        names = next((v for v in names.values() if isinstance(v, list)), None)
    if isinstance(names, list) and len(names) == width and all(isinstance(n, str) for n in names):
        return list(names)
    return [f"{key}_{i}" for i in range(width)]


def _resize(frames: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(T, H, W, 3) uint8 frames at (height, width) `size` (PIL's area-averaging reduction, bilinear upscaling)."""
    from PIL import Image

    h, w = size
    if frames.shape[1:3] == (h, w):
        return frames
    shrink = frames.shape[1] >= h and frames.shape[2] >= w
    method = Image.Resampling.BOX if shrink else Image.Resampling.BILINEAR
    return np.stack([np.asarray(Image.fromarray(f).resize((w, h), method)) for f in frames])


def import_lerobot(
    src: Path, *, out: Path, camera: str | None = None, action: str = "action", state: str = "observation.state",
    size: str = "64x64", held_out_every: int = 10, overwrite: bool = False, progress: bool = True,
) -> dict:
    """Read the local LeRobot v3 dataset `src` into an episode store at `out`: frames of `camera` (default: its
    first video camera) decoded and resized to `size` (HxW, the image tokenizer's size), `action` and `state`
    (feature keys) as they are, each episode's task as its instruction, the dataset's fps and statistics kept in
    meta/info.json (`imported_from`). One episode in `held_out_every` is held out, as in every store. The store is
    written beside `out` and put in place when complete: an interrupted import leaves nothing behind."""
    from tqdm import tqdm

    from unified.data.store import EpisodeStore
    from unified.outputs import staged_dir
    from unified.sim.rollout import Episode, EpisodeSummary

    try:
        h, w = (int(v) for v in size.lower().split("x"))
    except ValueError:
        raise UnifiedError(f"--size: expected HEIGHTxWIDTH such as 64x64, got {size!r}") from None
    if h < 16 or w < 16:
        raise UnifiedError(f"--size: at least 16x16, got {size!r}")
    dataset = LeRobotDataset(src, camera=camera, action=action, state=state)
    if not len(dataset):
        raise UnifiedError(f"{src}: the dataset holds no episodes")
    features = dataset.features
    first = dataset.episode(0)
    action_names = _names(features[action], action, first.actions.shape[1])
    state_names = _names(features[state], state, first.states.shape[1])
    fps = int(dataset.fps) if dataset.fps.is_integer() else dataset.fps
    source = {"format": "lerobot", "path": str(Path(src).resolve()),
              "codebase_version": dataset.info.get("codebase_version"), "camera": dataset.camera, "action": action,
              "state": state, "fps": fps, "episodes": len(dataset),
              "stats": {k: dataset.stats[k] for k in (action, state, dataset.camera) if k in dataset.stats}}
    with staged_dir(Path(out), "episodes", [src], overwrite) as staging:
        store = EpisodeStore.create_imported(staging, name=Path(src).resolve().name, fps=fps, image_size=(h, w),
                                             action_names=action_names, state_names=state_names, source=source,
                                             held_out_every=held_out_every)
        for k in tqdm(range(len(dataset)), desc="import", unit="ep", disable=not progress):
            episode = first if k == 0 else dataset.episode(k)
            for name, values, width in (("--action", episode.actions, len(action_names)),
                                        ("--state", episode.states, len(state_names))):
                if values.shape[1] != width:
                    raise UnifiedError(f"{src}: episode {episode.index} has {values.shape[1]} {name} values, the "
                                       f"first episode {width}")
            n = len(episode.actions)
            store.write_episode(Episode(
                index=k, scenario="imported", seed=episode.index, driver="lerobot", instruction=episode.task,
                actions=episode.actions, states=episode.states, causation=[],
                summary=EpisodeSummary(steps=n, success=False, collision=False, offroad=False, end="imported",
                                       progress_m=0.0, mean_speed=0.0, decision_ms=0.0),
                frames=_resize(episode.frames, (h, w)), source={"lerobot_episode_index": episode.index}))
        info = store.refresh_info()
    split = info["split"]
    print(f"{out}: {info['episodes']} episodes, {info['steps']} steps at {fps:g} fps from {src} (camera "
          f"{dataset.camera!r} at {h}x{w}, action {action!r} {len(action_names)}-d, state {state!r} "
          f"{len(state_names)}-d); {split['held_out_episodes']} held out", flush=True)
    return info


# -- writing: an episode store as a LeRobot v3 dataset -------------------------------------------------------

CAMERA = "observation.images.front"
QUANTILES = (0.01, 0.10, 0.50, 0.90, 0.99)


def _stats(values: np.ndarray) -> dict:
    """LeRobot's per-feature statistics of (N, D) values: min, max, mean, std, count, q01 ... q99."""
    values = np.asarray(values, np.float64)
    out = {"min": values.min(0), "max": values.max(0), "mean": values.mean(0), "std": values.std(0),
           "count": np.array([len(values)])}
    for q in QUANTILES:
        out[f"q{round(q * 100):02d}"] = np.quantile(values, q, axis=0)
    return {k: v.tolist() for k, v in out.items()}


def _pixels(frames: np.ndarray) -> np.ndarray:
    """Every 4th pixel of (T, H, W, 3) uint8 frames, as (N, 3) uint8: what the image statistics are taken over."""
    return frames[:, ::2, ::2].reshape(-1, 3)


def _image_stats(pixels: np.ndarray, frames: int) -> dict:
    """Per-channel statistics of (N, 3) uint8 pixels scaled to [0, 1], shaped (3, 1, 1) as LeRobot keeps them;
    `count` the number of frames they came from."""
    stats = _stats(pixels.astype(np.float64) / 255.0)
    return {k: np.asarray(v)[:, None, None].tolist() for k, v in stats.items() if k != "count"} | {"count": [frames]}


class _Video:
    """An AV1 MP4 written frame by frame as LeRobot writes its cameras (libsvtav1, yuv420p, GOP 2, CRF 30)."""

    def __init__(self, path: Path, fps: float, height: int, width: int):
        import fractions
        import os

        import av

        os.environ.setdefault("SVT_LOG", "1")  # the encoder's own log: errors only (it prints its settings otherwise)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.av = av
        self.container = av.open(str(path), "w")
        self.stream = self.container.add_stream("libsvtav1", rate=fractions.Fraction(fps).limit_denominator(1000),
                                                options={"g": "2", "crf": "30"})
        self.stream.width, self.stream.height, self.stream.pix_fmt = width, height, "yuv420p"

    def add(self, frames: np.ndarray) -> None:
        for frame in frames:
            for packet in self.stream.encode(self.av.VideoFrame.from_ndarray(frame, format="rgb24")):
                self.container.mux(packet)

    def close(self) -> None:
        for packet in self.stream.encode():
            self.container.mux(packet)
        self.container.close()


def _write_parquet(path: Path, table) -> None:
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)


def export_lerobot(*, data: Path, out: Path, overwrite: bool = False, progress: bool = True) -> dict:
    """Write the episode store `data` as a LeRobot v3 dataset at `out`: the frames as one AV1 video
    (observation.images.front), `action` (acceleration m/s^2, steering rad), `observation.state` (the store's
    state, its names kept), the instruction as each episode's task, LeRobot's statistics; fps as recorded. The
    store's held-out split is kept in meta/unified_export.json (LeRobot has one split, "train", over all episodes)."""
    import pyarrow as pa
    from tqdm import tqdm

    from unified.data.store import EpisodeStore
    from unified.outputs import staged_dir

    store = EpisodeStore(data)
    indices = store.indices()
    if not indices:
        raise UnifiedError(f"{data}: the store holds no episodes")
    fps = store.info["fps"]
    fps = int(fps) if float(fps).is_integer() else float(fps)  # LeRobot records an integer rate where it is one
    h, w, _ = store.info["image_shape"]
    if h % 2 or w % 2:
        raise UnifiedError(f"{data}: frames of {h}x{w}; the video codec (yuv420p) needs even sizes")
    with staged_dir(Path(out), "lerobot", [data], overwrite) as staging:
        tasks: dict[str, int] = {}
        rows: dict[str, list] = {k: [] for k in ("observation.state", "action", "timestamp", "frame_index",
                                                 "episode_index", "index", "task_index")}
        episodes, pixels, start = [], [], 0
        video = _Video(staging / "videos" / CAMERA / "chunk-000" / "file-000.mp4", fps, h, w)
        for k, index in enumerate(tqdm(indices, desc="export", unit="ep", disable=not progress)):
            episode = store.read_episode(index)
            n = len(episode.actions)
            task = tasks.setdefault(episode.instruction, len(tasks))
            columns = {"observation.state": episode.states.astype(np.float32),
                       "action": episode.actions.astype(np.float32),
                       "timestamp": (np.arange(n) / fps).astype(np.float32), "frame_index": np.arange(n),
                       "episode_index": np.full(n, k), "index": np.arange(start, start + n),
                       "task_index": np.full(n, task)}
            for name, values in columns.items():
                rows[name].append(values)
            video.add(episode.frames)  # streamed: the store's frames are never all in memory
            pixels.append(_pixels(episode.frames))
            meta = {"episode_index": k, "tasks": [episode.instruction], "length": n, "data/chunk_index": 0,
                    "data/file_index": 0, "dataset_from_index": start, "dataset_to_index": start + n,
                    f"videos/{CAMERA}/chunk_index": 0, f"videos/{CAMERA}/file_index": 0,
                    f"videos/{CAMERA}/from_timestamp": start / fps, f"videos/{CAMERA}/to_timestamp": (start + n) / fps,
                    "meta/episodes/chunk_index": 0, "meta/episodes/file_index": 0}
            for name, values in columns.items():
                for stat, value in _stats(np.asarray(values).reshape(n, -1)).items():
                    meta[f"stats/{name}/{stat}"] = value
            for stat, value in _image_stats(pixels[-1], n).items():
                meta[f"stats/{CAMERA}/{stat}"] = value
            episodes.append(meta)
            start += n
        data_table = pa.table({
            name: (pa.array(list(np.concatenate(parts)), pa.list_(pa.float32(), np.concatenate(parts).shape[1]))
                   if name in ("observation.state", "action")
                   else pa.array(np.concatenate(parts).astype(np.float32 if name == "timestamp" else np.int64)))
            for name, parts in rows.items()})
        _write_parquet(staging / "data" / "chunk-000" / "file-000.parquet", data_table)
        _write_parquet(staging / "meta" / "episodes" / "chunk-000" / "file-000.parquet", pa.Table.from_pylist(episodes))
        import pandas as pd

        tasks_frame = pd.DataFrame({"task_index": list(tasks.values())}, index=list(tasks))
        _write_parquet(staging / "meta" / "tasks.parquet", pa.Table.from_pandas(tasks_frame))
        video.close()
        everything = {name: np.concatenate(parts).reshape(start, -1) for name, parts in rows.items()}
        stats = {name: _stats(values) for name, values in everything.items()}
        stats[CAMERA] = _image_stats(np.concatenate(pixels), start)
        (staging / "meta" / "stats.json").write_text(json.dumps(stats, indent=2) + "\n")
        state_names = list(store.info["state_names"])
        features = {
            CAMERA: {"dtype": "video", "shape": [h, w, 3], "names": ["height", "width", "channels"],
                     "info": {"video.height": h, "video.width": w, "video.codec": "av1", "video.pix_fmt": "yuv420p",
                              "video.is_depth_map": False, "video.fps": fps, "video.channels": 3,
                              "has_audio": False}},
            "observation.state": {"dtype": "float32", "shape": [len(state_names)], "names": state_names},
            "action": {"dtype": "float32", "shape": [2], "names": list(store.info["action_names"])},
            **{name: {"dtype": "float32" if name == "timestamp" else "int64", "shape": [1], "names": None}
               for name in ("timestamp", "frame_index", "episode_index", "index", "task_index")},
        }
        info = {"codebase_version": "v3.0", "robot_type": "highway-env", "total_episodes": len(indices),
                "total_frames": start, "total_tasks": len(tasks), "chunks_size": 1000, "data_files_size_in_mb": 100,
                "video_files_size_in_mb": 200, "fps": fps, "splits": {"train": f"0:{len(indices)}"},
                "data_path": "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet",
                "video_path": "videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4",
                "features": features}
        (staging / "meta" / "info.json").write_text(json.dumps(info, indent=4) + "\n")
        held_out = [k for k, index in enumerate(indices) if store.is_held_out(index)]
        (staging / "meta" / "unified_export.json").write_text(json.dumps({
            "format": "unified-lerobot-export", "source": str(data), "store_indices": indices,
            "held_out_episodes": held_out, "held_out_rule": store.rule.description}, indent=2) + "\n")
    print(f"{out}: {len(indices)} episodes, {start} frames at {fps:g} fps, {len(tasks)} tasks "
          f"({len(held_out)} episodes held out in the store, listed in meta/unified_export.json)", flush=True)
    return info
