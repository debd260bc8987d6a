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
