"""The inductive scratchpad: its training form (a copy of the previous step, groups, positions restarting after
the question), logits equal to a context truncated by hand, generation that crops its cache and sees what training
saw, and the operator shards that keep each step apart."""

import numpy as np
import pytest
import torch
from unified.eval.operators import generate_inductive
from unified.tokenizers.fit import Tokenizers

from unified.errors import UnifiedError
from unified.generation import Decoder
from unified.model import ModelConfig, UnifiedModel
from unified.packing import collate, pack
from unified.sequences import IGNORE, Sample, build

TINY = dict(hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128, max_position_embeddings=256, horizon=4)


@pytest.fixture(scope="module")
def tokenizers(model_data):
    return Tokenizers.from_pretrained(model_data / "tok")


def example(layout, rng, steps=(3, 4, 2, 5)):
    text = lambda n: layout.to_global("text", rng.integers(5, 300, n))  # noqa: E731
    return Sample("text", question=text(9), answer=text(1), step_list=[text(n) for n in steps], id="x")


def test_the_inductive_form(tokenizers):
    layout = tokenizers.layout
    sample = example(layout, np.random.default_rng(0))
    built = build(sample, layout)
    step, prefix = layout.special("<step>"), 1 + 9 + 1  # <bos> question <reason>
    assert (built.group[:prefix] == 0).all() and list(built.positions[:prefix]) == list(range(prefix))
    s = sample.step_list
    for k in range(2, 5):  # group k: a copy of step k - 1 and its <step> at the positions after the question
        where = np.flatnonzero(built.group == k)
        copy = np.append(s[k - 2], step)
        assert list(built.ids[where[:len(copy)]]) == list(copy)
        assert list(built.positions[where]) == list(range(prefix, prefix + len(where)))
        # the copy is never predicted; the step after it is
        assert (built.targets[where[:len(copy)] - 1] == IGNORE).all()
        assert list(built.targets[where[len(copy) - 1:-1]]) == list(built.ids[where[len(copy):]])
    last = built.ids[built.group == 4]
    assert last[-len(sample.answer) - 2] == layout.special("</reason>") and last[-1] == layout.special("<eos>")
    # every step looks the same from where it stands: group k's positions do not grow with k
    assert built.positions.max() < prefix + 2 * 6 + 4


def test_training_logits_equal_a_truncated_context(tokenizers):
    """What a step's tokens compute in the packed training row equals a fresh decoder fed only the question, the
    previous step and the step itself: the mask and the positions leave nothing else in."""
    layout = tokenizers.layout
    torch.manual_seed(0)
    model = UnifiedModel(ModelConfig(**TINY), layout).eval()
    rng = np.random.default_rng(1)
    other = build(Sample("text", question=layout.to_global("text", rng.integers(5, 300, 7)),
                         answer=layout.to_global("text", [7]), id="plain"), layout)
    built = build(example(layout, rng), layout)
    packed = next(iter(pack([other, built], 128, 1, layout)))
    assert sorted(packed.sample_ids[0]) == ["plain", "x"]  # both in one row
    batch = packed.to_torch()
    with torch.no_grad():
        logits = model.logits(batch["input_ids"], batch["attention_mask"], batch["position_ids"])[0][0]
    start = 0 if packed.sample_ids[0][0] == "x" else len(other)
    prefix = np.flatnonzero(built.group == 0)
    for k in range(1, int(built.group.max()) + 1):
        decoder = Decoder(model)
        decoder.feed(built.ids[prefix])
        mine = np.flatnonzero(built.group == k)
        reference = decoder.feed(built.ids[mine])
        np.testing.assert_allclose(logits[start + mine].numpy(), reference.numpy(), atol=2e-5, rtol=1e-4)


def test_generation_crops_its_cache_and_sees_what_training_saw(tokenizers):
    """Generation forced through a correct scratchpad (each choice replaced by the data's token) computes, at
    every choice, the logits the training row computes for that target."""
    layout = tokenizers.layout
    torch.manual_seed(0)
    model = UnifiedModel(ModelConfig(**TINY, inductive_scratchpad=True), layout).eval()
    sample = example(layout, np.random.default_rng(2))
    built = build(sample, layout)
    batch = next(iter(pack([built], 128, 1, layout))).to_torch()
    with torch.no_grad():
        logits = model.logits(batch["input_ids"], batch["attention_mask"], batch["position_ids"])[0][0]
    targets = np.flatnonzero(built.targets != IGNORE)
    forced = iter(built.targets[targets].tolist())
    seen = []

    def choose(step_logits, allowed, greedy, temperature):
        seen.append(step_logits.clone())
        return next(forced)

    decoder = Decoder(model)
    prefix = np.flatnonzero(built.group == 0)
    decoder.feed(built.ids[prefix])
    decoder._choose = choose
    steps, reply = generate_inductive(decoder, len(prefix), max_steps=10, max_step_tokens=20)
    assert [list(s) for s in steps] == [list(s) for s in sample.step_list] and reply == list(sample.answer)
    assert len(seen) == len(targets)
    np.testing.assert_allclose(torch.stack(seen).numpy(), logits[targets].numpy(), atol=2e-5, rtol=1e-4)
    # An untrained model generates something, within its budgets, and says how much.
    decoder = Decoder(model)
    decoder.feed(built.ids[prefix])
    steps, reply = generate_inductive(decoder, len(prefix), max_steps=3, max_step_tokens=4)
    assert 1 <= len(steps) <= 3 and all(len(s) <= 4 for s in steps) and len(reply) <= 4


