"""The driving policy's reasoning in the inductive form (`model.inductive_reason`): the causation sentence split
into its cause and its decision, the chunk written as a last step, training logits equal to a context truncated by
hand, and `Policy.act` cropping its cache so that it computes what training computed."""

import itertools

import numpy as np
import pytest
import torch
from unified.eval.reasoning import parse
from unified.tokenizers.fit import Tokenizers

from unified.data.shards import TokenShards
from unified.errors import UnifiedError
from unified.generation import Decoder
from unified.model import ModelConfig, UnifiedModel
from unified.packing import collate, pack
from unified.policy import Policy
from unified.sequences import IGNORE, build
from unified.sim.causation import CAUSES, DECISIONS, describe, reason_steps

TINY = dict(hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128, max_position_embeddings=256, horizon=4)


@pytest.fixture(scope="module")
def shards(model_data):
    return TokenShards(model_data / "shards")


@pytest.fixture(scope="module")
def tokenizers(model_data):
    return Tokenizers.from_pretrained(model_data / "tok")


def a_reason_row(shards) -> int:
    rows = shards.index("policy_reason")
    return int(rows[len(rows) // 2])


def test_every_sentence_splits_into_its_cause_and_decision_and_joins_back():
    for cause, decision in itertools.product(CAUSES, DECISIONS):
        text = describe(cause, decision, np.array([18.0, -3.0]), np.array([-4.0, 0.0]))
        steps = reason_steps(text)
        assert len(steps) == 2 and steps[1].startswith("so I ") and steps[0].endswith(",")
        assert " ".join(steps) == text and parse(" ".join(steps)) == parse(text)
    assert reason_steps("Something else.") == ["Something else."]


def test_the_inductive_reason_form(shards):
    layout = shards.layout
    row = a_reason_row(shards)
    whole = build(shards.sample("policy_reason", row), layout)
    sample = shards.sample("policy_reason", row, inductive_reason=True)
    assert len(sample.reason_list) == 2
    built = build(sample, layout)
    step, close = layout.special("<step>"), layout.special("</reason>")
    prefix = np.flatnonzero(built.group == 0)
    assert list(prefix) == list(range(len(prefix))) and built.ids[prefix[-1]] == layout.special("<reason>")
    assert list(built.ids[prefix]) == list(whole.ids[:len(prefix)])  # the observation as the whole form has it
    cause, decision = (list(s) for s in sample.reason_list)
    groups = [built.ids[built.group == k].tolist() for k in (1, 2, 3)]
    assert groups[0] == cause + [step]
    assert groups[1] == cause + [step] + decision + [close]
    chunk = whole.ids[whole.spans["actions"][0]:].tolist()
    assert groups[2] == decision + [close] + chunk  # the chunk sees the decision, not the cause
    for k in (1, 2, 3):  # every group starts right after the prefix
        assert built.positions[built.group == k][0] == len(prefix)
    # copies are never predicted; the steps, their markers and the action tokens are
    for k, copied in ((2, len(cause) + 1), (3, len(decision) + 1)):
        where = np.flatnonzero(built.group == k)
        assert (built.targets[where[:copied] - 1] == IGNORE).all()
    start, whole_start = built.spans["actions"][0], whole.spans["actions"][0]
    assert start == np.flatnonzero(built.group == 3)[len(decision) + 1]
    assert built.targets[start - 1:].tolist() == whole.targets[whole_start - 1:].tolist()  # the chunk's targets


def test_training_logits_equal_a_truncated_context(shards):
    """A packed training row (beside another sample) computes, for each group, what a fresh decoder fed only the
    observation and that group computes: the mask, the positions and the action blocks leave nothing else in."""
    layout = shards.layout
    torch.manual_seed(0)
    model = UnifiedModel(ModelConfig(**TINY), layout).eval()
    other = build(shards.sample("world", int(shards.index("world")[0])), layout)
    built = build(shards.sample("policy_reason", a_reason_row(shards), inductive_reason=True), layout)
    batch = collate([[other, built]], len(other) + len(built), layout).to_torch()
    with torch.no_grad():
        logits = model.logits(batch["input_ids"], batch["attention_mask"], batch["position_ids"])[0][0]
    prefix = np.flatnonzero(built.group == 0)
    for k in (1, 2, 3):
        decoder = Decoder(model)
        decoder.feed(built.ids[prefix])
        mine = np.flatnonzero(built.group == k)
        reference = decoder.feed(built.ids[mine], built.action_block[mine], built.positions[mine])
        np.testing.assert_allclose(logits[len(other) + mine].numpy(), reference.numpy(), atol=2e-5, rtol=1e-4)


def test_act_crops_its_cache_and_sees_what_training_saw(shards, tokenizers, monkeypatch):
    """`Policy.act` forced through the recorded reasoning computes, at every choice, the logits the training row
    computes for that target, returns the sentence, and writes the chunk after the observation and the decision
    alone, at the positions training gave them."""
    layout = shards.layout
    torch.manual_seed(0)
    model = UnifiedModel(ModelConfig(**TINY, inductive_reason=True), layout).eval()
    sample = shards.sample("policy_reason", a_reason_row(shards), inductive_reason=True)
    built = build(sample, layout)
    batch = next(iter(pack([built], len(built), 1, layout))).to_torch()
    with torch.no_grad():
        logits = model.logits(batch["input_ids"], batch["attention_mask"], batch["position_ids"])[0][0]
    reasoning = np.flatnonzero((built.targets != IGNORE) & (built.group[np.minimum(np.arange(len(built)) + 1,
                                                                                 len(built) - 1)] < 3))
    forced, seen, at_chunk = iter(built.targets[reasoning].tolist()), [], {}

    choose_freely, generate_blocks = Decoder._choose, Decoder.generate_blocks

    def choose(self, step_logits, allowed, greedy, temperature):
        token = next(forced, None)  # the reasoning is forced; the chunk's tokens are chosen as usual
        if token is None:
            return choose_freely(self, step_logits, allowed, greedy, temperature)
        seen.append(step_logits.clone())
        return token

    def record(self, *args, **kwargs):
        at_chunk.update(ids=list(self.ids), position=self.next_position)
        return generate_blocks(self, *args, **kwargs)

    monkeypatch.setattr(Decoder, "_choose", choose)
    monkeypatch.setattr(Decoder, "generate_blocks", record)
    policy = Policy(model, tokenizers)
    prefix = np.flatnonzero(built.group == 0)
    policy.prompt = lambda *args, **kwargs: built.ids[prefix[:-1]].tolist()  # without <reason>
    result = policy.act(None, "unused", reason=True)
    assert len(seen) == len(reasoning)
    np.testing.assert_allclose(torch.stack(seen).numpy(), logits[reasoning].numpy(), atol=2e-5, rtol=1e-4)
    text = tokenizers.text
    words = [text.decode([layout.to_local("text", s)])[0] for s in sample.reason_list]
    assert result.reasoning == " ".join(words) and parse(result.reasoning) is not None
    chunk_group = np.flatnonzero(built.group == 3)
    copy = chunk_group[:len(sample.reason_list[1]) + 1]
    assert at_chunk["ids"] == built.ids[prefix].tolist() + built.ids[copy].tolist()
    assert at_chunk["position"] == built.positions[copy[-1]] + 1
    assert result.actions.shape == (4, tokenizers.action.dim)


def test_an_untrained_policy_stays_within_its_reasoning_budget(shards, tokenizers):
    layout = shards.layout
    torch.manual_seed(0)
    model = UnifiedModel(ModelConfig(**TINY, inductive_reason=True, max_reason_tokens=6), layout).eval()
    built = build(shards.sample("policy_reason", a_reason_row(shards), inductive_reason=True), layout)
    policy = Policy(model, tokenizers)
    prefix = np.flatnonzero(built.group == 0)
    policy.prompt = lambda *args, **kwargs: built.ids[prefix[:-1]].tolist()
    result = policy.act(None, "unused", reason=True)
    assert result.tokens_generated <= 6 + 4 * tokenizers.action.dim and result.actions.shape == (4, 2)
    assert isinstance(result.reasoning, str)


def test_shards_without_the_steps_are_refused(shards, tmp_path):
    import shutil

    copy = tmp_path / "old"
    shutil.copytree(shards.root, copy)
    (copy / "reason_step_rows.npy").unlink()
    old = TokenShards(copy)
    with pytest.raises(UnifiedError, match="keep each reason whole.*tokenize"):
        old.sample("policy_reason", a_reason_row(old), inductive_reason=True)
    old.sample("policy_reason", a_reason_row(old))  # the whole form still reads them
