"""FAST as the action vocabulary (`model.action_tokens: fast`): the layout's appended segment, sequences that end
their chunk with `</act>`, a policy that learns whole chunks and reports a broken one, distillation over the FAST
tokens, and the whole path through the DeepSpeed launcher, the export and a closed-loop evaluation."""

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from unified.tokenizers.fit import Tokenizers

from unified.data.shards import TokenShards
from unified.data.store import EpisodeStore
from unified.errors import UnifiedError
from unified.layout import TokenLayout
from unified.model import ModelConfig, UnifiedModel
from unified.packing import collate
from unified.policy import Policy, WorldModel
from unified.sequences import IGNORE, build

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
H = 4


@pytest.fixture(scope="module")
def tokenizers(model_data):
    return Tokenizers.from_pretrained(model_data / "tok")


@pytest.fixture(scope="module")
def fast_shards(model_data, tokenizers):
    shards = TokenShards(model_data / "shards")
    shards.use_actions("fast", tokenizers)
    return shards


def test_the_fast_segment_is_appended_and_every_other_id_keeps_its_value(tmp_path, tokenizers):
    layout = TokenLayout.build(text=10, image=20, action=30, state=5)
    fast = layout.with_fast(7)
    assert fast.segment("fast").start == layout.vocab_size and fast.vocab_size == layout.vocab_size + 7
    for name, segment in layout.segments.items():
        assert fast.segment(name) == segment
    fast.save(tmp_path / "layout.json")
    assert TokenLayout.load(tmp_path / "layout.json") == fast and fast.with_fast(7) is fast
    with pytest.raises(UnifiedError, match="has a fast segment of 7 ids, not 8"):
        fast.with_fast(8)
    assert not layout.has("fast") and fast.has("fast")
    # A bins model's layout is the tokenizers' own, whatever else they hold.
    assert tokenizers.layout_for("bins") is tokenizers.layout
    assert tokenizers.layout_for("fast").segment("fast").size == tokenizers.action_fast.bpe_vocab_size
    with pytest.raises(UnifiedError, match="model.action_tokens: expected one of bins, fast, got 'dct'"):
        ModelConfig(action_tokens="dct")
    with pytest.raises(UnifiedError, match="needs a token layout with a fast segment"):
        UnifiedModel(ModelConfig(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64,
                                 action_tokens="fast"), layout)


def test_a_chunk_that_is_not_whole_is_named(model_data, tokenizers):
    fast = tokenizers.action_fast
    chunk = EpisodeStore(model_data / "store").read_episode(0).actions[:H]
    ids = fast.encode(chunk[None])[0]
    assert fast.problem(ids) is None
    np.testing.assert_allclose(fast.decode([ids])[0], fast.decode(fast.encode(chunk[None]))[0])
    whole = 2 * H  # coefficients of a chunk: H steps of 2 values
    assert fast.problem([]) == f"0 of the chunk's {whole} DCT coefficients"
    assert fast.problem(ids + ids) == f"{2 * whole} DCT coefficients, {whole} more than the chunk's {whole}"
    assert fast.decode([[]]).shape == (1, H, 2)  # decodable, but `problem` said it is not whole


