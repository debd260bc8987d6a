"""Sequence builders, one per task, each a pure function from a sample to (ids, targets, weights).

    policy_reason : <bos> instruction <img> f_t </img> [<state> s_t </state>] <reason> text </reason> CHUNK
    policy        : <bos> instruction <img> f_t </img> [<state> s_t </state>] CHUNK
    world         : <bos> <img> f_t </img> CHUNK <img> f_t+H </img>
    text          : <bos> question <reason> steps </reason> answer <eos>
    text, inductive: <bos> question <reason> s1 <step> | s1 <step> s2 <step> | s2 <step> s3 ... | sK-1 <step> sK
                    </reason> answer <eos>   (each | starts a group; see `build_text`)
    policy_reason, inductive: ... <reason> s1 <step> | s1 <step> s2 </reason> | s2 </reason> CHUNK
                    (the causation sentence's clauses as steps, the chunk as a last one; see `_inductive_reason`)
    CHUNK         : <act> a_t <act> a_t+1 ... <act> a_t+H-1 </act>          (model.action_tokens: bins)
                    <act> f_1 f_2 ... f_n </act>                           (fast: the chunk's n FAST tokens)

All ids are global (see `TokenLayout`). `targets[i]` is the token position i must predict (ids[i + 1]) where
that token lies in a target span, else IGNORE; `weights[i]` is its loss weight. `action_block[i]` numbers the
action blocks (one per step of the chunk: its `<act>` marker and its D tokens) so that the attention mask can
hide the other blocks. Each block is predicted from its own marker, never from another block, so a decoder can
write all H steps of a chunk at once, in D forward passes (`Decoder.generate_blocks`).

The inductive scratchpad (Abbe et al., "How far can transformers reason?"): a step k >= 2 is preceded by a copy of
step k - 1 (not a target), and `group[i]` lets a token of group k >= 1 see the prefix (group 0: the question) and its
own group only, while `positions` restart after the question for every group. So every step is written from the
question and the step before it, at the same positions, whatever its number: step 12 looks like step 2.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from unified.errors import UnifiedError
from unified.layout import TokenLayout

IGNORE = -100
TASKS = ("policy_reason", "policy", "world", "text")


@dataclass
class Sample:
    """One training example in global ids. Which fields are used depends on `task`."""

    task: str
    frames: np.ndarray | None = None  # (history, tokens_per_image) image codes, oldest first
    actions: np.ndarray | None = None  # (H, D) action ids of the chunk a_t .. a_t+H-1
    instruction: np.ndarray | None = None  # (n,) text ids
    state: np.ndarray | None = None  # (S,) state ids, or None to leave the state out
    reason: np.ndarray | None = None  # (n,) text ids of the causation sentence
    next_frame: np.ndarray | None = None  # (tokens_per_image,) image codes of f_t+H
    question: np.ndarray | None = None  # (n,) text ids (text task)
    steps: np.ndarray | None = None  # (n,) text ids of the scratchpad, may be empty (text task)
    answer: np.ndarray | None = None  # (n,) text ids (text task)
    reason_list: list[np.ndarray] | None = None  # the reasoning's steps, each (n,) text ids: its inductive form
    step_list: list[np.ndarray] | None = None  # the scratchpad's steps, each (n,) text ids: its inductive form
    drill_list: list[tuple[np.ndarray, np.ndarray]] | None = None  # inductive lookup drills: (context, step) ids
    action_values: np.ndarray | None = None  # (H, D) the chunk normalised to [-1, 1], for a continuous head
    state_values: np.ndarray | None = None  # (S,) the ego state normalised to [-1, 1], for a head that reads it
    fast_actions: np.ndarray | None = None  # (n,) the chunk's FAST ids: written instead of `actions` when given
    id: str = ""  # where it came from, e.g. "episode 12 step 40", for error reports


@dataclass
class Built:
    ids: np.ndarray  # (L,) int64
    targets: np.ndarray  # (L,) int64, IGNORE where nothing is predicted
    weights: np.ndarray  # (L,) float32
    action_block: np.ndarray  # (L,) int16, -1 outside action blocks
    task: str
    id: str = ""
    spans: dict[str, tuple[int, int]] = field(default_factory=dict)  # name -> [start, stop) positions
    action_values: np.ndarray | None = None  # (H, D) normalised chunk (policy tasks), for a continuous head
    state_values: np.ndarray | None = None  # (S,) normalised ego state (policy tasks), for a head that reads it
    group: np.ndarray | None = None  # (L,) int16, an inductive scratchpad's groups (0: the prefix); None: none
    positions: np.ndarray | None = None  # (L,) int64 position ids; None: 0, 1, ... L - 1

    def __len__(self) -> int:
        return len(self.ids)


class _Writer:
    """Appends spans, remembering which are targets and which positions are action blocks."""

    def __init__(self, layout: TokenLayout):
        self.layout = layout
        self.ids: list[np.ndarray] = []
        self.is_target: list[np.ndarray] = []
        self.factor: list[np.ndarray] = []  # each token's loss weight, relative to its task's
        self.block: list[np.ndarray] = []
        self.group: list[np.ndarray] = []
        self.positions: list[np.ndarray] = []
        self.grouped = False
        self.spans: dict[str, tuple[int, int]] = {}
        self.length = 0
        self.next_position = 0

    def add(self, tokens, target=False, name: str | None = None, block: np.ndarray | None = None,
            group: int = -1, position: int | None = None, weight: float = 1.0) -> None:
        """Append `tokens`; `target` is one flag for all of them or one per token, `weight` their loss weight
        relative to the task's. `group` (inductive form) and `position` (the first token's position id; by default
        the next one) are for the inductive scratchpad."""
        tokens = np.atleast_1d(np.asarray(tokens, np.int64))
        if name:
            self.spans[name] = (self.length, self.length + len(tokens))
        self.ids.append(tokens)
        self.is_target.append(np.broadcast_to(np.asarray(target, bool), tokens.shape))
        self.factor.append(np.full(len(tokens), weight, np.float32))
        self.block.append(np.full(len(tokens), -1, np.int16) if block is None else block.astype(np.int16))
        self.group.append(np.full(len(tokens), group, np.int16))
        self.grouped = self.grouped or group >= 0
        first = self.next_position if position is None else position
        self.positions.append(first + np.arange(len(tokens)))
        self.next_position = first + len(tokens)
        self.length += len(tokens)

    def special(self, token: str, target: bool = False, group: int = -1) -> None:
        self.add([self.layout.special(token)], target, group=group)

    def finish(self, task: str, sample_id: str, image_weight: float, task_weight: float) -> Built:
        ids = np.concatenate(self.ids)
        is_target = np.concatenate(self.is_target)
        targets = np.full(len(ids), IGNORE, np.int64)
        # Position i predicts token i + 1.
        targets[:-1] = np.where(is_target[1:], ids[1:], IGNORE)
        factor = np.concatenate(self.factor)
        weights = np.zeros(len(ids), np.float32)
        weights[:-1] = np.where(targets[:-1] != IGNORE, task_weight * factor[1:], 0.0)
        image = self.layout.mask("image")
        predicts_image = (targets != IGNORE) & image[np.clip(targets, 0, None)]
        weights[predicts_image] *= image_weight
        built = Built(ids, targets, weights, np.concatenate(self.block), task, sample_id, self.spans)
        if self.grouped:
            built.group, built.positions = np.concatenate(self.group), np.concatenate(self.positions)
        return built


def _need(sample: Sample, *names: str) -> None:
    missing = [n for n in names if getattr(sample, n) is None]
    if missing:
        raise UnifiedError(f"sample {sample.id!r} ({sample.task}): missing {', '.join(missing)}")
    if sample.instruction is not None and "instruction" in names and len(sample.instruction) == 0:
        raise UnifiedError(f"sample {sample.id!r}: the instruction has no tokens")


def _observation(w: _Writer, sample: Sample) -> None:
    """instruction <img> f </img> ... [<state> s </state>], shared by both policy tasks."""
    w.special("<bos>")
    w.add(sample.instruction, name="instruction")
    for k, frame in enumerate(np.atleast_2d(sample.frames)):
        w.special("<img>")
        w.add(frame, name=f"frame{k}")
        w.special("</img>")
    if sample.state is not None:
        w.special("<state>")
        w.add(sample.state, name="state")
        w.special("</state>")


def action_chunk(actions: np.ndarray, layout: TokenLayout) -> tuple[np.ndarray, np.ndarray]:
    """(H, D) action ids -> the chunk's ids `<act> a_t <act> a_t+1 ...` (H * (D + 1),) and the block of each
    (its step). The closing `</act>` is not included."""
    actions = np.atleast_2d(actions)
    h, d = actions.shape
    ids = np.concatenate([np.full((h, 1), layout.special("<act>")), actions], 1).reshape(-1)
    return ids, np.repeat(np.arange(h), d + 1)


def _action_chunk(w: _Writer, sample: Sample, target: bool, group: int = -1) -> None:
    """CHUNK: each step's marker is never a target; its D action tokens are when `target`. A FAST chunk is one
    span after its marker, in causal order (no blocks), closed by `</act>`, which a decoder stops at. `group`: the
    inductive reasoning's group of the chunk."""
    if sample.fast_actions is not None:
        fast = np.asarray(sample.fast_actions, np.int64)
        w.add(np.concatenate([[w.layout.special("<act>")], fast]), target=np.r_[False, np.full(len(fast), target)],
              name="actions", group=group)
        w.special("</act>", target=target, group=group)
        return
    actions = np.atleast_2d(sample.actions)
    ids, blocks = action_chunk(actions, w.layout)
    is_target = np.tile([False] + [target] * actions.shape[1], len(actions))
    w.add(ids, target=is_target, name="actions", block=blocks, group=group)
    w.special("</act>", target=target, group=group)


