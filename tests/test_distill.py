"""Distillation targets from a frozen teacher, and the soft-target loss of the student."""

from pathlib import Path

import numpy as np
import pytest
import torch

from unified.batches import MixtureBatches
from unified.data.shards import TokenShards
from unified.distill import distill_targets, expected_actions
from unified.errors import UnifiedError
from unified.model import ModelConfig, UnifiedModel

TINY = dict(hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128, max_position_embeddings=256, horizon=4)


@pytest.fixture(scope="module")
def shards(model_data):
    return TokenShards(model_data / "shards")


def centres(shards):
    from unified.tokenizers.action import BinActionTokenizer

    return BinActionTokenizer.from_pretrained(Path(shards.meta["tokenizer"]) / "action").centres()


def tiny(layout, seed=0, **extra):
    torch.manual_seed(seed)
    return UnifiedModel(ModelConfig(**(TINY | extra)), layout).eval()


def test_expected_actions_are_bin_centres_under_certainty():
    bins = 8
    centres = torch.stack([(torch.arange(bins) + 0.5) / bins * 2 - 1, torch.linspace(-1, 1, bins)])  # (D=2, bins)
    certain = torch.full((3, bins), -1e9)
    certain[0, 0], certain[1, 7], certain[2, 3] = 0.0, 0.0, 0.0  # rows alternate dimensions 0, 1, 0
    np.testing.assert_allclose(expected_actions(certain, centres).numpy(), [-7 / 8, 1.0, -1 / 8], atol=1e-6)
    uniform = torch.log(torch.full((1, bins), 1 / bins))
    assert abs(float(expected_actions(uniform, centres)[0])) < 1e-6


def test_teacher_targets_line_up_with_the_students_action_positions(shards):
    teacher = tiny(shards.layout, seed=1)
    batch = MixtureBatches(shards, {"policy": 1.0}, 256, 2, seed=0).batch(0)
    targets = distill_targets(teacher, shards, batch, centres=torch.from_numpy(centres(shards)))
    action = shards.layout.segment("action")
    is_action = (batch.targets >= action.start) & (batch.targets < action.stop)
    samples = sum(len(row) for row in batch.sample_ids)
    assert len(targets["soft_index"]) == is_action.sum() == samples * 4 * 2  # H steps x 2 dimensions each
    assert torch.allclose(targets["soft_logprobs"].exp().sum(-1), torch.ones(len(targets["soft_index"])))
    assert targets["head_targets"].shape == batch.head_targets.shape
    assert targets["head_targets"].abs().max() <= 1.0
    # The teacher reads its own reasoning first: its targets differ from what it says without reasoning.
    student_view, _ = teacher.logits(*(batch.to_torch()[k] for k in ("input_ids", "attention_mask", "position_ids")))
    index = targets["soft_index"]
    direct = torch.log_softmax(student_view[index[:, 0], index[:, 1], action.start:action.stop], -1)
    assert not torch.allclose(direct, targets["soft_logprobs"], atol=1e-3)


def test_soft_target_loss_is_zero_against_itself_and_weighs_the_cross_entropy(shards):
    student = tiny(shards.layout)
    batch = MixtureBatches(shards, {"policy": 1.0}, 256, 2, seed=0).batch(0)
    tensors = batch.to_torch()
    plain, _ = student(tensors)
    action = shards.layout.segment("action")
    index = torch.from_numpy(np.argwhere((batch.targets >= action.start) & (batch.targets < action.stop)))
    with torch.no_grad():
        logits, _ = student.logits(tensors["input_ids"], tensors["attention_mask"], tensors["position_ids"])
    own = torch.log_softmax(logits[index[:, 0], index[:, 1], action.start:action.stop], -1)
    tensors |= {"soft_index": index, "soft_logprobs": own, "distill": torch.tensor([0.5, 1.0, 1.0])}
    loss, metrics = student(tensors)
    assert float(metrics["loss/distill_kl"]) == pytest.approx(0.0, abs=1e-5)
    torch.testing.assert_close(loss, 0.5 * plain, rtol=1e-5, atol=1e-6)
    tensors["soft_logprobs"] = torch.log_softmax(torch.randn_like(own), -1)
    loss, metrics = student(tensors)
    assert float(metrics["loss/distill_kl"]) > 0.1 and float(loss) > float(0.5 * plain)


def test_a_batch_with_other_tasks_is_refused(shards):
    teacher = tiny(shards.layout)
    batch = MixtureBatches(shards, {"policy": 1.0, "text": 1.0}, 256, 2, seed=0).batch(0)
    with pytest.raises(UnifiedError, match="not a policy sample"):
        distill_targets(teacher, shards, batch)


def test_a_student_with_a_continuous_head_learns_the_teachers_expected_chunk(shards):
    teacher, student = tiny(shards.layout, seed=1), tiny(shards.layout, action_head=True)
    batch = MixtureBatches(shards, {"policy": 1.0}, 256, 2, seed=0).batch(0)
    tensors = batch.to_torch() | distill_targets(teacher, shards, batch, centres=torch.from_numpy(centres(shards)))
    tensors["distill"] = torch.tensor([0.0, 0.0, 1.0])  # only the head's L1 remains
    loss, metrics = student(tensors)
    assert float(loss) == pytest.approx(float(metrics["loss/action_head_l1"]), rel=1e-5)
    ground_truth = batch.to_torch()
    ground_truth["distill"] = tensors["distill"]
    ground_truth |= {k: tensors[k] for k in ("soft_index", "soft_logprobs")}
    other, _ = student(ground_truth)
    assert float(other) != pytest.approx(float(loss))  # the head's target really is the teacher's


