"""Distillation targets: what a frozen reasoning teacher says about the action chunks of a student's batch.

For every policy sample of the student's packed batch the teacher reads the same observation followed by
reasoning, then the action chunk (the `policy_reason` sequence of the same step). Its distribution over each action
token becomes the student's soft target, and the expected action under it the target of the student's continuous
head. The reasoning is, by default, the teacher's own: generated greedily once for every state the student will
train on (`teacher_reasoning`), so that the student learns from the same model that drives reasoning first in
closed loop. `distill.teacher_reasoning: recorded` uses the simulator's recorded sentence instead (an oracle the
teacher never has when it drives).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from unified.errors import UnifiedError
from unified.packing import Batch, collate
from unified.sequences import build

CHUNK = 32  # prompts decoded together by one worker


def expected_actions(logprobs: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    """(N, bins) log-probabilities over the bins of action dimension n % D, or (N, D * bins) over every dimension's
    own bins (a per-dimension tokenizer; row n reads its dimension's), centres (D, bins) in normalised units
    (`BinActionTokenizer.centres`) -> (N,) expected value in normalised units [-1, 1]."""
    d, bins = centres.shape
    dims = torch.arange(len(logprobs), device=logprobs.device) % d
    if logprobs.shape[1] == d * bins and d > 1:
        logprobs = torch.log_softmax(logprobs.view(len(logprobs), d, bins)[torch.arange(len(logprobs)), dims], -1)
    return (logprobs.float().exp() * centres.to(logprobs.device, torch.float32)[dims]).sum(-1)


def sample_row(shards, sample_id: str) -> int:
    """'episode E step S' -> its global row in the shards."""
    parts = sample_id.split()
    if parts[0] != "episode":
        raise UnifiedError(f"distillation: sample {sample_id!r} is not a policy sample; an action-only "
                           "student trains on data.tasks {policy: 1.0}")
    return shards.episode_start[int(parts[1])] + int(parts[3])


def student_rows(batches, steps: int, grad_accum: int, world: int) -> list[int]:
    """Every shard row a run will train on: batches are a function of (step, part), so the states a student sees are
    known before it starts."""
    rows = set()
    for step in range(steps):
        for part in range(grad_accum * world):
            batch = batches.batch(step, part)
            rows.update(sample_row(batches.shards, i) for ids in batch.sample_ids for i in ids)
    return sorted(rows)


def _prompt(shards, row: int, state_dims: int | None = None, frames: bool = True) -> list[int]:
    """The policy prompt of a row, up to (not including) where reasoning or actions begin."""
    built = build(shards.sample("policy", row, state_dims=state_dims, frames=frames), shards.layout)
    return built.ids[:built.spans["actions"][0]].tolist()


def _key(prompt: list[int]) -> str:
    return hashlib.sha256(np.asarray(prompt, np.int64).tobytes()).hexdigest()[:32]


class _Worker:
    model = None

    @classmethod
    def setup(cls, teacher: str) -> None:
        import signal

        from unified.model_dir import load_model

        signal.signal(signal.SIGINT, signal.SIG_IGN)
        torch.set_num_threads(1)
        cls.model = load_model(teacher)[0]

    @classmethod
    def run(cls, prompts: list[list[int]]) -> list[list[int]]:
        return reason_batch(cls.model, prompts)


def reason_batch(model, prompts: list[list[int]]) -> list[list[int]]:
    """The model's greedy reasoning (global text ids, without the markers) after each prompt + `<reason>`."""
    from unified.generation import generate_batch

    layout = model.layout
    return generate_batch(model, [p + [layout.special("<reason>")] for p in prompts], layout.mask("text"),
                          layout.special("</reason>"), model.config.max_reason_tokens)


def teacher_reasoning(teacher: str | Path, shards, rows: list[int], workers: int = 1,
                      progress: bool = True) -> dict[int, np.ndarray]:
    """The teacher's own explanation (global text ids) for each shard row, generated once by `workers` processes
    and cached in TEACHER/cache/, keyed by the teacher's weights and the prompt, so that a rerun (or another
    student of the same teacher) generates nothing again."""
    from unified.model_dir import weights_fingerprint
    from unified.workers import pool_results

    teacher = Path(teacher)
    path = teacher / "cache" / f"reasoning-{weights_fingerprint(teacher)[:16]}.npz"
    cached: dict[str, np.ndarray] = {}
    if path.is_file():
        with np.load(path) as f:
            offsets = f["offsets"]
            cached = {k: f["ids"][offsets[i]:offsets[i + 1]] for i, k in enumerate(f["keys"].tolist())}
    import json

    from unified.config import from_dict
    from unified.model import ModelConfig

    info = teacher / "unified.json"
    reads = from_dict(ModelConfig, json.loads(info.read_text())["model"], f"{info}: model")
    prompts = {row: _prompt(shards, row, reads.state_dims, reads.policy_frames) for row in rows}
    keys = {row: _key(p) for row, p in prompts.items()}
    todo = sorted({keys[r]: r for r in rows if keys[r] not in cached}.values())
    if todo:
        chunks = [todo[i:i + CHUNK] for i in range(0, len(todo), CHUNK)]
        bar = tqdm(total=len(todo), desc="teacher reasoning", unit="state", disable=not progress, dynamic_ncols=True)
        batches = [[prompts[r] for r in c] for c in chunks]
        try:
            with pool_results(max(1, min(workers, len(chunks))), _Worker.setup, (str(teacher),), _Worker.run,
                              batches, ordered=True) as generated:
                for chunk, texts in zip(chunks, generated):
                    for row, text in zip(chunk, texts):
                        cached[keys[row]] = np.asarray(text, np.int64)
                    bar.update(len(chunk))
        finally:
            bar.close()
        _save_cache(path, cached)
    return {row: cached[keys[row]] for row in rows}


def _save_cache(path: Path, cached: dict[str, np.ndarray]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    names = list(cached)
    offsets = np.cumsum([0] + [len(cached[k]) for k in names]).astype(np.int64)
    ids = np.concatenate([cached[k] for k in names]).astype(np.int64) if names else np.zeros(0, np.int64)
    temporary = path.with_name(f".{path.name}.tmp{os.getpid()}.npz")
    np.savez(temporary, keys=np.array(names), offsets=offsets, ids=ids)
    os.replace(temporary, path)


@torch.no_grad()
def distill_targets(teacher, shards, batch: Batch, temperature: float = 1.0, centres: torch.Tensor | None = None,
                    device="cpu", reasoning: dict[int, np.ndarray] | None = None,
                    teacher_head: bool = False) -> dict[str, torch.Tensor]:
    """Soft targets for the student's batch: `soft_index` (N, 2) [row, position] of every position whose next token
    is an action token, `soft_logprobs` (N, A) the teacher's log-probabilities over the action bins there (at
    `temperature`), and `head_targets` (S, H, D): given the bin `centres` (D, A) the teacher's expected chunks,
    with `teacher_head` the chunks its continuous head writes. The teacher reads `reasoning[row]` (its own, see
    `teacher_reasoning`) before the chunk, or the recorded sentence when `reasoning` is None."""
    layout = shards.layout
    action = teacher.action_segment  # the action bins, or the FAST tokens: the same segment as the student's
    sequences = []
    for ids in batch.sample_ids:
        for sample_id in ids:
            row = sample_row(shards, sample_id)
            sample = shards.sample("policy_reason", row, state_dims=teacher.config.state_dims,
                                   frames=teacher.config.policy_frames)
            if reasoning is not None:
                if row not in reasoning:
                    raise UnifiedError(f"distillation: no teacher reasoning for {sample_id!r} (row {row}); the "
                                       "states a run trains on are generated before it starts")
                sample.reason = reasoning[row]
            sequences.append(build(sample, layout))
    tensors = collate([[s] for s in sequences], max(len(s) for s in sequences), layout).to_torch(device)
    logits, _, *hidden = teacher.logits(tensors["input_ids"], tensors["attention_mask"], tensors["position_ids"],
                                        hidden=teacher_head)  # the last hidden states only for the teacher's head
    targets = tensors["targets"]
    in_teacher = (targets >= action.start) & (targets < action.stop)  # (S, T): one sample per row, in order
    logprobs = F.log_softmax(logits[in_teacher][:, action.start:action.stop].float() / temperature, -1)
    student_targets = torch.from_numpy(batch.targets)
    in_student = (student_targets >= action.start) & (student_targets < action.stop)
    index = in_student.nonzero()  # (N, 2), row-major: the samples of row 0 in order, then row 1, ...
    if len(index) != len(logprobs):
        raise UnifiedError(f"distillation: the student's batch has {len(index)} action positions, the teacher's "
                           f"sequences {len(logprobs)}; the two do not read the same samples")
    out = {"soft_index": index.to(device), "soft_logprobs": logprobs}
    if teacher_head and len(batch.head_index):
        chunks = teacher.continuous_actions(hidden[0], tensors["head_index"], tensors["head_states"])
        if chunks.shape != batch.head_targets.shape:
            raise UnifiedError(f"distillation: the teacher's head wrote chunks of shape {tuple(chunks.shape)}, the "
                               f"student's head learns {batch.head_targets.shape}")
        out["head_targets"] = chunks.float().clamp(-1, 1).to(device)
    elif centres is not None and len(batch.head_index):
        per_chunk = batch.head_targets.shape[1] * batch.head_targets.shape[2]
        chunks = expected_actions(logprobs, centres).reshape(-1, per_chunk)
        if len(chunks) != len(batch.head_index):
            raise UnifiedError(f"distillation: {len(chunks)} teacher chunks for {len(batch.head_index)} samples")
        out["head_targets"] = chunks.reshape(batch.head_targets.shape).to(device)
    return out


class Teacher:
    """A frozen teacher for `distill.teacher`: its model on the training device, the bin centres its expected
    chunks are read with (for a student's continuous head that learns them), and its reasoning for every state the
    run will train on (generated once by rank 0's worker processes, cached beside the teacher)."""

    def __init__(self, config, shards, batches, world: int, device):
        from unified.model_dir import load_model
        from unified.train import on_rank_zero

        if set(t for t, w in config.data.tasks.items() if w > 0) != {"policy"}:
            raise UnifiedError("distillation trains an action-only student: set data.tasks to {policy: 1.0}")
        self.settings, self.shards, self.device = config.distill, shards, device
        self.model, tokenizers, _ = load_model(config.distill.teacher, device=str(device))
        if self.model.config.action_tokens != config.model.action_tokens:
            raise UnifiedError(f"distill.teacher {config.distill.teacher}: writes its actions as "
                               f"{self.model.config.action_tokens}, the student as {config.model.action_tokens} "
                               "(model.action_tokens): the soft targets are over the same tokens")
        if self.model.config.inductive_reason:
            raise UnifiedError(f"distill.teacher {config.distill.teacher}: reasons in the inductive form "
                               "(model.inductive_reason), which distillation does not read yet (it lays the teacher's "
                               "reasoning out whole); distil a teacher trained without it")
        if self.model.layout != shards.layout:
            raise UnifiedError(f"distill.teacher {config.distill.teacher}: its layout differs from the data's")
        self.model.requires_grad_(False)
        # The continuous head, if any, learns the teacher's expected chunk, its head's chunk or the recorded one.
        head_from_teacher = config.model.action_head and config.distill.head_target == "teacher"
        if head_from_teacher and config.model.action_tokens == "fast":
            raise UnifiedError("distill.head_target: teacher reads the teacher's expected chunk from its bins; a FAST "
                               "teacher has none: use distill.head_target: ground_truth")
        self.teacher_head = config.model.action_head and config.distill.head_target == "teacher_head"
        if self.teacher_head and self.model.action_head is None:
            raise UnifiedError(f"distill.head_target: teacher_head reads the teacher's continuous head; "
                               f"{config.distill.teacher} has none (model.action_head: false): use teacher or "
                               "ground_truth")
        self.centres = torch.from_numpy(tokenizers.action.centres()) if head_from_teacher else None
        self.reasoning = None
        if config.distill.teacher_reasoning == "generated":
            rows = student_rows(batches, config.steps, config.optim.grad_accum, world)
            on_rank_zero(lambda: teacher_reasoning(config.distill.teacher, shards, rows, config.distill.workers,
                                                   progress=True), "generating the teacher's reasoning")
            self.reasoning = teacher_reasoning(config.distill.teacher, shards, rows, progress=False)

    def targets(self, batch: Batch) -> dict[str, torch.Tensor]:
        """What the student's loss needs beside its batch: the soft targets and the distillation weights."""
        d = self.settings
        tensors = distill_targets(self.model, self.shards, batch, d.temperature, self.centres, self.device,
                                  self.reasoning, self.teacher_head)
        tensors["distill"] = torch.tensor([d.ce_weight, d.kl_weight, d.temperature])
        return tensors