@pytest.mark.parametrize("inductive", [False, True])
def test_question_weight_makes_the_question_a_target_at_its_weight(tokenizers, inductive):
    """data.question_weight: 0 leaves the question unpredicted (the rows are as before); w > 0 predicts every
    question token after the first from the one before it, at w times the task's weight, and changes nothing else."""
    layout = tokenizers.layout
    sample = example(layout, np.random.default_rng(1))
    if not inductive:
        sample.steps, sample.step_list = np.concatenate(sample.step_list), None
    plain, weighted = build(sample, layout, task_weights={"text": 2.0}), build(
        sample, layout, task_weights={"text": 2.0}, question_weight=0.25)
    start, stop = plain.spans["question"]
    asked = np.arange(start - 1, stop - 1)  # position i predicts token i + 1: <bos> predicts the question's first
    assert (plain.targets[asked] == IGNORE).all() and (plain.weights[asked] == 0).all()
    assert list(weighted.targets[asked]) == list(plain.ids[start:stop])
    assert np.allclose(weighted.weights[asked], 0.5)
    rest = np.setdiff1d(np.arange(len(plain)), asked)
    assert (weighted.ids == plain.ids).all() and (weighted.targets[rest] == plain.targets[rest]).all()
    assert np.allclose(weighted.weights[rest], plain.weights[rest])
    assert set(plain.weights[plain.targets != IGNORE]) == {2.0}


def test_operator_shards_keep_the_steps_apart(model_data, tmp_path):
    from unified.batches import MixtureBatches
    from unified.data.operators import operators
    from unified.data.shards import TokenShards
    from unified.data.tokenize import split_steps, tokenize

    operators(out=tmp_path / "ops", hops="2-3", n=4, scratchpad="inductive", progress=False)
    tokenize(data=model_data / "store", tokenizer=model_data / "tok", out=tmp_path / "shards", horizon=4,
             operators=tmp_path / "ops", operator_hops="2-3", tasks="text", progress=False)
    shards = TokenShards(tmp_path / "shards")
    tok = Tokenizers.from_pretrained(model_data / "tok")
    import json

    first = json.loads((tmp_path / "ops" / "hops_2.jsonl").read_text().splitlines()[0])
    sample = shards.sample("text", 0, inductive=True)
    words = [tok.text.decode([shards.layout.to_local("text", s)])[0] for s in sample.step_list]
    assert words == split_steps(first["scratchpad"]) and len(words) == 3  # 2 hops and the verdict
    # Training batches in the inductive form carry groups; a block mask (flex attention) cannot hold them.
    batches = MixtureBatches(shards, {"text": 1.0}, 256, 2, seed=0, inductive=True)
    batch = batches.batch(0)
    assert batch.attention_mask.shape[-1] == 256
    torch.manual_seed(0)
    model = UnifiedModel(ModelConfig(**TINY, inductive_scratchpad=True), shards.layout)
    loss, _ = model(batch.to_torch())
    assert torch.isfinite(loss)
    rows = [[build(shards.sample("text", 0, inductive=True), shards.layout)]]
    with pytest.raises(UnifiedError, match="attention=sdpa"):
        collate(rows, 256, shards.layout, dense_mask=False)



@pytest.mark.parametrize("inductive", [True, False])
def test_batched_questions_are_answered_as_one_at_a_time(tokenizers, tmp_path, inductive):
    """`eval operators` answers a batch of questions at once; each must get what `answer` gives it alone: the same
    scratchpad, reply and token count, through every way a step can end (`<step>`, `</reason>`, out of budget,
    out of steps). The head is tilted towards the markers so that a random model takes every path."""
    from unified.eval.operators import answer, answer_batch, read_examples

    from unified.data.operators import operators

    layout = tokenizers.layout
    torch.manual_seed(3)
    model = UnifiedModel(ModelConfig(**TINY, inductive_scratchpad=inductive), layout).eval()
    head = model.backbone.get_output_embeddings().weight
    with torch.no_grad():
        for k, marker in enumerate(("<step>", "</reason>", "<eos>")):
            head[layout.special(marker)] = torch.randn(head.shape[1], generator=torch.Generator().manual_seed(k)) * 0.03
    operators(out=tmp_path / "ops", hops="2-3", n=6, scratchpad="inductive" if inductive else "full",
              progress=False)
    ended = set()
    for h, rows in read_examples(tmp_path / "ops", None, 6).items():
        prompts = [r["prompt"] for r in rows]
        alone = [answer(model, tokenizers, p, h) for p in prompts]
        assert answer_batch(model, tokenizers, prompts, h) == alone
        ended |= {tokens for _, _, tokens in alone}
    assert len(ended) >= 3  # scratchpads closed at once, after a few tokens, out of budget: the paths differ