def test_a_student_head_can_learn_the_chunk_the_teachers_head_writes(shards):
    from unified.distill import sample_row
    from unified.sequences import build

    teacher = tiny(shards.layout, seed=1, action_head=True)
    batch = MixtureBatches(shards, {"policy": 1.0}, 256, 2, seed=0).batch(0)
    targets = distill_targets(teacher, shards, batch, teacher_head=True)["head_targets"]
    assert targets.shape == batch.head_targets.shape
    # Each is what the teacher's head writes reading that state's prompt and reasoning alone, as it acts.
    ids = [sample_id for row in batch.sample_ids for sample_id in row]
    for k in (0, len(ids) - 1):
        built = build(shards.sample("policy_reason", sample_row(shards, ids[k])), shards.layout)
        prompt = torch.tensor(built.ids[:built.spans["actions"][0] + 1])[None]
        n = prompt.shape[1]
        _, _, hidden = teacher.logits(prompt, torch.ones(n, n, dtype=torch.bool).tril()[None, None],
                                      torch.arange(n)[None], hidden=True)
        alone = teacher.continuous_actions(hidden, torch.tensor([[0, 0, n - 1]])).clamp(-1, 1)[0]
        torch.testing.assert_close(targets[k], alone, atol=1e-4, rtol=1e-4)
    # They are not the teacher's expected chunk under its action tokens.
    bins = distill_targets(teacher, shards, batch, centres=torch.from_numpy(centres(shards)))["head_targets"]
    assert not torch.allclose(bins, targets, atol=1e-3)


def test_batched_reasoning_decodes_each_prompt_as_it_would_alone(shards):
    """Left-padded batch decoding (the teacher's reasoning for distillation) equals one prompt at a time."""
    from unified.distill import _prompt, reason_batch
    from unified.generation import Decoder

    teacher = tiny(shards.layout, seed=2, max_reason_tokens=6)
    layout = shards.layout
    rows = [int(r) for r in shards.index("policy")[::7][:5]]
    prompts = [_prompt(shards, r) for r in rows]
    prompts[1] = prompts[1][:-5]  # prompts of different lengths: the batch pads them
    batched = reason_batch(teacher, prompts)
    for prompt, got in zip(prompts, batched):
        decoder = Decoder(teacher)
        decoder.feed(prompt + [layout.special("<reason>")])
        alone = decoder.generate(layout.mask("text"), stop=layout.special("</reason>"), max_tokens=6)
        assert got == alone
    assert any(batched)


@pytest.mark.slow
def test_the_teacher_reads_its_own_reasoning_generated_once_and_cached(shards, model_data, tmp_path, monkeypatch):
    from unified.tokenizers.fit import Tokenizers

    import unified.workers
    from unified.data.store import EpisodeStore
    from unified.distill import student_rows, teacher_reasoning
    from unified.model_dir import save_model
    from unified.policy import Policy

    tokenizers = Tokenizers.from_pretrained(model_data / "tok")
    teacher = tiny(shards.layout, seed=3, max_reason_tokens=6)
    save_model(teacher, tokenizers, tmp_path / "teacher")
    batches = MixtureBatches(shards, {"policy": 1.0}, 256, 2, seed=0)
    rows = student_rows(batches, steps=3, grad_accum=1, world=2)  # every state the run will train on
    seen = {sample_row_of(shards, i) for s in range(3) for r in range(2) for row in batches.batch(s, r).sample_ids
            for i in row}
    assert set(rows) == seen
    reasoning = teacher_reasoning(tmp_path / "teacher", shards, rows, workers=2, progress=False)
    assert set(reasoning) == set(rows) and list((tmp_path / "teacher" / "cache").glob("reasoning-*.npz"))
    # What was generated is what the teacher says when it drives: Policy.act on the same observation.
    policy = Policy.from_pretrained(tmp_path / "teacher")
    store = EpisodeStore(model_data / "store")
    for row in rows[:3]:
        episode = store.read_episode(int(shards.arrays["episode"][row]))
        t = int(shards.arrays["step"][row])
        said = policy.act(episode.frames[t:t + 1], episode.instruction, state=episode.states[t], reason=True)
        text = tokenizers.text.decode([shards.layout.to_local("text", reasoning[row])])[0] if len(reasoning[row]) \
            else ""
        assert said.reasoning == text
    # A second run of the same teacher generates nothing: the cache answers.
    monkeypatch.setattr(unified.workers, "spawn_pool", lambda *a, **k: pytest.fail("generated again"))
    again = teacher_reasoning(tmp_path / "teacher", shards, rows, workers=2, progress=False)
    assert all(np.array_equal(again[r], reasoning[r]) for r in rows)
    # The targets follow the reasoning the teacher read: its own and the recorded sentence give different ones.
    batch = batches.batch(0, 0)
    own = distill_targets(teacher, shards, batch, reasoning=reasoning)["soft_logprobs"]
    recorded = distill_targets(teacher, shards, batch)["soft_logprobs"]
    assert own.shape == recorded.shape and not torch.allclose(own, recorded, atol=1e-4)


def sample_row_of(shards, sample_id):
    from unified.distill import sample_row

    return sample_row(shards, sample_id)
