"""`unified data tokenize`: encode an episode store once into memory-mapped token arrays (training never runs
the image encoder; the format and the reader, `TokenShards`, are in `unified.data.shards`). The store's held-out
episodes are written too, flagged, for a validation loss; training samples come only from the training episodes.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from tqdm import tqdm

from unified.data.shards import FORMAT, FORMAT_VERSION, TokenShards
from unified.data.store import EpisodeStore
from unified.errors import UnifiedError
from unified.outputs import staged_dir
from unified.sequences import TASKS
from unified.sim.causation import DECISIONS, reason_steps
from unified.tokenizers.fit import Tokenizers


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
    for what, names, dim in (("action", store.action_names, tokenizers.action.dim),
                             ("state", store.state_names, tokenizers.state.dim)):
        if len(names) != dim:
            raise UnifiedError(f"{data} records {len(names)} {what} values ({', '.join(names)}) but the {what} "
                               f"tokenizer in {tokenizer} reads {dim}; fit tokenizers on this store (`unified "
                               f"tokenizer fit --data {data}`)")
    if store.imported and "policy_reason" in wanted:
        raise UnifiedError(f"--tasks includes policy_reason, but {data} was imported "
                           f"({store.info['imported_from'].get('format')}) and records no reasons; use --tasks "
                           "policy,world")
    out = Path(out)
    with staged_dir(out, "shards", [data, tokenizer, operators], overwrite) as staging:
        table = _TextTable(tokenizers)
        columns: dict[str, list[np.ndarray]] = {k: [] for k in (
            "image", "action", "action_values", "state", "state_values", "episode", "step", "instruction", "reason",
            "decision")}
        episodes, reason_rows = [], []
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
            columns["reason"].append(np.array([table.row(c.text) if c.text else -1 for c in episode.causation],
                                              np.int32))  # -1: no reason recorded (an imported episode)
            # Its steps apart too, for the inductive form of the reasoning (model.inductive_reason).
            reason_rows += [[table.row(t) for t in reason_steps(c.text)] if c.text else []
                            for c in episode.causation]
            # -1: no decision recorded (an imported episode)
            columns["decision"].append(np.array([DECISIONS.index(c.decision) if c.decision else -1
                                                 for c in episode.causation], np.int8))
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
        width = max([1, *map(len, reason_rows)])  # an imported store records no reasons: one column of -1
        np.save(staging / "reason_step_rows.npy",
                np.asarray([r + [-1] * (width - len(r)) for r in reason_rows], np.int32).reshape(-1, width))
        np.save(staging / "text_ids.npy", text_ids.astype(dtype))
        np.save(staging / "text_offsets.npy", text_offsets)
        for name, rows in operator_rows.items():
            ragged = name in ("step_rows", "drill_rows")
            if ragged:  # one row of text rows per question, padded with -1
                width = max((len(r) for r in rows), default=0)
                rows = [r + [-1] * (width - len(r)) for r in rows]
            np.save(staging / f"operator_{name}.npy", np.asarray(rows, np.int32).reshape(len(rows), -1)
                    if ragged else np.asarray(rows, np.int32))
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


def split_steps(scratchpad: str) -> list[str]:
    """A scratchpad's steps: its sentences ("Alice > Kenji. Kenji > Zoe. So ..." -> three)."""
    import re

    return [s for s in re.split(r"(?<=[.!?])\s+", scratchpad.strip()) if s]


def _operators(directory: Path, hops: str, table: _TextTable) -> dict[str, list]:
    from unified.data.operators import as_words, parse_hops, read_info

    info = read_info(directory, "--operators ")
    form = info["steps"]
    rows: dict[str, list] = {"question": [], "steps": [], "answer": [], "hops": [], "step_rows": []}
    if info["drills"]:
        rows["drill_rows"] = []  # the drills' [context, step] pairs, flattened
    for h in parse_hops(hops):
        path = Path(directory) / f"hops_{h}.jsonl"
        if not path.is_file():
            raise UnifiedError(f"{path}: missing (the operator data set has no {h}-hop file)")
        for line_number, line in enumerate(path.read_text().splitlines(), 1):
            try:
                example = json.loads(line)
                rows["question"].append(table.row(as_words(example["prompt"], form)))
                rows["steps"].append(table.row(as_words(example["scratchpad"], form)) if example["scratchpad"] else -1)
                # Each step (sentence) apart too, for the inductive form of the scratchpad.
                rows["step_rows"].append([table.row(as_words(step, form))
                                          for step in split_steps(example["scratchpad"])])
                if "drill_rows" in rows:
                    rows["drill_rows"].append([table.row(as_words(step, form))
                                               for pair in example["drills"] for step in pair])
                rows["answer"].append(table.row(example["answer"]))
                rows["hops"].append(int(example["hops"]))
            except (json.JSONDecodeError, KeyError, ValueError) as e:
                raise UnifiedError(f"{path}:{line_number}: not an operator example ({e})") from None
    return rows
