"""`unified tokenizer fit` and `unified tokenizer eval` end to end on a tiny store."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from unified.tokenizers.fit import Tokenizers, fit

from unified.data.store import EpisodeStore
from unified.errors import UnifiedError
from unified.layout import TokenLayout

UNIFIED = str(Path(sys.executable).parent / "unified")


@pytest.fixture(scope="module")
def store(split_store):
    return split_store


@pytest.fixture(scope="module")
def tokdir(store, tmp_path_factory):
    out = tmp_path_factory.mktemp("tok") / "tokenizers"
    fit(data=store, out=out, image_steps=40, horizon=4, text_vocab=400, fast_vocab=600, state_binning="equal_count",
        progress=False)
    return out


def test_fit_writes_a_complete_directory(tokdir, store):
    for name in ("image/model.safetensors", "image/config.json", "text/spm.model", "action/config.json",
                 "action_fast/config.json", "state/config.json", "layout.json", "fit.json"):
        assert (tokdir / name).is_file(), name
    assert list((tokdir / "logs").glob("events.out.tfevents.*"))  # TensorBoard
    info = json.loads((tokdir / "fit.json").read_text())
    assert info["held_out_episodes"] == 2 and info["fit_episodes"] == 8 and info["held_out_indices"] == [8, 9]
    assert info["image"]["history"] and info["image"]["heldout_psnr_db"] > 10
    assert info["image"]["validation_psnr_db"] > 10  # weights chosen on frames of training episodes set aside
    tokenizers = Tokenizers.from_pretrained(tokdir)
    assert tokenizers.layout == TokenLayout.load(tokdir / "layout.json")
    assert tokenizers.layout.segment("image").size == 1024
    # Normalisation comes from the store's statistics, never from typed-in numbers: by default the action bins
    # span the training actions' whole range (min to max), so the expert's rare strong corrections stay commandable.
    stats = json.loads((store / "meta" / "info.json").read_text())["action_stats"]
    assert info["options"]["action_range"] == "full"
    assert list(tokenizers.action.q01) == stats["min"] and list(tokenizers.action.q99) == stats["max"]
    # Equal-count state bins (an option) are placed on the states of the training episodes alone, never the
    # held-out ones.
    assert info["options"]["state_binning"] == "equal_count"
    episodes = EpisodeStore(store)
    train = np.concatenate([episodes.read_episode(i, frames=False).states for i in episodes.train_indices()])
    everything = np.concatenate([episodes.read_episode(i, frames=False).states for i in episodes.indices()])
    quantiles = np.arange(1, tokenizers.state.bins) / tokenizers.state.bins
    np.testing.assert_allclose(tokenizers.state.edges, np.quantile(train.astype(np.float64), quantiles, axis=0).T)
    assert not np.allclose(tokenizers.state.edges, np.quantile(everything, quantiles, axis=0).T)


def test_eval_json_has_the_documented_figures(tokdir, store):
    result = subprocess.run([UNIFIED, "tokenizer", "eval", "--tokenizer", str(tokdir), "--data", str(store), "--json"],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    for key in ("image_psnr_db", "image_codebook_usage", "image_encode_fps", "action_bins_mae", "action_fast_mae",
                "action_fast_tokens_per_chunk", "text_vocab_size", "vocab_size"):
        assert key in report, key
    assert 0 < report["image_codebook_usage"] <= 1 and report["image_encode_fps"] > 0
    assert report["action_fast_tokens_per_chunk"] < report["action_bins_tokens_per_chunk"]
    assert set(report["action_bins_mae"]) == {"acceleration", "steering"}


def test_a_layout_that_does_not_match_is_refused(tokdir, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(tokdir, copy)
    TokenLayout.build(text=7, image=1024, action=256, state=256).save(copy / "layout.json")
    with pytest.raises(UnifiedError, match="does not match the tokenizers"):
        Tokenizers.from_pretrained(copy)


def test_a_layout_saved_before_the_step_marker_still_loads(tokdir, tmp_path):
    """Tokenizers fitted before `<step>` joined the markers keep their layout (and every id in their shards and
    models); only the inductive scratchpad, which needs the marker, is refused with them."""
    import json
    import shutil

    copy = tmp_path / "old"
    shutil.copytree(tokdir, copy)
    data = json.loads((copy / "layout.json").read_text())
    assert data["specials"][-1] == "<step>"
    data["specials"] = data["specials"][:-1]
    for name, segment in data["segments"].items():
        segment["start"] = max(0, segment["start"] - 1)
        segment["size"] -= name == "special"
    data["vocab_size"] -= 1
    (copy / "layout.json").write_text(json.dumps(data))
    old = Tokenizers.from_pretrained(copy)
    new = Tokenizers.from_pretrained(tokdir)
    assert old.layout.vocab_size == new.layout.vocab_size - 1 and old.layout.special("</state>") == 11
    with pytest.raises(UnifiedError, match="no special token '<step>'"):
        old.layout.special("<step>")


def test_fit_needs_held_out_episodes(tiny_store, tmp_path):
    # 4 episodes, 2 per scenario: the default rule (every 10th of each scenario) holds none out.
    with pytest.raises(UnifiedError, match="4 training and 0 held-out episode.*fitting needs both"):
        fit(data=tiny_store, out=tmp_path / "t", progress=False)


def test_eval_of_a_directory_that_is_not_a_tokenizer(tmp_path, store):
    result = subprocess.run([UNIFIED, "tokenizer", "eval", "--tokenizer", str(tmp_path), "--data", str(store)],
                            capture_output=True, text=True)
    assert result.returncode == 2 and "not a tokenizer directory" in result.stderr and "Traceback" not in result.stderr


def test_round_trip_of_real_episode_data(tokdir, store):
    from unified.data.store import EpisodeStore

    tokenizers = Tokenizers.from_pretrained(tokdir)
    episode = EpisodeStore(store).read_episode(9)
    codes = tokenizers.image.encode(episode.frames)
    assert codes.shape == (len(episode.frames), tokenizers.image.config.tokens_per_image)
    global_ids = tokenizers.layout.to_global("image", codes)
    np.testing.assert_array_equal(tokenizers.layout.to_local("image", global_ids), codes)
    text_ids = tokenizers.text.encode([episode.instruction, episode.causation[0].text])
    assert tokenizers.text.decode(text_ids) == [episode.instruction, episode.causation[0].text]
