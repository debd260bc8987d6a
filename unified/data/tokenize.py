"""`unified data tokenize`: encode an episode store once into memory-mapped token arrays (training never runs
the image encoder), and `TokenShards`, which turns them into samples for the sequence builders.

The store's held-out episodes are written too, flagged, so that a run can report a validation loss on them;
samples for training come only from the training episodes (`TokenShards.index(task, split="train")`).

    SHARDS/meta.json       counts, horizon, history, tasks, the source store and tokenizer directory
    SHARDS/layout.json     the token layout all ids below are global in
    SHARDS/*.npy           image (N, 64), action (N, D), action_values (N, D) float32, state (N, S),
                           state_values (N, S) float32,
                           episode (N,), step (N,), instruction (N,), reason (N,) -> rows of the text table,
                           text_ids (flat), text_offsets (K + 1,), operator_* (M,) rows of the text table
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from tqdm import tqdm

from unified.data.store import EpisodeStore
from unified.errors import UnifiedError
from unified.layout import TokenLayout
from unified.outputs import staged_dir
from unified.sequences import TASKS, Sample
from unified.sim.causation import DECISIONS
from unified.tokenizers.fit import Tokenizers

FORMAT = "unified-token-shards"
FORMAT_VERSION = 1


class _TextTable:
    """Unique texts -> rows of one flat id array."""

    def __init__(self, tokenizers: Tokenizers):
        self.tokenizers = tokenizers
        self.rows: dict[str, int] = {}
        self.texts: list[str] = []

    def row(self, text: str) -> int:
        if text not in self.rows:
            self.rows[text] = len(self.texts)
            self.texts.append(text)
        return self.rows[text]

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        ids = self.tokenizers.text.encode(self.texts) if self.texts else []
        layout = self.tokenizers.layout
        flat = [layout.to_global("text", row) for row in ids]
        offsets = np.cumsum([0] + [len(r) for r in flat]).astype(np.int64)
        return (np.concatenate(flat) if flat else np.zeros(0, np.int64)), offsets


def tokenize(
    *, data: Path, tokenizer: Path, out: Path, horizon: int = 10, history: int = 1,
    tasks: str = "policy_reason,policy,world", operators: Path | None = None, operator_hops: str = "2-4",
    overwrite: bool = False, progress: bool = True,
) -> dict:
    """Tokenize every episode of `data` (and operator examples of `operator_hops` from `operators`) into `out`; the
    held-out episodes are flagged and never drawn for training. An existing shard directory at `out` is replaced
    only with `overwrite`; anything else there is refused."""
    wanted = [t.strip() for t in tasks.split(",") if t.strip()]
    unknown = sorted(set(wanted) - set(TASKS))
    if unknown or not wanted:
        raise UnifiedError(f"--tasks: unknown task(s) {unknown or wanted}; choose from {', '.join(TASKS)}")
    if "text" in wanted and operators is None:
        raise UnifiedError("--tasks includes text: give the operator data set with --operators DIR")
    if horizon < 1 or history < 1:
        raise UnifiedError(f"--horizon and --history must be at least 1, got {horizon} and {history}")
    store = EpisodeStore(data)
    tokenizers = Tokenizers.from_pretrained(tokenizer)
    layout = tokenizers.layout
    if tuple(store.info["image_shape"][:2]) != tuple(tokenizers.image.config.image_size):
        raise UnifiedError(
            f"{data} holds {store.info['image_shape'][:2]} frames but the image tokenizer in {tokenizer} reads "
            f"{list(tokenizers.image.config.image_size)}"
        )
    out = Path(out)
    with staged_dir(out, "shards", [data, tokenizer, operators], overwrite) as staging:
        table = _TextTable(tokenizers)
        columns: dict[str, list[np.ndarray]] = {k: [] for k in (
            "image", "action", "action_values", "state", "state_values", "episode", "step", "instruction", "reason",
            "decision")}
        episodes = []
        for index in tqdm(store.indices(), desc="tokenize", unit="ep", disable=not progress, dynamic_ncols=True):
            episode = store.read_episode(index)
            n = len(episode.actions)
            columns["image"].append(layout.to_global("image", tokenizers.image.encode(episode.frames)))
            columns["action"].append(layout.to_global("action", tokenizers.action.encode(episode.actions[:, None])))
            columns["action_values"].append(episode.actions.astype(np.float32))
            columns["state"].append(layout.to_global("state", tokenizers.state.encode(episode.states[:, None])))
            columns["state_values"].append(episode.states.astype(np.float32))
            columns["episode"].append(np.full(n, index, np.int32))
            columns["step"].append(np.arange(n, dtype=np.int32))
            columns["instruction"].append(np.full(n, table.row(episode.instruction), np.int32))
            columns["reason"].append(np.array([table.row(c.text) for c in episode.causation], np.int32))
            columns["decision"].append(np.array([DECISIONS.index(c.decision) for c in episode.causation], np.int8))
            episodes.append({"index": index, "scenario": episode.scenario, "steps": n,
                             "held_out": store.is_held_out(index)})
        operator_rows = _operators(operators, operator_hops, table) if operators is not None else {}
        text_ids, text_offsets = table.arrays()
        dtype = np.uint16 if layout.vocab_size <= np.iinfo(np.uint16).max else np.int32
        for name, parts in columns.items():
            array = np.concatenate(parts)
            if name in ("image", "action", "state"):
                array = array.astype(dtype)
            np.save(staging / f"{name}.npy", array)
        np.save(staging / "text_ids.npy", text_ids.astype(dtype))
        np.save(staging / "text_offsets.npy", text_offsets)
        for name, rows in operator_rows.items():
            np.save(staging / f"operator_{name}.npy", np.asarray(rows, np.int32))
        layout.save(staging / "layout.json")
        meta = {
            "format": FORMAT, "format_version": FORMAT_VERSION, "data": str(data), "tokenizer": str(tokenizer),
            "suite_hash": store.info["suite_hash"], "held_out": store.rule.description,
            "held_out_episodes": [e["index"] for e in episodes if e["held_out"]], "horizon": horizon,
            "history": history, "tasks": wanted,
            "steps": int(sum(e["steps"] for e in episodes)), "episodes": episodes,
            "operators": len(operator_rows.get("question", [])), "operator_hops": operator_hops if operators else None,
            "tokens_per_image": tokenizers.image.config.tokens_per_image, "action_dim": tokenizers.action.dim,
            "state_dim": tokenizers.state.dim, "action_stats": store.info["action_stats"],
            # The range the action tokenizer normalises over, and so the one a continuous head's targets are
            # normalised over: the policy unnormalises the head's output with the tokenizer's normaliser.
            "action_range": {"q01": list(tokenizers.action.normalizer.q01),
                             "q99": list(tokenizers.action.normalizer.q99)},
            # Likewise the state tokenizer's range, over which a head that reads the state sees it normalised.
            "state_range": {"q01": list(tokenizers.state.normalizer.q01), "q99": list(tokenizers.state.normalizer.q99)},
            "state_stats": store.info["state_stats"], "fps": store.info["fps"],
        }
        (staging / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    shards = TokenShards(out)
    counts = {task: len(shards.index(task)) for task in wanted}
    if progress:
        print(f"{out}: {meta['steps']} steps of {len(episodes)} episodes ({len(meta['held_out_episodes'])} held out, "
              "never in a training batch); training samples per task: "
              + ", ".join(f"{k} {v}" for k, v in counts.items()), flush=True)
    return meta | {"samples": counts}


def _operators(directory: Path, hops: str, table: _TextTable) -> dict[str, list[int]]:
    from unified.data.operators import parse_hops

    rows: dict[str, list[int]] = {"question": [], "steps": [], "answer": [], "hops": []}
    for h in parse_hops(hops):
        path = Path(directory) / f"hops_{h}.jsonl"
        if not path.is_file():
            raise UnifiedError(f"{path}: missing (the operator data set has no {h}-hop file)")
        for line_number, line in enumerate(path.read_text().splitlines(), 1):
            try:
                example = json.loads(line)
                rows["question"].append(table.row(example["prompt"]))
                rows["steps"].append(table.row(example["scratchpad"]) if example["scratchpad"] else -1)
                rows["answer"].append(table.row(example["answer"]))
                rows["hops"].append(int(example["hops"]))
            except (json.JSONDecodeError, KeyError, ValueError) as e:
                raise UnifiedError(f"{path}:{line_number}: not an operator example ({e})") from None
    return rows


class TokenShards:
    """Memory-mapped token arrays and the samples they hold, by task."""

    def __init__(self, directory: str | Path):
        self.root = Path(directory)
        meta_path = self.root / "meta.json"
        if not meta_path.is_file():
            raise UnifiedError(f"{self.root}: not a token shard directory (no meta.json); make one with "
                               "`unified data tokenize`")
        self.meta = json.loads(meta_path.read_text())
        if self.meta.get("format") != FORMAT or self.meta.get("format_version") != FORMAT_VERSION:
            raise UnifiedError(f"{meta_path}: not token shards of format version {FORMAT_VERSION}")
        self.layout = TokenLayout.load(self.root / "layout.json")
        self.horizon, self.history = self.meta["horizon"], self.meta["history"]
        self.arrays = {p.stem: np.load(p, mmap_mode="r") for p in self.root.glob("*.npy")}
        starts = np.cumsum([0] + [e["steps"] for e in self.meta["episodes"]])
        self.episode_start = {e["index"]: int(s) for e, s in zip(self.meta["episodes"], starts)}
        self._index: dict[tuple[str, str], np.ndarray] = {}
        from unified.tokenizers.normalization import QuantileNormalizer

        # None for shards written before the range was recorded: they give no continuous-head targets.
        self.action_normalizer = (QuantileNormalizer.from_stats(self.meta["action_range"], f"{meta_path}: action_range")
                                  if "action_range" in self.meta else None)
        self.state_normalizer = (QuantileNormalizer.from_stats(self.meta["state_range"], f"{meta_path}: state_range")
                                 if "state_range" in self.meta and "state_values" in self.arrays else None)

    def _text(self, row: int) -> np.ndarray:
        offsets = self.arrays["text_offsets"]
        return np.asarray(self.arrays["text_ids"][offsets[row]:offsets[row + 1]], np.int64)

    def index(self, task: str, split: str = "train") -> np.ndarray:
        """Global step rows (or operator rows for `text`) at which a sample of `task` starts, in the store's
        training episodes (`split="train"`) or its held-out ones (`"held_out"`, for a validation loss only)."""
        if split not in ("train", "held_out"):
            raise UnifiedError(f"split must be 'train' or 'held_out', got {split!r}")
        if (task, split) not in self._index:
            if task == "text":
                count = len(self.arrays.get("operator_question", [])) if split == "train" else 0
                self._index[(task, split)] = np.arange(count)
            else:
                rows = []
                for e in self.meta["episodes"]:
                    if bool(e.get("held_out")) != (split == "held_out"):
                        continue
                    start, n = self.episode_start[e["index"]], e["steps"]
                    # The world task needs the frame after the chunk; both need a whole chunk of actions.
                    last = n - self.horizon - (1 if task == "world" else 0)
                    rows.append(start + np.arange(0, last + 1))
                self._index[(task, split)] = np.concatenate(rows) if rows else np.zeros(0, np.int64)
        return self._index[(task, split)]

    def sample(self, task: str, row: int, with_state: bool = True, state_dims: int | None = None) -> Sample:
        a = self.arrays
        if task == "text":
            steps = int(a["operator_steps"][row])
            return Sample(
                task, question=self._text(int(a["operator_question"][row])),
                steps=self._text(steps) if steps >= 0 else np.zeros(0, np.int64),
                answer=self._text(int(a["operator_answer"][row])), id=f"operator {row}",
            )
        episode_first = row - int(a["step"][row])
        history = [max(episode_first, row - k) for k in range(self.history - 1, -1, -1)]
        sample = Sample(
            task,
            frames=np.asarray(a["image"][history], np.int64),
            actions=np.asarray(a["action"][row:row + self.horizon], np.int64),
            id=f"episode {int(a['episode'][row])} step {int(a['step'][row])}",
        )
        if task in ("policy", "policy_reason"):
            sample.instruction = self._text(int(a["instruction"][row]))
            sample.state = np.asarray(a["state"][row][:state_dims], np.int64) if with_state else None
            sample.reason = self._text(int(a["reason"][row]))
            if self.action_normalizer is not None:
                values = np.asarray(a["action_values"][row:row + self.horizon], np.float64)
                sample.action_values = self.action_normalizer.normalize(values).astype(np.float32)
            if with_state and self.state_normalizer is not None:
                values = self.state_normalizer.normalize(np.asarray(a["state_values"][row], np.float64))
                sample.state_values = values[:state_dims].astype(np.float32)
        if task == "world":
            sample.next_frame = np.asarray(a["image"][row + self.horizon], np.int64)
        return sample

    def action_values(self, row: int) -> np.ndarray:
        """(H, D) float32 actions of the chunk at `row`, in the simulator's units."""
        return np.asarray(self.arrays["action_values"][row:row + self.horizon])