@pytest.mark.parametrize("steps", ["interval", "walk"])
def test_walk_form_names_are_one_token_wherever_they_stand(model_data, tmp_path, steps):
    """The walk form's question and steps are encoded with a leading space, so that a name opening the prompt or a
    step is the token it is everywhere else; the interval form keeps the encoding the demo's models were trained
    with. `eval operators` encodes the questions the same way (`as_words`)."""
    import json

    from unified.data.operators import as_words, operators
    from unified.data.shards import TokenShards
    from unified.data.tokenize import split_steps, tokenize

    operators(out=tmp_path / "ops", hops="2", n=2, scratchpad="inductive", steps=steps, premises=6, progress=False)
    tokenize(data=model_data / "store", tokenizer=model_data / "tok", out=tmp_path / "shards", horizon=4,
             operators=tmp_path / "ops", operator_hops="2", tasks="text", progress=False)
    shards, tok = TokenShards(tmp_path / "shards"), Tokenizers.from_pretrained(model_data / "tok")
    first = json.loads((tmp_path / "ops" / "hops_2.jsonl").read_text().splitlines()[0])
    sample = shards.sample("text", 0, inductive=True)
    local = lambda ids: list(shards.layout.to_local("text", ids))  # noqa: E731
    lead = " " if steps == "walk" else ""
    assert as_words("Ada", steps) == lead + "Ada"
    assert local(sample.question) == list(tok.text.encode([lead + first["prompt"]])[0])
    assert [local(s) for s in sample.step_list] == [list(ids) for ids in tok.text.encode(
        [lead + step for step in split_steps(first["scratchpad"])])]
    if steps == "walk":  # the name step 1 reaches opens step 2 as the very same tokens (of n=2, one is a yes)
        rows = [json.loads(line) for line in (tmp_path / "ops" / "hops_2.jsonl").read_text().splitlines()]
        yes = [r["answer"] for r in rows].index("yes")
        walk = [local(s) for s in shards.sample("text", yes, inductive=True).step_list]
        reached = split_steps(rows[yes]["scratchpad"])[0].split()[-1].rstrip(".")
        name = list(tok.text.encode([" " + reached])[0])
        assert walk[0][-len(name) - 1:-1] == name and walk[1][:len(name)] == name


def test_lookup_drills_become_groups_of_their_own(model_data, tmp_path):
    """`data operators --drills` through tokenizing into the shards: each drill is one more group after the
    scratchpad's, laid out as a step's (its context, not a target, at the positions right after the question, then
    its step and <step>, targets), seeing the question and itself only."""
    import json

    from unified.data.operators import operators
    from unified.data.shards import TokenShards
    from unified.data.tokenize import tokenize
    from unified.packing import attention_mask

    operators(out=tmp_path / "ops", hops="3", n=4, scratchpad="inductive", steps="walk", phrasing="greater-first",
              premises=10, drills=True, progress=False)
    tokenize(data=model_data / "store", tokenizer=model_data / "tok", out=tmp_path / "shards", horizon=4,
             operators=tmp_path / "ops", operator_hops="3", tasks="text", progress=False)
    shards = TokenShards(tmp_path / "shards")
    tok = Tokenizers.from_pretrained(model_data / "tok")
    words = lambda ids: tok.text.decode([shards.layout.to_local("text", ids)])[0].strip()  # noqa: E731
    first = json.loads((tmp_path / "ops" / "hops_3.jsonl").read_text().splitlines()[0])
    sample = shards.sample("text", 0, inductive=True)
    assert [[words(c), words(s)] for c, s in sample.drill_list] == first["drills"] and first["drills"]
    built = build(sample, shards.layout)
    prefix = int((built.group == 0).sum())
    walk_groups = len(sample.step_list)
    step = shards.layout.special("<step>")
    mask = attention_mask(np.zeros(len(built.ids), np.int64), np.full(len(built.ids), -1), built.group)
    for k, (context, tokens) in enumerate(sample.drill_list, walk_groups + 1):
        where = np.flatnonzero(built.group == k)
        expected = list(np.append(context, step)) + list(np.append(tokens, step))
        assert list(built.ids[where]) == expected
        assert list(built.positions[where]) == list(range(prefix, prefix + len(where)))
        n = len(context) + 1
        assert (built.targets[where[:n - 1]] == IGNORE).all()
        assert list(built.targets[where[n - 1:-1]]) == list(built.ids[where[n:]])
        seen = np.flatnonzero(mask[where[-1]])
        assert set(seen) == set(range(prefix)) | set(where)
    assert built.group.max() == walk_groups + len(sample.drill_list)
    # without the drills the sample is the scratchpad's alone
    sample.drill_list = None
    assert build(sample, shards.layout).group.max() == walk_groups