def build_policy(sample: Sample, layout: TokenLayout, reason: bool, image_weight: float = 0.04,
                 task_weight: float = 1.0) -> Built:
    """The policy tasks: targets are the reasoning (if `reason`) and the action chunk."""
    _need(sample, "instruction", "frames", "actions", *(("reason",) if reason else ()))
    w = _Writer(layout)
    _observation(w, sample)
    if reason and sample.reason_list:
        _inductive_reason(w, sample)  # the chunk too, as its last step
    else:
        if reason:
            w.special("<reason>")
            w.add(sample.reason, target=True, name="reason")
            w.special("</reason>", target=True)
        _action_chunk(w, sample, target=True)
    built = w.finish("policy_reason" if reason else "policy", sample.id, image_weight, task_weight)
    built.action_values, built.state_values = sample.action_values, sample.state_values
    return built


def _inductive_reason(w: _Writer, sample: Sample) -> None:
    """The reasoning's steps in the inductive form, then the chunk as one more step: group 0 is the observation
    and `<reason>` (positions 0..P-1); group k a copy of step k - 1 and its end marker (k >= 2, not a target) at
    positions P.., then step k and its end (targets), `<step>` or, for the last, `</reason>`; the chunk's group a
    copy of the last step and `</reason>` at P.., then the chunk. So each step, and the actions, are written from
    the observation and the step before them alone (`Policy.act` generates them so)."""
    layout = w.layout
    w.special("<reason>")
    prefix = w.length
    w.group = [np.zeros(len(ids), np.int16) for ids in w.ids]
    w.grouped = True
    steps = [np.asarray(s, np.int64) for s in sample.reason_list]
    ends = [layout.special("<step>")] * (len(steps) - 1) + [layout.special("</reason>")]
    w.next_position = prefix
    for k, (tokens, end) in enumerate(zip(steps, ends), 1):
        if k > 1:
            w.add(np.append(steps[k - 2], ends[k - 2]), group=k, position=prefix)
        w.add(np.append(tokens, end), target=True, group=k)
    chunk_group = len(steps) + 1
    w.add(np.append(steps[-1], ends[-1]), group=chunk_group, position=prefix)
    _action_chunk(w, sample, target=True, group=chunk_group)


