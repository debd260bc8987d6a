"""`unified eval world-model`: imagined futures against the real ones on held-out episodes: PSNR and SSIM per
horizon (autoregressive rollouts of 1..K chunks), the same for copying the current frame (the baseline a
world model has to beat), teacher-forced next-frame token accuracy, a PNG strip of real vs imagined, and a GIF of
the same side by side (`--video`)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np
from tqdm import tqdm

from unified.errors import UnifiedError


def psnr_db(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else float(10 * np.log10(255.0**2 / mse))


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    """Structural similarity of two (H, W, 3) uint8 frames (scikit-image, per channel, 7x7 window)."""
    from skimage.metrics import structural_similarity

    return float(structural_similarity(a, b, channel_axis=2, data_range=255))


def token_accuracy(world, frames: np.ndarray, actions: np.ndarray, next_frames: np.ndarray) -> float:
    """Teacher-forced accuracy of the next frame's image tokens, over a batch of world samples."""
    from unified.packing import pack
    from unified.policy import next_frame_accuracy
    from unified.sequences import Sample, build

    layout, tok = world.layout, world.tokenizers
    built = []
    for f, a, n in zip(frames, actions, next_frames):
        codes = layout.to_global("image", tok.image.encode(np.concatenate([f, n[None]])))
        sample = Sample("world", frames=codes[:-1], next_frame=codes[-1],
                        actions=layout.to_global("action", tok.action.encode(a[None])[0]).reshape(len(a), -1))
        if world.config.action_tokens == "fast":  # the chunk in the tokens this model reads
            sample.fast_actions = layout.to_global("fast", tok.action_fast.encode(a[None])[0])
        built.append(build(sample, layout))
    seq_len = max(len(b) for b in built)
    accuracies = [next_frame_accuracy(world.model, batch.to_torch()) for batch in pack(built, seq_len, 8, layout)]
    return float(np.mean(accuracies))


