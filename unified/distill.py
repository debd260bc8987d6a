"""Distillation targets: what a frozen reasoning teacher says about the action chunks of a student's batch.

For every policy sample of the student's packed batch the teacher reads the same observation followed by its
own reasoning (the `policy_reason` sequence of the same step). Its distribution over each action token becomes
the student's soft target, and the expected action under it the target of the student's continuous head.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from unified.errors import UnifiedError
from unified.packing import Batch, collate
from unified.sequences import build


def expected_actions(logprobs: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    """(N, bins) log-probabilities over the bins of action dimension n % D, centres (D, bins) in normalised units
    (`BinActionTokenizer.centres`) -> (N,) expected value in normalised units [-1, 1]."""
    dims = torch.arange(len(logprobs), device=logprobs.device) % len(centres)
    return (logprobs.float().exp() * centres.to(logprobs.device, torch.float32)[dims]).sum(-1)


@torch.no_grad()
def distill_targets(teacher, shards, batch: Batch, temperature: float = 1.0, centres: torch.Tensor | None = None,
                    device="cpu") -> dict[str, torch.Tensor]:
    """Soft targets for the student's batch: `soft_index` (N, 2) [row, position] of every position whose next token
    is an action token, `soft_logprobs` (N, A) the teacher's log-probabilities over the action bins there (at
    `temperature`), and, given the bin `centres` (D, A), `head_targets` (S, H, D) the teacher's expected chunks."""
    layout = shards.layout
    action = layout.segment("action")
    sequences = []
    for ids in batch.sample_ids:
        for sample_id in ids:
            parts = sample_id.split()  # "episode E step S"
            if parts[0] != "episode":
                raise UnifiedError(f"distillation: sample {sample_id!r} is not a policy sample; an action-only "
                                   "student trains on data.tasks {policy: 1.0}")
            row = shards.episode_start[int(parts[1])] + int(parts[3])
            sequences.append(build(shards.sample("policy_reason", row), layout))
    tensors = collate([[s] for s in sequences], max(len(s) for s in sequences), layout).to_torch(device)
    logits, _ = teacher.logits(tensors["input_ids"], tensors["attention_mask"], tensors["position_ids"])
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
    if centres is not None and len(batch.head_index):
        per_chunk = batch.head_targets.shape[1] * batch.head_targets.shape[2]
        chunks = expected_actions(logprobs, centres).reshape(-1, per_chunk)
        if len(chunks) != len(batch.head_index):
            raise UnifiedError(f"distillation: {len(chunks)} teacher chunks for {len(batch.head_index)} samples")
        out["head_targets"] = chunks.reshape(batch.head_targets.shape).to(device)
    return out