@pytest.mark.slow
def test_a_fast_policy_learns_whole_chunks_and_reports_a_broken_one(model_data, tokenizers, fast_shards, overfit):
    layout = fast_shards.layout
    row = int(fast_shards.index("policy")[3])
    built = build(fast_shards.sample("policy", row), layout)
    start, stop = built.spans["actions"]
    chunk = built.ids[start:stop]
    assert chunk[0] == layout.special("<act>") and layout.has("fast")
    assert np.all(layout.mask("fast")[chunk[1:]]) and built.ids[stop] == layout.special("</act>")
    # Position i predicts token i + 1: the marker's successor onwards are targets, `</act>` included.
    assert built.targets[start - 1] == IGNORE and list(built.targets[start:stop]) == list(built.ids[start + 1:stop + 1])
    assert np.all(built.action_block == -1)  # one causal span, no blocks
    values = fast_shards.action_values(row)
    np.testing.assert_array_equal(layout.to_local("fast", chunk[1:]), tokenizers.action_fast.encode(values[None])[0])

    torch.manual_seed(0)
    config = ModelConfig(hidden_size=96, num_layers=2, num_heads=4, intermediate_size=192,
                         max_position_embeddings=256, horizon=H, action_tokens="fast")
    untrained = Policy(UnifiedModel(config, layout), tokenizers)
    model = UnifiedModel(config, layout)
    episodes = [0, 1]
    overfit(model, fast_shards, episodes)
    store, policy = EpisodeStore(model_data / "store"), Policy(model, tokenizers)
    exact, results = [], []
    for e in episodes:
        episode = store.read_episode(e)
        for t in (0, 5, 10):
            own = tokenizers.action_fast.decode(tokenizers.action_fast.encode(episode.actions[t:t + H][None]))[0]
            for decoding in ("whole", "free"):
                result = policy.act(episode.frames[t], episode.instruction, state=episode.states[t], reason=False,
                                    fast_decoding=decoding)
                exact.append(np.allclose(result.actions, own, atol=1e-4))
                results.append(result)
    # Trained, the model ends its chunks itself where they are whole: free decoding needs no constraint here.
    assert [r.malformed for r in results] == [None] * len(results)
    assert np.mean(exact) >= 5 / 6, exact  # the expert's chunk as FAST writes it
    assert all(r.tokens_generated <= policy.fast_budget + 1 for r in results)
    with pytest.raises(UnifiedError, match="this model writes FAST tokens"):
        policy.act(episode.frames[0], episode.instruction, state=episode.states[0], reason=False, readout="mean")
    world = WorldModel(model, tokenizers)
    assert world.imagine(episode.frames[0], episode.actions[:2 * H]).shape == (2, 32, 32, 3)
    # `eval world-model`'s teacher-forced accuracy builds its world samples with the chunk in FAST tokens too.
    from unified.eval.world_model import token_accuracy

    first = store.read_episode(0)
    steps = np.arange(0, 12, 3)
    accuracy = token_accuracy(world, first.frames[steps][:, None], np.stack([first.actions[t:t + H] for t in steps]),
                              first.frames[steps + H])
    print(f"teacher-forced next-frame accuracy on a trained episode: {accuracy:.3f}")
    assert accuracy > 0.8, accuracy
    # An untrained model decoding freely makes no whole chunk: it says so, and the chunk is still (H, 2) finite
    # values. Decoding whole chunks, the same model's chunk is whole: its tokens stand for exactly H * 2 coefficients.
    broken = untrained.act(episode.frames[0], episode.instruction, state=episode.states[0], reason=False,
                           fast_decoding="free")
    assert broken.malformed is not None and broken.actions.shape == (H, 2) and np.isfinite(broken.actions).all()
    whole = untrained.act(episode.frames[0], episode.instruction, state=episode.states[0], reason=False)
    assert whole.malformed is None and tokenizers.action_fast.problem([]) is not None
    lengths = tokenizers.action_fast.token_lengths()
    assert whole.tokens_generated >= 1 and whole.actions.shape == (H, 2) and lengths.min() >= 1
    with pytest.raises(UnifiedError, match="fast_decoding: 'loose' is not one of whole, free"):
        untrained.act(episode.frames[0], episode.instruction, state=episode.states[0], fast_decoding="loose")

    # Distillation over the FAST tokens: one soft target per FAST target of the student's batch, over the segment.
    from unified.distill import distill_targets

    rows = [int(r) for r in fast_shards.index("policy") if int(fast_shards.arrays["episode"][r]) in episodes][:4]
    student = [build(fast_shards.sample("policy", r), layout) for r in rows]
    batch = collate([[s] for s in student], max(len(s) for s in student), layout)
    soft = distill_targets(model, fast_shards, batch)
    fast_targets = sum(int(np.sum(layout.mask("fast")[s.targets[s.targets != IGNORE]])) for s in student)
    assert soft["soft_logprobs"].shape == (fast_targets, layout.segment("fast").size)
    tensors = batch.to_torch() | soft | {"distill": torch.tensor([1.0, 1.0, 1.0])}
    loss, metrics = model(tensors)
    assert torch.isfinite(loss) and float(metrics["loss/distill_kl"]) >= 0


@pytest.mark.slow
def test_fast_trains_through_the_launcher_exports_and_is_counted_in_closed_loop(model_data, tmp_path):
    from unified.eval.closed_loop import closed_loop

    run = tmp_path / "run"
    result = subprocess.run([str(BIN / "unified"), "train", "--recipe", str(ROOT / "recipes" / "debug.yaml"),
                             "--ranks", "2", f"run_dir={run}", f"data={model_data / 'shards'}", "model.horizon=4",
                             "data.seq_len=256", "steps=2", "save_every=2", "sample_every=2",
                             "model.action_tokens=fast"], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    export = subprocess.run([str(BIN / "unified"), "export", "--checkpoint", str(run), "--out", str(tmp_path / "m"),
                             "--action-only"], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert export.returncode == 0, export.stderr[-3000:]
    assert "FAST action tokenizer (its actions)" in export.stdout and (tmp_path / "m/tokenizers/action_fast").is_dir()
    policy = Policy.from_pretrained(tmp_path / "m")
    assert policy.fast and policy.layout.has("fast")
    # Whole chunks only (the default): none malformed. Free decoding of the untrained model: each one counted.
    whole = closed_loop(model=str(tmp_path / "m"), scenarios=model_data / "suite.yaml", episodes=1, mode="direct",
                        progress=False)
    assert whole["overall"]["malformed_decodes"]["decisions"] == 0 and whole["fast_decoding"] == "whole"
    report = closed_loop(model=str(tmp_path / "m"), scenarios=model_data / "suite.yaml", episodes=1, mode="direct",
                         fast_decoding="free", json=tmp_path / "cl.json", progress=False)
    bad = report["overall"]["malformed_decodes"]
    assert bad["of"] == report["overall"]["decision_latency_ms"]["decisions"] > 0 and bad["decisions"] > 0
    assert bad["decisions"] == sum(v["malformed_decodes"]["decisions"] for v in report["scenarios"].values())
    assert len(bad["examples"]) == min(5, bad["decisions"])
    assert all(re.fullmatch(r"highway episode 0, step \d+: (\d+ (of the chunk's 8 )?DCT coefficients.*|no </act> "
                            r"within 9 FAST tokens)", example) for example in bad["examples"]), bad["examples"]
    saved = json.loads((tmp_path / "cl.json").read_text())
    assert saved["overall"]["malformed_decodes"] == bad and saved["fast_decoding"] == "free"