def world_model(
    *, model: Path, data: Path, json: Path | None = None, horizon: int = 3, episodes: int = 8,
    strip: Path | None = None, video: Path | None = None, device: Literal["auto", "cpu", "cuda"] = "auto",
    progress: bool = True,
) -> dict:
    """Roll the world model out `horizon` chunks from the start of up to `episodes` held-out episodes of
    `data` (taken round robin over its scenarios) and compare with what really happened; the model runs on
    `device` (auto: cuda when a GPU is present). `--strip` writes real over imagined frames as a PNG, `--video`
    (a .gif) the real future left and the imagined one right, one chunk a second, for the first four episodes."""
    from unified.data.store import EpisodeStore
    from unified.outputs import check_file, write_report
    from unified.policy import WorldModel

    if horizon < 1 or episodes < 1:
        raise UnifiedError(f"--horizon and --episodes must be at least 1, got {horizon} and {episodes}")
    if json is not None:
        check_file(json, "world-model", [model, data])
    if strip is not None:
        check_file(strip, None, [model, data], what="--strip")
    if video is not None:
        if Path(video).suffix != ".gif":
            raise UnifiedError(f"--video {video}: the video is written as a GIF; name it FILE.gif")
        check_file(video, "gif", [model, data], what="--video")
    from unified.model_dir import resolve_device

    world = WorldModel.from_pretrained(model, device=resolve_device(device))
    h, history = world.config.horizon, world.config.history
    store = EpisodeStore(data)
    indices = store.held_out_indices(stratified=True)
    chosen = [i for i in indices if store.episode_meta(i)["summary"]["steps"] > horizon * h + history][:episodes]
    if not chosen:
        raise UnifiedError(f"{data}: no held-out episode is long enough for {horizon} chunks of {h} steps "
                           f"({len(indices)} held out: {store.rule.description})")
    psnr, structural, copy_psnr, rows = [], [], [], []
    tf_frames, tf_actions, tf_next = [], [], []
    for index in tqdm(chosen, desc="world model", unit="ep", disable=not progress):
        episode = store.read_episode(index)
        t = history - 1
        imagined = world.imagine(episode.frames[:t + 1], episode.actions[t:t + horizon * h], horizon=horizon)
        truth = episode.frames[[t + (k + 1) * h for k in range(horizon)]]
        psnr.append([psnr_db(i, r) for i, r in zip(imagined, truth)])
        structural.append([ssim(i, r) for i, r in zip(imagined, truth)])
        copy_psnr.append([psnr_db(episode.frames[t], r) for r in truth])
        rows.append((episode.frames[t], truth, imagined))
        for s in range(t, len(episode.actions) - h, h):
            tf_frames.append(episode.frames[s - history + 1:s + 1])
            tf_actions.append(episode.actions[s:s + h])
            tf_next.append(episode.frames[s + h])
    report = {
        "model": str(model), "data": str(data), "episodes": len(chosen), "episode_indices": chosen,
        "scenarios": sorted({store.suite.scenario_for_episode(i).name for i in chosen}),
        "held_out": store.rule.description, "chunk_steps": h,
        "horizon_chunks": horizon,
        "psnr_db": np.mean(psnr, 0).tolist(), "ssim": np.mean(structural, 0).tolist(),
        "copy_current_frame_psnr_db": np.mean(copy_psnr, 0).tolist(),
        "next_frame_token_accuracy": token_accuracy(world, np.stack(tf_frames), np.stack(tf_actions),
                                                    np.stack(tf_next)),
    }
    for k in range(horizon):
        print(f"{(k + 1) * h:3d} steps ahead: PSNR {report['psnr_db'][k]:.2f} dB (copying the current frame: "
              f"{report['copy_current_frame_psnr_db'][k]:.2f} dB), SSIM {report['ssim'][k]:.3f}")
    print(f"next-frame token accuracy (teacher-forced): {report['next_frame_token_accuracy']:.1%}")
    if strip is not None:
        _write_strip(rows[:4], Path(strip))
        report["strip"] = str(strip)
        print(f"wrote {strip}")
    if video is not None:
        from unified.eval.video import side_by_side, write_gif

        images = []
        for n, (now, truth, imagined) in enumerate(rows[:4]):
            captions = [f"held-out episode {chosen[n]}: now"] + \
                [f"held-out episode {chosen[n]}: {(k + 1) * h} steps ahead" for k in range(len(truth))]
            images += side_by_side(np.concatenate([now[None], truth]), np.concatenate([now[None], imagined]),
                                   captions=captions)
        write_gif(Path(video), images, fps=1.0)
        report["video"] = str(video)
        print(f"wrote {video}")
    if json is not None:
        write_report(Path(json), report, "world-model")
        print(f"wrote {json}")
    return report


def _write_strip(rows, path: Path) -> None:
    """One row per episode: the current frame, then real over imagined for each chunk ahead."""
    from PIL import Image

    gap = 2
    first, truth, _ = rows[0]
    fh, fw = first.shape[:2]
    columns = 1 + len(truth)
    canvas = np.full((len(rows) * (2 * fh + 3 * gap), columns * (fw + gap), 3), 255, np.uint8)
    for r, (now, truth, imagined) in enumerate(rows):
        top = r * (2 * fh + 3 * gap)
        canvas[top:top + fh, :fw] = now
        for k in range(len(truth)):
            left = (k + 1) * (fw + gap)
            canvas[top:top + fh, left:left + fw] = truth[k]
            canvas[top + fh + gap:top + 2 * fh + gap, left:left + fw] = imagined[k]
    path.parent.mkdir(parents=True, exist_ok=True)
    import io

    from unified.outputs import write_bytes_atomic

    buffer = io.BytesIO()
    Image.fromarray(canvas).resize((canvas.shape[1] * 3, canvas.shape[0] * 3), Image.NEAREST).save(buffer, "PNG")
    write_bytes_atomic(path, buffer.getvalue())
