"""The unified model on real (tiny) data: loss on targets only, cached = uncached generation, constrained
decoding, export round trip, bad inputs, and a small model that overfits a handful of episodes."""

import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from unified.tokenizers.fit import Tokenizers

from unified.data.shards import TokenShards
from unified.errors import UnifiedError
from unified.generation import Decoder
from unified.model import ModelConfig, UnifiedModel
from unified.model_dir import load_model, save_model
from unified.packing import pack
from unified.policy import Policy, WorldModel
from unified.sequences import IGNORE, build

H = 4
TINY = dict(hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128, max_position_embeddings=256, horizon=H)


@pytest.fixture(scope="module")
def data(model_data):
    return model_data


@pytest.fixture(scope="module")
def shards(data):
    return TokenShards(data / "shards")


@pytest.fixture(scope="module")
def tokenizers(data):
    return Tokenizers.from_pretrained(data / "tok")


def tiny_model(layout, state_dim=0, **overrides):
    torch.manual_seed(0)
    return UnifiedModel(ModelConfig(**(TINY | overrides)), layout, state_dim=state_dim)


def fit_head(model, batch, steps=40):
    """Train `model` on one batch; its continuous head's L1 must fall."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    l1 = []
    for _ in range(steps):
        loss, metrics = model(batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        l1.append(float(metrics["loss/action_head_l1"]))
    assert np.mean(l1[-5:]) < 0.8 * l1[0], l1


def batches(shards, tasks, seq_len=256, batch_size=4, rows=None):
    built = [build(shards.sample(t, int(r)), shards.layout) for t in tasks
             for r in (shards.index(t) if rows is None else shards.index(t)[:rows])]
    return list(pack(built, seq_len, batch_size, shards.layout))


def test_shards_hold_every_step(shards, data):
    meta = json.loads((data / "shards" / "meta.json").read_text())
    assert shards.arrays["image"].shape == (meta["steps"], 16)
    assert len(shards.index("world")) == sum(e["steps"] - H for e in meta["episodes"] if not e["held_out"])
    assert len(shards.index("world", "held_out")) == sum(e["steps"] - H for e in meta["episodes"] if e["held_out"]) > 0
    sample = shards.sample("policy_reason", int(shards.index("policy_reason")[5]))
    assert sample.actions.shape == (H, 2) and shards.layout.mask("action")[sample.actions].all()


def test_loss_is_computed_on_targets_only(shards):
    model = tiny_model(shards.layout)
    batch = batches(shards, ["policy_reason", "world"], rows=6)[0]
    tensors = batch.to_torch()
    loss, metrics = model(tensors)
    logits, _ = model.logits(tensors["input_ids"], tensors["attention_mask"], tensors["position_ids"])
    ce = torch.nn.functional.cross_entropy(logits.flatten(0, 1), tensors["targets"].flatten(), reduction="none",
                                           ignore_index=IGNORE)
    w = tensors["weights"].flatten()
    torch.testing.assert_close(loss, (ce * w).sum() / w.sum())
    # Changing a token that is never a target (the instruction, the current frame) leaves the target set alone.
    assert (tensors["weights"][tensors["targets"] == IGNORE] == 0).all()
    assert metrics["tokens"] == (tensors["targets"] != IGNORE).sum()


def test_flex_attention_block_mask_equals_the_dense_mask(shards):
    """attention=flex: rows packed without a dense mask, the rule rebuilt as a flex-attention BlockMask from the
    segments and action blocks; logits and loss equal the dense-mask SDPA path's (padding included). (Flex
    attention has no backward on the CPU: training with it needs a GPU, and says so.)"""
    from unified.packing import collate

    model = tiny_model(shards.layout)
    rows = [[build(shards.sample(t, int(shards.index(t)[i])), shards.layout) for t in ("policy_reason", "world")]
            for i in (0, 3)]
    dense = collate(rows, 256, shards.layout).to_torch()
    sparse = collate(rows, 256, shards.layout, dense_mask=False).to_torch()
    assert "segment" in sparse and "segment" not in dense and sparse["attention_mask"].numel() == 0
    assert (sparse["segment"] == -1).any()  # the rows end in padding
    from unified.model import block_mask

    with torch.no_grad():
        torch.testing.assert_close(model(sparse)[0], model(dense)[0], rtol=1e-5, atol=1e-5)
        a, _ = model.logits(dense["input_ids"], dense["attention_mask"], dense["position_ids"])
        b, _ = model.logits(sparse["input_ids"], block_mask(sparse["segment"], sparse["action_block"]),
                            sparse["position_ids"])
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    assert model.backbone.config._attn_implementation == "sdpa"  # the block mask chose the kernel for that call


def test_action_targets_spread_over_neighbouring_bins(shards, tokenizers):
    """`action_label_sigma`: an action position's loss is the cross-entropy against a Gaussian over its own
    dimension's bins (a narrow one is the one-hot loss); every other position keeps its loss."""
    batch = batches(shards, ["policy_reason", "world"], rows=6)[0].to_torch()
    bins, span = tokenizers.action.bins, shards.layout.segment("action")
    hard_model = tiny_model(shards.layout)
    hard, _ = hard_model(batch)
    narrow = tiny_model(shards.layout, action_label_sigma=1e-3)
    with pytest.raises(UnifiedError, match="call spread_action_targets"):
        narrow(batch)
    narrow.spread_action_targets(bins)
    torch.testing.assert_close(narrow(batch)[0], hard)
    wide = tiny_model(shards.layout, action_label_sigma=2.0)
    wide.spread_action_targets(bins)
    targets = wide.action_targets
    assert targets.shape == (span.size, span.size) and torch.allclose(targets.sum(1), torch.ones(span.size))
    i = bins + 5  # the second dimension's sixth bin: nothing of it falls on the first dimension's bins
    assert targets[i, :bins].sum() == 0 and targets[i, i] > targets[i, i + 1] > targets[i, i + 3] > 0
    logits, _ = wide.logits(batch["input_ids"], batch["attention_mask"], batch["position_ids"])
    t, w = batch["targets"], batch["weights"]
    ce = torch.nn.functional.cross_entropy(logits.flatten(0, 1), t.flatten(), ignore_index=IGNORE,
                                           reduction="none").view_as(t)
    hit = (t >= span.start) & (t < span.stop)
    assert hit.any()
    soft = -(targets[t[hit] - span.start] * torch.log_softmax(logits[hit], -1)[:, span.start:span.stop]).sum(-1)
    expected = (torch.where(hit, torch.zeros_like(ce).masked_scatter(hit, soft), ce) * w).sum() / w.sum()
    torch.testing.assert_close(wide(batch)[0], expected)
    with pytest.raises(UnifiedError, match="action_label_sigma is a width in bins"):
        ModelConfig(action_label_sigma=-1)


