"""Token shards: the memory-mapped token arrays `unified data tokenize` writes, and `TokenShards`, which turns
them into samples for the sequence builders.

The store's held-out episodes are in the shards too, flagged, so that a run can report a validation loss on them;
samples for training come only from the training episodes (`TokenShards.index(task, split="train")`).

    SHARDS/meta.json       counts, horizon, history, tasks, the source store and tokenizer directory
    SHARDS/layout.json     the token layout all ids below are global in
    SHARDS/*.npy           image (N, 64), action (N, D), action_values (N, D) float32, state (N, S),
                           state_values (N, S) float32,
                           episode (N,), step (N,), instruction (N,), reason (N,) -> rows of the text table,
                           text_ids (flat), text_offsets (K + 1,), operator_* (M,) rows of the text table,
                           operator_step_rows (M, K) the row of each step of a scratchpad, -1 padded
                           operator_drill_rows (M, 2D) the rows of each lookup drill's context and step (--drills)
                           reason_step_rows (N, K) the rows of each reason's steps (cause, decision), -1 padded
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from unified.errors import UnifiedError
from unified.layout import TokenLayout
from unified.sequences import Sample

FORMAT = "unified-token-shards"
FORMAT_VERSION = 1


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
        self.layout = self.token_layout = TokenLayout.load(self.root / "layout.json")  # layout: the model's
        self.horizon, self.history = self.meta["horizon"], self.meta["history"]
        self.arrays = {p.stem: np.load(p, mmap_mode="r") for p in self.root.glob("*.npy")}
        starts = np.cumsum([0] + [e["steps"] for e in self.meta["episodes"]])
        self.episode_start = {e["index"]: int(s) for e, s in zip(self.meta["episodes"], starts)}
        self._index: dict[tuple[str, str], np.ndarray] = {}
        self.fast = None  # the FAST tokenizer when the chunks are written in FAST tokens (`use_actions`)
        from unified.tokenizers.normalization import QuantileNormalizer

        # None for shards written before the range was recorded: they give no continuous-head targets.
        self.action_normalizer = (QuantileNormalizer.from_stats(self.meta["action_range"], f"{meta_path}: action_range")
                                  if "action_range" in self.meta else None)
        self.state_normalizer = (QuantileNormalizer.from_stats(self.meta["state_range"], f"{meta_path}: state_range")
                                 if "state_range" in self.meta and "state_values" in self.arrays else None)

    def use_actions(self, action_tokens: str, tokenizers) -> None:
        """Write action chunks as `action_tokens` ("bins", as tokenized; or "fast": each chunk's recorded actions
        encoded by the FAST tokenizer of `tokenizers`, the ones these shards were tokenized with). `layout` becomes
        the model's (`Tokenizers.layout_for`)."""
        if tokenizers.layout != self.token_layout:
            raise UnifiedError(f"{self.root}: these shards were not tokenized with the tokenizers given "
                               "(their layouts differ)")
        layout = tokenizers.layout_for(action_tokens)
        if action_tokens == "fast":
            if tokenizers.action_fast.horizon != self.horizon:
                raise UnifiedError(f"{self.root}: chunks of {self.horizon} steps, but the FAST tokenizer was fitted "
                                   f"for {tokenizers.action_fast.horizon} (`unified tokenizer fit --horizon`)")
            if "action_values" not in self.arrays:
                raise UnifiedError(f"{self.root}: no action_values (the recorded actions) to encode in FAST tokens; "
                                   "run `unified data tokenize` again")
            self.fast = tokenizers.action_fast
        else:
            self.fast = None
        self.layout = layout

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

    def sample(self, task: str, row: int, with_state: bool = True, state_dims: int | None = None,
               inductive: bool = False, frames: bool = True, inductive_reason: bool = False) -> Sample:
        """The sample of `task` at `row`; `inductive`: an operator question with its scratchpad's steps apart;
        `inductive_reason`: a policy_reason sample with its reasoning's steps apart; `frames=False`: a policy
        sample without its frame(s), as a model with `policy_frames: false` reads it."""
        a = self.arrays
        if task == "text":
            steps = int(a["operator_steps"][row])
            sample = Sample(
                task, question=self._text(int(a["operator_question"][row])),
                steps=self._text(steps) if steps >= 0 else np.zeros(0, np.int64),
                answer=self._text(int(a["operator_answer"][row])), id=f"operator {row}",
            )
            if inductive:
                if "operator_step_rows" not in a:
                    raise UnifiedError(f"{self.root}: these shards keep each scratchpad whole; the inductive "
                                       "scratchpad needs its steps apart: run `unified data tokenize` again")
                self._need_step_marker("the inductive scratchpad")
                sample.step_list = [self._text(int(r)) for r in a["operator_step_rows"][row] if r >= 0]
                if "operator_drill_rows" in a:
                    pairs = [int(r) for r in a["operator_drill_rows"][row] if r >= 0]
                    sample.drill_list = [(self._text(c), self._text(s)) for c, s in zip(pairs[::2], pairs[1::2])]
            return sample
        episode_first = row - int(a["step"][row])
        history = [max(episode_first, row - k) for k in range(self.history - 1, -1, -1)]
        sample = Sample(
            task,
            frames=np.asarray(a["image"][history], np.int64),
            actions=np.asarray(a["action"][row:row + self.horizon], np.int64),
            id=f"episode {int(a['episode'][row])} step {int(a['step'][row])}",
        )
        if self.fast is not None:
            values = np.asarray(a["action_values"][row:row + self.horizon], np.float64)
            sample.fast_actions = self.layout.to_global("fast", self.fast.encode(values[None])[0])
        if task in ("policy", "policy_reason"):
            if not frames:
                sample.frames = sample.frames[:0]
            sample.instruction = self._text(int(a["instruction"][row]))
            sample.state = np.asarray(a["state"][row][:state_dims], np.int64) if with_state else None
            sample.reason = self._text(int(a["reason"][row]))
            if inductive_reason and task == "policy_reason":
                if "reason_step_rows" not in a:
                    raise UnifiedError(f"{self.root}: these shards keep each reason whole; model.inductive_reason "
                                       "needs its steps apart: run `unified data tokenize` again")
                self._need_step_marker("model.inductive_reason")
                sample.reason_list = [self._text(int(r)) for r in a["reason_step_rows"][row] if r >= 0]
            if self.action_normalizer is not None:
                values = np.asarray(a["action_values"][row:row + self.horizon], np.float64)
                sample.action_values = self.action_normalizer.normalize(values).astype(np.float32)
            if with_state and self.state_normalizer is not None:
                values = self.state_normalizer.normalize(np.asarray(a["state_values"][row], np.float64))
                sample.state_values = values[:state_dims].astype(np.float32)
        if task == "world":
            sample.next_frame = np.asarray(a["image"][row + self.horizon], np.int64)
        return sample

    def _need_step_marker(self, what: str) -> None:
        if "<step>" not in self.layout.specials:
            raise UnifiedError(f"{self.root}: the tokenizer has no <step> marker, which {what} ends its steps "
                               "with: fit the tokenizers again")

    def action_values(self, row: int) -> np.ndarray:
        """(H, D) float32 actions of the chunk at `row`, in the simulator's units."""
        return np.asarray(self.arrays["action_values"][row:row + self.horizon])