def build_world(sample: Sample, layout: TokenLayout, image_weight: float = 0.04, task_weight: float = 1.0) -> Built:
    """The world task: from frame(s) and an action chunk, predict the frame H steps later."""
    _need(sample, "frames", "actions", "next_frame")
    w = _Writer(layout)
    w.special("<bos>")
    for k, frame in enumerate(np.atleast_2d(sample.frames)):
        w.special("<img>")
        w.add(frame, name=f"frame{k}")
        w.special("</img>")
    _action_chunk(w, sample, target=False)
    w.special("<img>")
    w.add(sample.next_frame, target=True, name="next_frame")
    w.special("</img>", target=True)
    return w.finish("world", sample.id, image_weight, task_weight)


def build_text(sample: Sample, layout: TokenLayout, image_weight: float = 0.04, task_weight: float = 1.0,
               question_weight: float = 0.0) -> Built:
    """The text task: question, then the scratchpad (possibly empty) and the answer as targets; in the inductive
    form when the sample carries its steps (`step_list`). `question_weight` > 0 makes the question's tokens targets
    too, at that weight relative to the rest."""
    _need(sample, "question", "answer")
    if sample.step_list:
        return _build_inductive(sample, layout, image_weight, task_weight, question_weight)
    w = _Writer(layout)
    w.special("<bos>")
    w.add(sample.question, name="question", target=question_weight > 0, weight=question_weight)
    w.special("<reason>")
    steps = sample.steps if sample.steps is not None else np.zeros(0, np.int64)
    w.add(steps, target=True, name="steps")
    w.special("</reason>", target=True)
    w.add(sample.answer, target=True, name="answer")
    w.special("<eos>", target=True)
    return w.finish("text", sample.id, image_weight, task_weight)