def inspect_shards(
    shards: Path, *, seq_len: int = 1024, batch_size: int = 8, dump: int = 1, max_samples: int = 4000,
    image_weight: float = 0.04,
) -> dict:
    """Print sample counts, the packing efficiency (non-pad fraction) at `seq_len`, and `dump` samples per task
    as readable tokens."""
    from unified.packing import pack
    from unified.sequences import build
    from unified.sequences import dump as render

    store = TokenShards(shards)
    rng = np.random.default_rng(0)
    tasks = list(store.meta["tasks"])
    if store.meta["operators"] and "text" not in tasks:
        tasks.append("text")
    counts = {task: len(store.index(task)) for task in tasks}
    held = {task: len(store.index(task, "held_out")) for task in tasks}
    print(f"{shards}: training samples " + ", ".join(f"{t} {n}" for t, n in counts.items())
          + f"; held out ({store.meta.get('held_out', 'no rule')}, never trained on): "
          + ", ".join(f"{t} {n}" for t, n in held.items()))
    text = None
    tokenizer_dir = Path(store.meta["tokenizer"])
    if (tokenizer_dir / "text").is_dir():
        from unified.tokenizers.text import TextTokenizer

        text = TextTokenizer.from_pretrained(tokenizer_dir / "text").decode
    chosen = []
    for task, n in counts.items():
        rows = rng.choice(store.index(task), size=min(n, max_samples // len(counts)), replace=False) if n else []
        built = [build(store.sample(task, int(r)), store.layout, image_weight) for r in rows]
        for b in built[:dump]:
            print(render(b, store.layout, text))
        chosen += built
    order = rng.permutation(len(chosen))
    batches = list(pack([chosen[i] for i in order], seq_len, batch_size, store.layout))
    real = sum(int((b.task_ids >= 0).sum()) for b in batches)
    total = sum(b.task_ids.size for b in batches)
    efficiency = real / max(total, 1)
    lengths = {t: float(np.mean([len(b) for b in chosen if b.task == t])) for t in counts if counts[t]}
    print("mean sample length: " + ", ".join(f"{t} {v:.0f}" for t, v in lengths.items()))
    print(f"packing efficiency at seq_len {seq_len}: {efficiency:.1%} non-pad over {len(batches)} batches "
          f"of {batch_size} ({len(chosen)} samples)")
    return {"samples": counts, "held_out_samples": held, "packing_efficiency": efficiency, "mean_length": lengths}
