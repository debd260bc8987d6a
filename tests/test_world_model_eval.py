"""`unified eval world-model` on a tiny exported model: the schema, the copy baseline and the strip."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from unified.eval.world_model import psnr_db, ssim
from unified.tokenizers.fit import Tokenizers

from unified.model import ModelConfig, UnifiedModel
from unified.model_dir import save_model


def test_metrics_on_known_images():
    a = np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    assert psnr_db(a, a) == float("inf") and ssim(a, a) == 1.0
    noisy = np.clip(a.astype(int) + 10, 0, 255).astype(np.uint8)
    assert 25 < psnr_db(a, noisy) < 30 and ssim(a, noisy) < 1.0


def test_world_model_eval_command(model_data, tmp_path):
    tokenizers = Tokenizers.from_pretrained(model_data / "tok")
    torch.manual_seed(0)
    model = UnifiedModel(ModelConfig(hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128,
                                     max_position_embeddings=256, horizon=4), tokenizers.layout)
    save_model(model, tokenizers, tmp_path / "model")
    result = subprocess.run(
        [str(Path(sys.executable).parent / "unified"), "eval", "world-model", "--model", str(tmp_path / "model"),
         "--data", str(model_data / "store"), "--horizon", "2", "--episodes", "1", "--json", str(tmp_path / "w.json"),
         "--strip", str(tmp_path / "strip.png"), "--video", str(tmp_path / "w.gif")],
        capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads((tmp_path / "w.json").read_text())
    assert len(report["psnr_db"]) == len(report["ssim"]) == len(report["copy_current_frame_psnr_db"]) == 2
    assert 0 <= report["next_frame_token_accuracy"] <= 1
    # The baseline is what it says: the current frame against the real frames 4 and 8 steps later (episode 9 is
    # the held-out one).
    from unified.data.store import EpisodeStore

    frames = EpisodeStore(model_data / "store").read_episode(9).frames
    np.testing.assert_allclose(report["copy_current_frame_psnr_db"], [psnr_db(frames[0], frames[4]),
                                                                      psnr_db(frames[0], frames[8])])
    assert all(np.isfinite(report["psnr_db"])) and all(0 < v <= 1 for v in report["ssim"])
    assert (tmp_path / "strip.png").stat().st_size > 0
    # The video: the current frame, then real left and imagined right for each chunk ahead.
    from PIL import Image

    with Image.open(tmp_path / "w.gif") as gif:
        assert gif.n_frames == 1 + 2 and gif.size == (2 * 32 * 4 + 4, 32 * 4 + 2 * 12 + 4)
        gif.seek(0)
        now = np.asarray(gif.convert("RGB"))
    assert (now[14:14 + 128, :128] == now[14:14 + 128, 132:]).all()  # "now" is the same frame on both sides
    assert report["video"] == str(tmp_path / "w.gif")
    (tmp_path / "notes.txt").write_text("keep")
    refused = subprocess.run(
        [str(Path(sys.executable).parent / "unified"), "eval", "world-model", "--model", str(tmp_path / "model"),
         "--data", str(model_data / "store"), "--video", str(tmp_path / "notes.txt")], capture_output=True, text=True)
    assert refused.returncode == 2 and "name it FILE.gif" in refused.stderr
    (tmp_path / "thesis.gif").write_text("four years of work")  # a .gif that is not a GIF is not overwritten
    refused = subprocess.run(
        [str(Path(sys.executable).parent / "unified"), "eval", "world-model", "--model", str(tmp_path / "model"),
         "--data", str(model_data / "store"), "--video", str(tmp_path / "thesis.gif")], capture_output=True, text=True)
    assert refused.returncode == 2 and "is not a GIF" in refused.stderr
    assert (tmp_path / "thesis.gif").read_text() == "four years of work"