def test_cached_generation_equals_uncached(shards):
    model = tiny_model(shards.layout).eval()
    built = build(shards.sample("policy_reason", int(shards.index("policy_reason")[3])), shards.layout)
    batch = next(pack([built], len(built), 1, shards.layout)).to_torch()
    with torch.no_grad():
        full, _ = model.logits(batch["input_ids"], batch["attention_mask"], batch["position_ids"])
    decoder = Decoder(model)
    step_logits = [decoder.feed(built.ids[:10], built.action_block[:10])[-1]]
    for i in range(10, len(built)):
        step_logits.append(decoder.feed(built.ids[i:i + 1], built.action_block[i:i + 1])[-1])
    incremental = torch.stack(step_logits[1:])
    torch.testing.assert_close(incremental, full[0, 10:].float(), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(step_logits[0], full[0, 9].float(), atol=1e-4, rtol=1e-4)


def test_a_chunk_written_all_steps_at_once_equals_writing_it_token_by_token(shards):
    """Under the action-chunk mask a block sees the prompt and itself only: writing all H blocks together in D
    forward passes chooses the same tokens, from the same logits, as the training order, one token at a time."""
    model = tiny_model(shards.layout).eval()
    layout = shards.layout
    built = build(shards.sample("policy", int(shards.index("policy")[7])), layout)
    prompt = built.ids[:built.spans["actions"][0]]
    allowed, act = layout.mask("action"), layout.special("<act>")
    parallel = Decoder(model)
    parallel.feed(prompt)
    fast = parallel.generate_blocks(act, allowed, H, 2)
    assert parallel.passes == 1 + 2 and parallel.generated == H * 2
    sequential, chosen, picked_from = Decoder(model), [], []
    sequential.feed(prompt)
    for k in range(H):
        logits = sequential.feed([act], [k])[-1]
        for _ in range(2):
            masked = logits.masked_fill(~torch.from_numpy(allowed), -torch.inf)
            chosen.append(int(masked.argmax()))
            picked_from.append(masked.max())
            logits = sequential.feed([chosen[-1]], [k])[-1]
    assert fast == chosen
    reference = Decoder(model)
    reference.feed(prompt)
    first = reference.feed([act] * H, np.arange(H), len(prompt) + 3 * np.arange(H))
    torch.testing.assert_close(first.masked_fill(~torch.from_numpy(allowed), -torch.inf).max(-1).values,
                               torch.stack(picked_from[::2]), atol=1e-4, rtol=1e-4)


@settings(max_examples=15)
@given(st.sampled_from(["text", "image", "action"]), st.integers(0, 1000), st.floats(0.5, 3.0))
def test_constrained_decoding_never_leaves_its_range(shards_and_model, modality, seed, temperature):
    shards, model = shards_and_model
    decoder = Decoder(model, np.random.default_rng(seed))
    decoder.feed([shards.layout.special("<bos>")])
    allowed = shards.layout.mask(modality)
    out = decoder.generate(allowed, count=12, greedy=False, temperature=temperature)
    assert allowed[out].all()


@pytest.fixture(scope="module")
def shards_and_model(shards):
    return shards, tiny_model(shards.layout).eval()


def test_bad_inputs(shards, tokenizers, tmp_path):
    policy = Policy(tiny_model(shards.layout), tokenizers)
    frame = np.zeros((32, 32, 3), np.uint8)
    with pytest.raises(UnifiedError, match=r"frames of shape \(T, 32, 32, 3\)"):
        policy.act(np.zeros((64, 64, 3), np.uint8), "Drive.", state=[20, 0, 0])
    with pytest.raises(UnifiedError, match="instruction is empty"):
        policy.act(frame, "   ", state=[20, 0, 0])
    with pytest.raises(UnifiedError, match="trained with the ego state"):
        policy.act(frame, "Drive.")
    from unified.layout import TokenLayout

    # A checkpoint whose vocabulary does not match the tokenizers' layout is refused.
    with pytest.raises(UnifiedError, match="do not belong together"):
        UnifiedModel(ModelConfig(**TINY), TokenLayout.build(10, 16, 8, 8), backbone=tiny_model(shards.layout).backbone)


def test_action_token_readouts(shards, tokenizers, data):
    """The mean and median readouts of an action token's distribution over its dimension's bins, on a known
    distribution; and through `act`: keeping the distributions changes no chosen token, greedy picks their most
    likely bin, and each readout is computed from them."""
    from unified.data.store import EpisodeStore

    policy = Policy(tiny_model(shards.layout).eval(), tokenizers)
    tok, start = tokenizers.action, shards.layout.segment("action").start
    first = start + tok.offsets()
    centres = tok.centres()
    probs = np.zeros((1, tok.dim, shards.layout.vocab_size))
    for d in range(tok.dim):  # 0.6 on bin 3, 0.4 on bin 10 of every dimension
        probs[0, d, first[d] + 3], probs[0, d, first[d] + 10] = 0.6, 0.4
    mean = tok.normalizer.unnormalize(0.6 * centres[:, 3] + 0.4 * centres[:, 10])
    np.testing.assert_allclose(policy.read_out(probs, "mean")[0], mean)
    np.testing.assert_allclose(policy.read_out(probs, "median")[0], tok.normalizer.unnormalize(centres[:, 3]))
    probs[0, :, :] = 0
    for d in range(tok.dim):  # 0.3 on bin 3, 0.7 on bin 10: the median moves to bin 10
        probs[0, d, first[d] + 3], probs[0, d, first[d] + 10] = 0.3, 0.7
    np.testing.assert_allclose(policy.read_out(probs, "median")[0], tok.normalizer.unnormalize(centres[:, 10]))

    episode = EpisodeStore(data / "store").read_episode(0)
    prompt = policy.prompt(episode.frames[3], episode.instruction, episode.states[3])
    act, masks = shards.layout.special("<act>"), policy.action_masks()
    plain, kept = Decoder(policy.model), Decoder(policy.model)
    plain.feed(prompt)
    kept.feed(prompt)
    chosen = kept.generate_blocks(act, masks, H, tok.dim, keep_probs=True)
    assert plain.generate_blocks(act, masks, H, tok.dim) == chosen
    assert kept.block_probs.shape == (H, tok.dim, shards.layout.vocab_size)
    np.testing.assert_allclose(kept.block_probs.sum(-1), 1.0)
    assert (kept.block_probs[:, :, ~masks[0]][:, 0] == 0).all()
    assert kept.block_probs.argmax(-1).reshape(-1).tolist() == chosen
    args = (episode.frames[3], episode.instruction)
    for readout in ("mean", "median"):
        np.testing.assert_allclose(policy.act(*args, state=episode.states[3], reason=False, readout=readout).actions,
                                   policy.read_out(kept.block_probs, readout), rtol=1e-5, atol=1e-6)
    with pytest.raises(UnifiedError, match="readout: 'average' is not one of mode, mean, median"):
        policy.act(*args, state=episode.states[3], reason=False, readout="average")


def test_export_round_trip_identical_logits_and_actions(shards, tokenizers, tmp_path):
    from transformers import AutoModelForCausalLM

    from unified.export import export

    model = tiny_model(shards.layout).eval()
    save_model(model, tokenizers, tmp_path / "ckpt")
    export(checkpoint=tmp_path / "ckpt", out=tmp_path / "hf")
    export(checkpoint=tmp_path / "ckpt", out=tmp_path / "action_only", action_only=True)
    batch = batches(shards, ["policy_reason"], rows=3)[0].to_torch()
    with torch.no_grad():
        expected, _ = model.logits(batch["input_ids"], batch["attention_mask"], batch["position_ids"])
        for directory in ("hf", "action_only"):
            hf = AutoModelForCausalLM.from_pretrained(tmp_path / directory).eval()
            got = hf(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                     position_ids=batch["position_ids"]).logits
            torch.testing.assert_close(got, expected, atol=0, rtol=0)
    from unified.data.store import EpisodeStore

    episode = EpisodeStore(shards.meta["data"]).read_episode(0)
    args = (episode.frames[:1], episode.instruction)
    original = Policy(model, tokenizers).act(*args, state=episode.states[0])
    for directory in ("hf", "action_only"):
        loaded = Policy.from_pretrained(tmp_path / directory).act(*args, state=episode.states[0])
        np.testing.assert_array_equal(loaded.actions, original.actions)
        assert loaded.reasoning == original.reasoning
    assert not (tmp_path / "action_only" / "tokenizers" / "action_fast").exists()
    with pytest.raises(UnifiedError, match="action-only"):
        WorldModel.from_pretrained(tmp_path / "action_only")
    _, _, info = load_model(tmp_path / "action_only")
    assert info["action_only"] and "image decoder (world model)" not in info["kept"]


def psnr(x: np.ndarray, truth: np.ndarray) -> float:
    return float(10 * np.log10(255**2 / np.mean((x.astype(np.float32) - truth.astype(np.float32)) ** 2)))


@pytest.mark.slow
def test_a_small_model_overfits_a_handful_of_episodes(shards, tokenizers, data, overfit):
    """A plain loop (the DeepSpeed recipes are another issue): greedy actions in the expert's bins, and
    an imagined next frame closer to the truth than copying the current frame."""
    from unified.data.store import EpisodeStore

    torch.manual_seed(0)
    model = tiny_model(shards.layout, hidden_size=128, intermediate_size=256, num_heads=4)
    episodes = [0, 1]
    overfit(model, shards, episodes)
    store = EpisodeStore(data / "store")
    policy, world = Policy(model, tokenizers), WorldModel(model, tokenizers)
    width = tokenizers.action.bin_width
    gains, same, near = [], [], []
    for e in episodes:
        episode = store.read_episode(e)
        for t in (0, 5, 10):
            result = policy.act(episode.frames[t], episode.instruction, state=episode.states[t], reason=False,
                                readout="mode")  # the greedy tokens themselves
            expert = np.clip(episode.actions[t:t + H], tokenizers.action.q01, tokenizers.action.q99)
            # The expert's own bin: its action encoded and decoded (edge bins absorb what lies beyond q01/q99).
            own = tokenizers.action.decode(tokenizers.action.encode(expert[None]))[0]
            same.append(np.isclose(result.actions, own, atol=1e-6))
            near.append(np.abs(result.actions - expert) <= width + 1e-6)
            imagined = world.imagine(episode.frames[t], episode.actions[t:t + H])[0]
            truth = episode.frames[t + H]
            gains.append(psnr(imagined, truth) - psnr(episode.frames[t], truth))
    print(f"the expert's bin: {np.mean(same):.3f}, within a bin width of the expert's action: {np.mean(near):.3f}, "
          f"PSNR gain over copying: {np.mean(gains):.2f} dB")
    assert np.mean(same) >= 0.9 and np.mean(near) >= 0.9, (np.mean(same), np.mean(near))
    assert np.mean(gains) > 0, gains


def test_continuous_action_head_trains_and_acts(shards, tokenizers, data, tmp_path):
    from unified.data.store import EpisodeStore

    # The head's targets are normalised over the range the policy unnormalises its output with (the action
    # tokenizer's), not the store's q01/q99: otherwise a zero steering target comes back as an offset.
    normalizer = tokenizers.action.normalizer
    for row in shards.index("policy")[:: max(1, len(shards.index("policy")) // 20)]:
        sample = shards.sample("policy", int(row))
        expected = np.clip(shards.action_values(int(row)), normalizer.q01, normalizer.q99)
        np.testing.assert_allclose(normalizer.unnormalize(sample.action_values), expected, atol=1e-5)
    model = tiny_model(shards.layout, action_head=True)
    batch = batches(shards, ["policy"], rows=8)[0].to_torch()
    assert batch["head_targets"].shape[1:] == (H, 2) and (batch["head_targets"].abs() <= 1).all()
    fit_head(model, batch)
    episode = EpisodeStore(data / "store").read_episode(0)
    save_model(model.eval(), tokenizers, tmp_path / "m")
    policy = Policy.from_pretrained(tmp_path / "m")
    result = policy.act(episode.frames[0], episode.instruction, state=episode.states[0], reason=False, continuous=True)
    assert result.actions.shape == (H, 2) and result.tokens_generated == 0
    with pytest.raises(UnifiedError, match="no continuous action head"):
        Policy(tiny_model(shards.layout), tokenizers).act(episode.frames[0], episode.instruction,
                                                         state=episode.states[0], reason=False, continuous=True)


def test_a_given_explanation_is_read_as_training_lays_it_out(shards, tokenizers, data):
    """`Policy.act(..., reasoning=TEXT)` reads an explanation instead of writing one (a driver that reasons less
    often than it acts): the head then reads exactly the sequence training built for that state and sentence."""
    from unified.data.store import EpisodeStore
    from unified.sequences import build

    store = EpisodeStore(data / "store")
    policy = Policy(tiny_model(shards.layout, action_head=True).eval(), tokenizers)
    for row in shards.index("policy")[::11][:3]:
        sample = shards.sample("policy_reason", int(row))
        built = build(sample, shards.layout)
        episode, step = (int(x) for x in sample.id.split()[1::2])
        recorded = store.read_episode(episode)
        text = recorded.causation[step].text
        assert text and tokenizers.text.decode([shards.layout.to_local("text", sample.reason)])[0] == text
        args = (recorded.frames[step], recorded.instruction)
        read = policy.act(*args, state=recorded.states[step], reason=True, continuous=True, reasoning=text)
        trained = policy._continuous([int(i) for i in built.ids[:built.spans["actions"][0] + 1]])
        np.testing.assert_allclose(read.actions, trained, atol=1e-5)
        assert read.reasoning == text and read.tokens_generated == 0
        # By the action tokens: only the chunk is generated.
        tokens = policy.act(*args, state=recorded.states[step], reason=True, reasoning=text)
        assert tokens.reasoning == text and tokens.tokens_generated == H * 2
    other = policy.act(*args, state=recorded.states[step], reason=True, continuous=True, reasoning="keep lane")
    assert not np.allclose(other.actions, read.actions)  # the head reads the explanation it is given
    with pytest.raises(UnifiedError, match="reason=False skips the reasoning"):
        policy.act(*args, state=recorded.states[step], reason=False, continuous=True, reasoning=text)
    with pytest.raises(UnifiedError, match=r"reasoning: the explanation given is \d+ text tokens"):
        policy.act(*args, state=recorded.states[step], reason=True, continuous=True,
                   reasoning=" ".join([text] * 200))


def test_a_continuous_head_that_reads_the_state(shards, tokenizers, data, tmp_path):
    """model.action_head_state: the head reads the ego state as values normalised over the state tokenizer's range,
    the same in training (from the shards) and when the policy acts (from the state it is given)."""
    from unified.data.store import EpisodeStore

    store, normalizer, dim = EpisodeStore(data / "store"), tokenizers.state.normalizer, tokenizers.state.dim
    for row in shards.index("policy")[::7][:10]:
        sample = shards.sample("policy", int(row))
        episode, step = (int(x) for x in sample.id.split()[1::2])
        recorded = np.clip(store.read_episode(episode).states[step], normalizer.q01, normalizer.q99)
        np.testing.assert_allclose(normalizer.unnormalize(sample.state_values), recorded, rtol=1e-5, atol=1e-4)
    assert shards.sample("policy", int(shards.index("policy")[0]), with_state=False).state_values is None
    batch = batches(shards, ["policy"], rows=8)[0].to_torch()
    assert batch["head_states"].shape == (len(batch["head_index"]), dim)

    model = tiny_model(shards.layout, state_dim=dim, action_head=True, action_head_state=True)
    fit_head(model, batch)
    save_model(model.eval(), tokenizers, tmp_path / "m")
    episode = store.read_episode(0)
    loaded, in_memory = Policy.from_pretrained(tmp_path / "m"), Policy(model, tokenizers)
    for t in (0, 5):
        args = (episode.frames[t], episode.instruction)
        actions = loaded.act(*args, state=episode.states[t], reason=False, continuous=True).actions
        np.testing.assert_allclose(actions, in_memory.act(*args, state=episode.states[t], reason=False,
                                                          continuous=True).actions, atol=1e-5)
    # The head's own state input matters: the same prompt with another state given to the head acts otherwise.
    ids = in_memory.prompt(episode.frames[0], episode.instruction, episode.states[0]) + [shards.layout.special("<act>")]
    moved = episode.states[0].copy()
    moved[0] += 5.0
    assert not np.allclose(in_memory._continuous(ids, episode.states[0]), in_memory._continuous(ids, moved))
    with pytest.raises(UnifiedError, match="reads the ego state"):
        in_memory._continuous(ids, None)
    with pytest.raises(UnifiedError, match="needs model.action_head: true"):
        ModelConfig(**TINY, action_head_state=True)


def test_a_head_that_standardises_its_state(shards, tokenizers, data, tmp_path):
    """model.action_head_standardize: the head reads (v - mean) / std of the normalised state v, with the mean and
    standard deviation of the training split's policy rows (never a held-out row's), kept through export."""
    from unified.data.store import EpisodeStore
    from unified.train import head_state_values

    dim = tokenizers.state.dim
    values = head_state_values(shards, None)
    train_rows = shards.index("policy", "train")
    assert values.shape == (len(train_rows), dim)
    held_out = {int(e) for e in shards.arrays["episode"][shards.index("policy", "held_out")]}
    assert held_out and not held_out & {int(e) for e in shards.arrays["episode"][train_rows]}
    model = tiny_model(shards.layout, state_dim=dim, action_head=True, action_head_state=True,
                       action_head_standardize=True)
    model.action_head.set_state_stats(values)
    np.testing.assert_allclose(model.action_head.state_mean.numpy(), values.mean(0), atol=1e-6)
    np.testing.assert_allclose(model.action_head.state_std.numpy(), np.maximum(values.std(0), 1e-2), atol=1e-6)
    # The same head without standardising, given (v - mean) / std itself, answers the same.
    plain = tiny_model(shards.layout, state_dim=dim, action_head=True, action_head_state=True)
    plain.action_head.load_state_dict({k: v for k, v in model.action_head.state_dict().items()
                                       if k not in ("state_mean", "state_std")})
    memory, padding = torch.randn(3, 5, TINY["hidden_size"]), torch.zeros(3, 5, dtype=torch.bool)
    states = torch.from_numpy(values[:3]).float()
    standardised = (states - model.action_head.state_mean) / model.action_head.state_std
    torch.testing.assert_close(model.action_head(memory, padding, states), plain.action_head(memory, padding,
                                                                                              standardised))
    batch = batches(shards, ["policy"], rows=8)[0].to_torch()
    fit_head(model, batch)
    save_model(model.eval(), tokenizers, tmp_path / "m")
    loaded = Policy.from_pretrained(tmp_path / "m")
    torch.testing.assert_close(loaded.model.action_head.state_std, model.action_head.state_std)
    episode = EpisodeStore(data / "store").read_episode(0)
    args = (episode.frames[0], episode.instruction)
    np.testing.assert_allclose(loaded.act(*args, state=episode.states[0], reason=False, continuous=True).actions,
                               Policy(model, tokenizers).act(*args, state=episode.states[0], reason=False,
                                                            continuous=True).actions, atol=1e-5)
    with pytest.raises(UnifiedError, match="needs model.action_head_state: true"):
        ModelConfig(**TINY, action_head=True, action_head_standardize=True)


def test_a_head_with_its_own_state_path(shards, tokenizers):
    """model.action_head_state_mlp: the state reaches the chunk through an MLP of its own, added to what the decoder
    writes from the prompt; that part starts at zero, so a fresh head answers from the state alone."""
    dim = tokenizers.state.dim
    model = tiny_model(shards.layout, state_dim=dim, action_head=True, action_head_state=True,
                       action_head_standardize=True, action_head_state_mlp=True)
    head = model.action_head
    head.set_state_stats(np.random.default_rng(0).normal(size=(50, dim)))
    assert head.state_in is None and head.state_out is not None
    states, padding = torch.randn(3, dim), torch.zeros(3, 5, dtype=torch.bool)
    first = head(torch.randn(3, 5, TINY["hidden_size"]), padding, states)
    torch.testing.assert_close(first, head(torch.randn(3, 5, TINY["hidden_size"]), padding, states))
    expected = head.state_out((states - head.state_mean) / head.state_std).view(3, H, 2)
    torch.testing.assert_close(first, expected)
    batch = batches(shards, ["policy"], rows=8)[0].to_torch()
    fit_head(model, batch)  # and it learns, the decoder's part included
    assert head.out.weight.abs().sum() > 0
    with pytest.raises(UnifiedError, match="needs model.action_head_state: true"):
        ModelConfig(**TINY, action_head=True, action_head_state_mlp=True)


def test_init_from_a_local_pretrained_lm(shards, tokenizers, tmp_path):
    """The backbone starts from a local LM directory; its token i becomes the layout's text token i."""
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    from unified.tokenizers.text import PretrainedTextTokenizer

    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from unified.layout import TokenLayout

    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel()
    bpe.train_from_iterator(["Drive along the highway safely."] * 10, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<unk>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    PreTrainedTokenizerFast(tokenizer_object=bpe, unk_token="<unk>").save_pretrained(tmp_path / "lm")
    text = PretrainedTextTokenizer.from_lm(tmp_path / "lm")
    torch.manual_seed(0)
    lm = LlamaForCausalLM(LlamaConfig(vocab_size=text.vocab_size, hidden_size=64, num_hidden_layers=1,
                                      num_attention_heads=4, intermediate_size=128, tie_word_embeddings=False))
    lm.save_pretrained(tmp_path / "lm")
    layout = TokenLayout.build(text.vocab_size, tokenizers.image.config.codebook_size, tokenizers.action.vocab_size,
                               tokenizers.state.vocab_size)
    model = UnifiedModel(ModelConfig(**TINY | {"hidden_size": 64, "init_from": str(tmp_path / "lm")}), layout)
    rows = layout.segment("text")
    torch.testing.assert_close(model.backbone.get_input_embeddings().weight[rows.start:rows.stop],
                               lm.get_input_embeddings().weight)
    assert model.backbone.config.vocab_size == layout.vocab_size
    with pytest.raises(UnifiedError, match="no pretrained LM could be loaded"):
        UnifiedModel(ModelConfig(**TINY | {"init_from": str(tmp_path / "nothing")}), layout)


def test_ordinal_init_lays_each_dimensions_bins_on_a_line(shards):
    from unified.model import ordinal_init

    model = tiny_model(shards.layout)
    state = shards.layout.segment("state")
    block = state.size // 17 if state.size % 17 == 0 else state.size
    ordinal_init(model, "state", block)
    rows = model.backbone.get_input_embeddings().weight[state.start:state.start + block].detach()
    steps = rows[1:] - rows[:-1]
    torch.testing.assert_close(steps, steps[:1].expand_as(steps), rtol=1e-4, atol=1e-6)  # evenly spaced, in line
    near, far = (rows[1] - rows[0]).norm(), (rows[-1] - rows[0]).norm()
    assert far > 10 * near  # neighbouring bins start close, the ends of the range far apart
    with pytest.raises(UnifiedError, match="not made of blocks"):
        ordinal_init(model, "state", state.size + 1)


def test_fixed_state_embedding_trains_everything_but_the_state_rows(shards):
    """model.fixed_state_embedding: the same function as the learned rows (the same logits for the same weights),
    but training never moves the rows of the state bins, while it moves the other rows that occur in the batch."""
    from unified.train_config import TrainConfig

    fixed, learned = tiny_model(shards.layout, fixed_state_embedding=True), tiny_model(shards.layout)
    learned.load_state_dict(fixed.state_dict())
    tensors = batches(shards, ["policy", "world"], rows=6)[0].to_torch()
    args = tensors["input_ids"], tensors["attention_mask"], tensors["position_ids"]
    torch.testing.assert_close(fixed.logits(*args)[0], learned.logits(*args)[0])
    state, ids = shards.layout.segment("state"), tensors["input_ids"]
    assert ((ids >= state.start) & (ids < state.stop)).any()  # the batch reads state tokens
    state_rows = torch.zeros(shards.layout.vocab_size, dtype=torch.bool)
    state_rows[state.start:state.stop] = True
    grads, moved = [], []
    for model in (fixed, learned):
        before = model.backbone.get_input_embeddings().weight.detach().clone()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
        for step in range(3):
            loss, _ = model(tensors)
            optimizer.zero_grad()
            loss.backward()
            if step == 0:
                grads.append(model.backbone.get_input_embeddings().weight.grad.clone())
            optimizer.step()
        moved.append((model.backbone.get_input_embeddings().weight.detach() - before).abs().amax(-1) > 0)
    # The first step: the same gradient on every other row, none on the state rows (which the learned model moves).
    torch.testing.assert_close(grads[0][~state_rows], grads[1][~state_rows])
    assert grads[0][state_rows].abs().amax() == 0 < grads[1][state_rows].abs().amax()
    assert not moved[0][state_rows].any() and moved[1][state_rows].any() and moved[0][~state_rows].any()
    with pytest.raises(UnifiedError, match="needs ordinal_init"):
        TrainConfig(model=ModelConfig(fixed_state_embedding=True), ordinal_init=False)


def test_state_value_embedding_learns_one_direction_per_dimension_and_exports_folded(shards, tokenizers, tmp_path):
    """model.state_value_embedding: a state token's input is its row plus c * w_d (c from -1 to 1 over its
    dimension's bins); w_d learns from every state token of dimension d; an export folds c * w_d into the rows, so
    the exported (plain) backbone gives the model's logits and actions."""
    dim = tokenizers.state.dim
    with pytest.raises(UnifiedError, match="state_value_embedding"):
        tiny_model(shards.layout, state_value_embedding=True)  # no state_dim
    with pytest.raises(UnifiedError, match="choose one"):
        ModelConfig(state_value_embedding=True, fixed_state_embedding=True)
    torch.manual_seed(0)
    model = UnifiedModel(ModelConfig(**TINY | {"state_value_embedding": True}), shards.layout, state_dim=dim)
    plain = tiny_model(shards.layout)
    plain.backbone.load_state_dict(model.backbone.state_dict())
    tensors = batches(shards, ["policy", "world"], rows=6)[0].to_torch()
    args = tensors["input_ids"], tensors["attention_mask"], tensors["position_ids"]
    torch.testing.assert_close(model.logits(*args)[0], plain.logits(*args)[0])  # w starts at 0: the plain model
    loss, _ = model(tensors)
    loss.backward()
    assert model.state_value.grad.abs().amax(-1).gt(0).sum() >= dim // 2  # the dimensions the batch reads learn
    with torch.no_grad():
        model.state_value.normal_(0, 0.5)
    # By hand: state token k of dimension d, bin b of B, gets (2b / (B - 1) - 1) * w_d.
    state, bins = shards.layout.segment("state"), tokenizers.state.bins
    ids = torch.tensor([state.start, state.start + bins - 1, state.start + 2 * bins + 3, 5])
    expected = torch.stack([-model.state_value[0], model.state_value[0],
                            (2 * 3 / (bins - 1) - 1) * model.state_value[2], torch.zeros(model.state_value.shape[1])])
    torch.testing.assert_close(model._value_embeds(ids), expected)
    assert not torch.allclose(model.logits(*args)[0], plain.logits(*args)[0])
    save_model(model, tokenizers, tmp_path / "m")
    loaded, _, _ = load_model(tmp_path / "m")
    assert loaded.config.state_value_embedding and not loaded.state_value.any()
    torch.testing.assert_close(loaded.logits(*args)[0], model.logits(*args)[0], rtol=1e-4, atol=1e-4)
    saved = load_model(tmp_path / "m")[0].backbone  # the backbone alone, as transformers loads it
    torch.testing.assert_close(saved(input_ids=args[0], attention_mask=args[1], position_ids=args[2]).logits,
                               model.logits(*args)[0], rtol=1e-4, atol=1e-4)


def test_a_policy_without_frames_reads_the_prompt_it_trained_on(shards, tokenizers, data):
    """`model.policy_frames: false`: the policy tasks' samples carry no frame in either split while the world task
    keeps its frames, and the prompt the policy builds when it drives is that training sample's prompt token for
    token (as the default's is with its frame); it needs the ego state."""
    from unified.batches import MixtureBatches
    from unified.data.store import EpisodeStore
    from unified.packing import TASKS
    from unified.sequences import build

    image = shards.layout.mask("image")
    for split in ("train", "held_out"):
        batches = MixtureBatches(shards, {"policy": 1.0, "policy_reason": 1.0, "world": 1.0}, 256, 2, seed=0,
                                 split=split, policy_frames=False)
        tasks = np.concatenate([batches.batch(s).task_ids.reshape(-1) for s in range(3)])
        ids = np.concatenate([batches.batch(s).input_ids.reshape(-1) for s in range(3)])
        policy = (tasks == TASKS.index("policy")) | (tasks == TASKS.index("policy_reason"))
        assert policy.any() and not image[ids[policy]].any(), split
        assert image[ids[tasks == TASKS.index("world")]].any(), split

    a = shards.arrays
    row = int(shards.index("policy")[5])
    episode = EpisodeStore(data / "store").read_episode(int(a["episode"][row]))
    step = int(a["step"][row])
    for frames in (True, False):
        policy = Policy(tiny_model(shards.layout, policy_frames=frames).eval(), tokenizers)
        built = build(shards.sample("policy", row, frames=frames), shards.layout)
        trained = built.ids[:built.spans["actions"][0]].tolist()
        assert policy.prompt(episode.frames[step], episode.instruction, episode.states[step]) == trained
        assert image[trained].any() == frames
        policy.act(episode.frames[step], episode.instruction, state=episode.states[step], reason=False)
    with pytest.raises(UnifiedError, match="policy_frames: false .* needs model.use_state: true"):
        ModelConfig(**TINY, policy_frames=False, use_state=False)
