"""Training batches: a task mixture drawn from token shards, packed into fixed rows.

Batch (step, part) is a pure function of the seed, where part = rank x grad_accum + micro step numbers the
micro-batches of one optimizer step: the data position of a run is its step, so a resumed run sees exactly the
batches the uninterrupted run would have seen, and a run on 1 rank with grad_accum 2 exactly those of 2 ranks with
grad_accum 1 (which is what lets a run resume on another number of ranks and continue the same optimisation).
"""

from __future__ import annotations

import numpy as np

from unified.data.shards import TokenShards
from unified.errors import UnifiedError
from unified.packing import Batch, collate
from unified.sequences import build

TURN_RAD = 0.1  # steering beyond this is a turn, a lane change or a correction; lane keeping stays within it
MISSES_BEFORE_CLOSING = 8  # draws that fit nowhere before a batch is closed; rows end up nearly full


class MixtureBatches:
    def __init__(self, shards: TokenShards, tasks: dict[str, float], seq_len: int, batch_size: int, seed: int,
                 image_weight: float = 0.04, task_weights: dict[str, float] | None = None, with_state: bool = True,
                 state_dims: int | None = None, split: str = "train", balance: float = 0.0, turn_weight: float = 1.0,
                 image_dropout: float = 0.0, dense_mask: bool = True, inductive: bool = False,
                 question_weight: float = 0.0, policy_frames: bool = True, state_noise: int = 0,
                 inductive_reason: bool = False):
        """`split="held_out"` draws from the store's held-out episodes instead, for a validation loss (tasks without
        held-out samples, such as the operator questions, are left out). `balance` > 0 draws the policy samples of
        rare decisions more often: a sample's weight is (the share of its decision) ** -balance, so 0 draws
        uniformly and 1 gives every decision the same share. `turn_weight` draws the policy samples whose action
        chunk steers by more than TURN_RAD at some step (a turn, a lane change, a correction: a small share of the
        steps, and the ones a driver must get right) that many times as often as the others. `image_dropout` is the
        share of policy samples built without their frame(s) (no `<img>` span: the prompt is the instruction and the
        state); `policy_frames=False` builds every policy sample without them, in either split (for a model whose
        policy never reads them). `inductive` builds the operator questions' scratchpads in their inductive form;
        `question_weight` > 0 trains on their questions' tokens too, at that weight (`sequences.build_text`);
        `inductive_reason` the policy's reasoning in its inductive form (`sequences._inductive_reason`).
        `state_noise` k > 0 shifts each state token of a policy prompt by a bin drawn uniformly from -k .. k, kept
        within the bins its dimension takes in training (the targets stay as recorded), so that no prompt holds the
        exact state tokens of its sample; `state_values` are left as they are (README, fourteenth round: it drove
        worse on two seeds)."""
        self.shards, self.seq_len, self.batch_size, self.seed = shards, seq_len, batch_size, seed
        self.image_weight, self.task_weights, self.with_state = image_weight, task_weights or {}, with_state
        self.state_dims, self.split, self.balance, self.turn_weight = state_dims, split, balance, turn_weight
        self.image_dropout, self.dense_mask, self.inductive = image_dropout, dense_mask, inductive
        self.question_weight, self.policy_frames, self.state_noise = question_weight, policy_frames, state_noise
        self.inductive_reason = inductive_reason
        if state_noise < 0:
            raise UnifiedError(f"state_noise is a number of bins, 0 or more; got {state_noise}")
        self._state_span: tuple[np.ndarray, np.ndarray] | None = None
        self._draw: dict[str, np.ndarray | None] = {}
        self.tasks = [t for t, w in tasks.items() if w > 0 and (split == "train" or len(shards.index(t, split)))]
        if not self.tasks:
            raise UnifiedError(f"{shards.root}: no {split} samples for the tasks {sorted(tasks)}")
        for task in self.tasks:
            if len(shards.index(task, split)) == 0:
                hint = " (tokenize with --operators for the text task)" if task == "text" else ""
                raise UnifiedError(f"{shards.root}: no samples for task {task!r}{hint}")
        weights = np.array([tasks[t] for t in self.tasks], np.float64)
        self.probabilities = weights / weights.sum()

    def probabilities_of(self, task: str) -> np.ndarray | None:
        """The drawing probability of each sample of a policy task under `balance` and `turn_weight` (None:
        uniform)."""
        if task not in ("policy", "policy_reason") or (self.balance <= 0 and self.turn_weight == 1.0):
            return None
        if task not in self._draw:
            rows = self.shards.index(task, self.split)
            weights = np.ones(len(rows))
            if self.balance > 0 and "decision" in self.shards.arrays:
                decisions = np.asarray(self.shards.arrays["decision"][rows], np.int64)
                if (decisions < 0).any():
                    raise UnifiedError(f"{self.shards.root}: data.balance needs the driver's decisions, which "
                                       "these shards do not record (an imported store); set data.balance=0")
                share = np.bincount(decisions, minlength=decisions.max() + 1) / len(decisions)
                weights *= share[decisions] ** -self.balance
            if self.turn_weight != 1.0:
                weights *= np.where(self.turning(rows), self.turn_weight, 1.0)
            self._draw[task] = weights / weights.sum()
        return self._draw[task]

    def turning(self, rows: np.ndarray) -> np.ndarray:
        """(N,) bool: whether the action chunk of each sample row steers by more than TURN_RAD at some step."""
        steering = np.abs(np.asarray(self.shards.arrays["action_values"])[:, 1])
        horizon = self.shards.horizon
        # The chunk of row r is rows r .. r + horizon - 1 (tokenizing pads each episode's end, so it stays in it).
        ahead = np.lib.stride_tricks.sliding_window_view(np.pad(steering, (0, horizon - 1)), horizon).max(1)
        return ahead[np.asarray(rows, np.int64)] > TURN_RAD

    def noisy_state(self, state: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """(S,) global state ids, each shifted by a bin drawn uniformly from -state_noise .. state_noise and clipped
        to the lowest and highest id its dimension takes in the training split's policy samples (so it stays a token
        of that dimension, within the range training has seen there)."""
        if self._state_span is None:
            rows = np.asarray(self.shards.index("policy", "train"), np.int64)
            ids = np.asarray(self.shards.arrays["state"][rows], np.int64)
            self._state_span = ids.min(0), ids.max(0)
        low, high = (bound[:len(state)] for bound in self._state_span)
        return np.clip(state + rng.integers(-self.state_noise, self.state_noise + 1, len(state)), low, high)

    def batch(self, step: int, part: int = 0) -> Batch:
        """Micro-batch `part` (rank x grad_accum + micro step) of optimizer step `step`."""
        rng = np.random.default_rng([self.seed, step, 0, part])
        # The state noise has a generator of its own, so a run with it draws the same samples as a run without.
        noise = np.random.default_rng([self.seed, step, 1, part]) if self.state_noise > 0 else None
        rows = [[] for _ in range(self.batch_size)]
        room = [self.seq_len] * self.batch_size
        misses = 0
        while misses < MISSES_BEFORE_CLOSING:
            task = self.tasks[int(rng.choice(len(self.tasks), p=self.probabilities))]
            index = self.shards.index(task, self.split)
            p = self.probabilities_of(task)
            pick = int(rng.integers(len(index))) if p is None else int(rng.choice(len(index), p=p))
            sample = self.shards.sample(task, int(index[pick]), with_state=self.with_state,
                                        state_dims=self.state_dims, inductive=self.inductive,
                                        inductive_reason=self.inductive_reason,
                                        frames=self.policy_frames)
            # Drawn only when asked for, so that runs without it see the batches they always did.
            if self.image_dropout > 0 and task.startswith("policy") and rng.random() < self.image_dropout:
                sample.frames = sample.frames[:0]
            if noise is not None and sample.state is not None:
                sample.state = self.noisy_state(sample.state, noise)
            built = build(sample, self.shards.layout, self.image_weight, self.task_weights, self.question_weight)
            if len(built) > self.seq_len:
                raise UnifiedError(f"sample {built.id!r} ({built.task}) has {len(built)} tokens, more than "
                                   f"data.seq_len {self.seq_len}")
            target = next((r for r in range(self.batch_size) if room[r] >= len(built)), None)
            if target is None:
                misses += 1
                continue
            rows[target].append(built)
            room[target] -= len(built)
        return collate(rows, self.seq_len, self.shards.layout, self.dense_mask)


class StepBatches:
    """A map-style data set of one rank's micro-batches: item `step` is the list of its `accum` micro-batches of
    that optimizer step (parts rank x accum ... rank x accum + accum - 1), a pure function of the step."""

    def __init__(self, batches: MixtureBatches, rank: int, accum: int):
        self.batches, self.rank, self.accum = batches, rank, accum

    def __getitem__(self, step: int) -> list[Batch]:
        return [self.batches.batch(step, self.rank * self.accum + micro) for micro in range(self.accum)]


def _as_is(item):
    return item


def step_batches(batches: MixtureBatches, rank: int, accum: int, start: int, stop: int, workers: int = 0,
                 prefetch: int = 2):
    """(step, micro-batches) for steps start .. stop - 1, in order. With `workers` > 0 they are built ahead by a
    `torch.utils.data.DataLoader`'s worker processes (`prefetch` steps each) while the model trains; the batches
    are the same either way (each a function of its step), so a resumed run still sees exactly its batches."""
    data = StepBatches(batches, rank, accum)
    steps = range(start, stop)
    if workers == 0:
        yield from ((step, data[step]) for step in steps)
        return
    import torch.utils.data

    # fork: the workers share the memory-mapped shards instead of pickling them
    loader = torch.utils.data.DataLoader(data, batch_size=None, sampler=steps, num_workers=workers,
                                         prefetch_factor=prefetch, collate_fn=_as_is, multiprocessing_context="fork")
    yield from zip(steps, loader)
