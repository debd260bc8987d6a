"""Packing built samples into fixed-length rows: block-diagonal causal masks with the action-chunk rule,
per-sample position ids, and the efficiency figure (non-pad fraction)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np

from unified.errors import UnifiedError
from unified.layout import TokenLayout
from unified.sequences import IGNORE, TASKS, Built


def attention_mask(segment: np.ndarray, action_block: np.ndarray, group: np.ndarray | None = None) -> np.ndarray:
    """(T, T) bool, True where query i may attend to key j.

    Causal, only within the same sample (`segment`, -1 for padding), and a token of an action block never sees
    another block of its chunk. In a training sequence the other blocks that causality lets through are the
    earlier ones; a decoder that writes all blocks at once (`Decoder.generate_blocks`) has later ones in its cache
    too, and they are hidden by the same rule. A token of an inductive scratchpad's group k >= 1 (`group`, -1
    where there is none) sees its group and group 0 (the question) only. Padding attends to itself only, so that
    no row is empty.
    """
    segment = np.asarray(segment)
    block = np.asarray(action_block)
    same = (segment[:, None] == segment[None, :]) & (segment[:, None] >= 0)
    causal = np.tri(len(segment), dtype=bool)
    other_block = (block[:, None] >= 0) & (block[None, :] >= 0) & (block[None, :] != block[:, None])
    allowed = same & causal & ~other_block
    if group is not None:
        group = np.asarray(group)
        other_step = (group[:, None] >= 1) & (group[None, :] != 0) & (group[None, :] != group[:, None])
        allowed &= ~other_step
    return allowed | np.eye(len(segment), dtype=bool)


@dataclass
class Batch:
    """Packed rows. Shapes: (B, T) except attention_mask (B, 1, T, T), or (0,) when the batch was made for a
    block mask (`collate(dense_mask=False)`: the mask is then rebuilt on the device from `segment` and
    `action_block`, see `unified.model.block_mask`)."""

    input_ids: np.ndarray
    targets: np.ndarray
    weights: np.ndarray
    position_ids: np.ndarray
    attention_mask: np.ndarray
    task_ids: np.ndarray  # index into TASKS of the sample each token belongs to, -1 for padding
    sample_ids: list[list[str]]
    head_index: np.ndarray  # (S, 3) [row, first position, position of <act>] of each policy sample with values
    head_targets: np.ndarray  # (S, H, D) its normalised action chunk
    head_states: np.ndarray  # (S, K) its normalised ego state ((S, 0) where the shards hold none)
    segment: np.ndarray | None = None  # (B, T) the sample each position belongs to within its row, -1 for padding
    action_block: np.ndarray | None = None  # (B, T) the action block of each position, -1 outside one

    @property
    def efficiency(self) -> float:
        """Fraction of positions holding real tokens."""
        return float((self.task_ids >= 0).mean())

    def to_torch(self, device="cpu") -> dict:
        import torch

        return {
            "input_ids": torch.from_numpy(self.input_ids).to(device),
            "targets": torch.from_numpy(self.targets).to(device),
            "weights": torch.from_numpy(self.weights).to(device),
            "position_ids": torch.from_numpy(self.position_ids).to(device),
            "attention_mask": torch.from_numpy(self.attention_mask).to(device),
            "task_ids": torch.from_numpy(self.task_ids).to(device),
            "head_index": torch.from_numpy(self.head_index).to(device),
            "head_targets": torch.from_numpy(self.head_targets).to(device),
            "head_states": torch.from_numpy(self.head_states).to(device),
        } | ({} if self.attention_mask.size else {
            "segment": torch.from_numpy(self.segment).to(device),
            "action_block": torch.from_numpy(self.action_block).to(device),
        })


def first_fit(lengths: list[int], capacity: int) -> list[list[int]]:
    """Indices grouped into bins of at most `capacity` tokens, longest first (first-fit decreasing)."""
    bins: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda k: -lengths[k]):
        for b, free in enumerate(room):
            if lengths[i] <= free:
                bins[b].append(i)
                room[b] -= lengths[i]
                break
        else:
            bins.append([i])
            room.append(capacity - lengths[i])
    return bins


def collate(rows: list[list[Built]], seq_len: int, layout: TokenLayout, dense_mask: bool = True) -> Batch:
    """Lay out each row's samples one after another and pad to `seq_len`. Without `dense_mask` no (B, 1, T, T)
    mask is built (64 MB at 4 rows of 2048): the model builds a flex-attention block mask from the segments."""
    b = len(rows)
    pad = layout.special("<pad>")
    input_ids = np.full((b, seq_len), pad, np.int64)
    targets = np.full((b, seq_len), IGNORE, np.int64)
    weights = np.zeros((b, seq_len), np.float32)
    position_ids = np.zeros((b, seq_len), np.int64)
    task_ids = np.full((b, seq_len), -1, np.int8)
    masks = np.zeros((b, 1, seq_len, seq_len) if dense_mask else (0,), bool)
    segments = np.full((b, seq_len), -1, np.int64)
    blocks = np.full((b, seq_len), -1, np.int16)
    sample_ids, head_index, head_targets, head_states = [], [], [], []
    grouped = any(built.group is not None for row in rows for built in row)
    if grouped and not dense_mask:
        raise UnifiedError("an inductive scratchpad's attention mask is built densely: train it with "
                           "attention=sdpa (the flex-attention block mask does not have its groups)")
    for r, row in enumerate(rows):
        segment = np.full(seq_len, -1, np.int64)
        block = np.full(seq_len, -1, np.int16)
        group = np.full(seq_len, -1, np.int16) if grouped else None
        start = 0
        for s, built in enumerate(row):
            stop = start + len(built)
            if stop > seq_len:
                raise UnifiedError(
                    f"sample {built.id!r} ({built.task}, {len(built)} tokens) does not fit in seq_len {seq_len}"
                )
            input_ids[r, start:stop] = built.ids
            targets[r, start:stop] = built.targets
            weights[r, start:stop] = built.weights
            position_ids[r, start:stop] = np.arange(len(built)) if built.positions is None else built.positions
            if built.group is not None:
                group[start:stop] = built.group
            task_ids[r, start:stop] = TASKS.index(built.task)
            segment[start:stop] = s
            block[start:stop] = built.action_block
            if built.action_values is not None:
                head_index.append((r, start, start + built.spans["actions"][0]))  # up to and with the first <act>
                head_targets.append(built.action_values)
                head_states.append(built.state_values if built.state_values is not None else np.zeros(0, np.float32))
            start = stop
        if dense_mask:
            masks[r, 0] = attention_mask(segment, block, group)
        segments[r], blocks[r] = segment, block
        sample_ids.append([x.id for x in row])
    return Batch(
        input_ids, targets, weights, position_ids, masks, task_ids, sample_ids,
        np.asarray(head_index, np.int64).reshape(-1, 3),
        np.stack(head_targets).astype(np.float32) if head_targets else np.zeros((0, 0, 0), np.float32),
        np.stack(head_states).astype(np.float32) if head_states else np.zeros((0, 0), np.float32),
        segments, blocks,
    )


def pack(samples: Iterable[Built], seq_len: int, batch_size: int, layout: TokenLayout,
         buffer: int = 256) -> Iterator[Batch]:
    """Batches of `batch_size` rows, filled from a buffer of `buffer` samples by first-fit decreasing."""
    pending: list[Built] = []
    rows: list[list[Built]] = []
    for built in samples:
        if len(built) > seq_len:
            raise UnifiedError(
                f"sample {built.id!r} ({built.task}, {len(built)} tokens) is longer than seq_len {seq_len}"
            )
        pending.append(built)
        if len(pending) >= buffer:
            bins = first_fit([len(x) for x in pending], seq_len)
            # Keep the least-filled bins' samples for the next round: they pack better with new arrivals.
            bins.sort(key=lambda g: -sum(len(pending[i]) for i in g))
            full, rest = bins[: max(1, len(bins) * 3 // 4)], bins[max(1, len(bins) * 3 // 4):]
            rows += [[pending[i] for i in g] for g in full]
            pending = [pending[i] for g in rest for i in g]
            while len(rows) >= batch_size:
                yield collate(rows[:batch_size], seq_len, layout)
                rows = rows[batch_size:]
    if pending:
        rows += [[pending[i] for i in g] for g in first_fit([len(x) for x in pending], seq_len)]
    while rows:
        yield collate(rows[:batch_size], seq_len, layout)
        rows = rows[batch_size:]