def _build_inductive(sample: Sample, layout: TokenLayout, image_weight: float, task_weight: float,
                     question_weight: float = 0.0) -> Built:
    """Group 0: `<bos> question <reason>` at positions 0..P-1. Group k: a copy of step k - 1 and its `<step>` (for
    k >= 2, not a target) at positions P.., then step k and its `<step>` (targets) right after it; the last group ends
    with `</reason> answer <eos>` instead of a `<step>`. Then one group per lookup drill (`drill_list`, made with
    `unified data operators --drills`), laid out as a step's group: its context (not a target), then its step and
    `<step>` (targets)."""
    w = _Writer(layout)
    w.special("<bos>")
    w.add(sample.question, name="question", group=0, target=question_weight > 0, weight=question_weight)
    w.add([layout.special("<reason>")], group=0)
    prefix = w.length
    step = layout.special("<step>")
    steps = [np.asarray(s, np.int64) for s in sample.step_list]
    w.group[0][:] = 0  # <bos>
    w.grouped = True
    for k, tokens in enumerate(steps, 1):
        if k > 1:
            w.add(np.append(steps[k - 2], step), group=k, position=prefix)
        else:
            w.next_position = prefix
        if k < len(steps):
            w.add(np.append(tokens, step), target=True, group=k)
        else:
            w.add(tokens, target=True, group=k)
            w.add([layout.special("</reason>")], target=True, group=k)
            w.add(sample.answer, target=True, name="answer", group=k)
            w.add([layout.special("<eos>")], target=True, group=k)
    for k, (context, tokens) in enumerate(sample.drill_list or (), len(steps) + 1):
        w.add(np.append(np.asarray(context, np.int64), step), group=k, position=prefix)
        w.add(np.append(np.asarray(tokens, np.int64), step), target=True, group=k)
    return w.finish("text", sample.id, image_weight, task_weight)


def build(sample: Sample, layout: TokenLayout, image_weight: float = 0.04, task_weights: dict | None = None,
          question_weight: float = 0.0) -> Built:
    """Dispatch on `sample.task`; `question_weight`: the text task's question as a target (`build_text`)."""
    weight = (task_weights or {}).get(sample.task, 1.0)
    if sample.task == "policy_reason":
        return build_policy(sample, layout, True, image_weight, weight)
    if sample.task == "policy":
        return build_policy(sample, layout, False, image_weight, weight)
    if sample.task == "world":
        return build_world(sample, layout, image_weight, weight)
    if sample.task == "text":
        return build_text(sample, layout, image_weight, weight, question_weight)
    raise UnifiedError(f"sample {sample.id!r}: unknown task {sample.task!r}; tasks are {', '.join(TASKS)}")


def dump(built: Built, layout: TokenLayout, decode_text=None) -> str:
    """A readable rendering of one built sample: markers by name, runs of ids by modality, targets in [..]."""
    parts = []
    for i, token in enumerate(built.ids.tolist()):
        modality = layout.modality_of(token)
        if modality == "special":
            text = layout.specials[token - layout.segment("special").start]
        elif modality == "text" and decode_text is not None:
            text = repr(decode_text([[int(layout.to_local("text", [token])[0])]])[0])
        else:
            text = f"{modality[:3]}:{int(layout.to_local(modality, [token])[0])}"
        predicted = i > 0 and built.targets[i - 1] != IGNORE
        parts.append(f"[{text}]" if predicted else text)
    return f"{built.task} {built.id} ({len(built)} tokens, targets in [brackets])\n" + " ".join(parts)
