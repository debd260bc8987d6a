"""Rollout videos: what a driver saw and did, as an animated GIF a person can look at before reading a table.

Each frame is the image the driver was given, upscaled, beside a panel with the instruction, the step, the
commanded acceleration and steering, and the explanation of the latest decision (a reasoning policy's own words;
a scripted driver's causation record); the last frame holds the outcome for a second. `side_by_side` puts real and
imagined frames next to each other (`eval world-model --video`).
"""

from __future__ import annotations

import io
import textwrap
from pathlib import Path

import numpy as np

from unified.errors import UnifiedError

SCALE = 4  # a 64x64 frame becomes 256x256
PANEL_WIDTH = 336  # the text panel right of the frame: about 54 characters a line
LINE_PX = 12
HOLD_S = 1.0  # the outcome stays on screen this long


def _font():
    from PIL import ImageFont

    return ImageFont.load_default()


def _panel(height: int, lines: list[str], colour=(235, 235, 235)):
    """A dark panel PANEL_WIDTH x `height` with `lines` wrapped to its width (a blank line between them)."""
    from PIL import Image, ImageDraw

    panel = Image.new("RGB", (PANEL_WIDTH, height), (24, 24, 24))
    draw, font = ImageDraw.Draw(panel), _font()
    wrapped = [w for line in lines for w in [*(textwrap.wrap(line, PANEL_WIDTH // 6 - 2) or [""]), ""]]
    for k, line in enumerate(wrapped[:max(1, (height - 6) // LINE_PX)]):
        draw.text((6, 4 + k * LINE_PX), line, fill=colour, font=font)
    return panel


def rollout_frames(frames: np.ndarray, instruction: str, actions: np.ndarray, explanations: list[str | None],
                   outcome: str, title: str = "", label: str = "reasoning") -> list:
    """frames (T, H, W, 3) uint8 and actions (T, 2) of one episode, `explanations[t]` the explanation in force at
    step t -> the video's PIL images."""
    from PIL import Image

    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8 or len(frames) == 0:
        raise UnifiedError(f"rollout video: expected frames (T, H, W, 3) uint8, got {frames.shape} {frames.dtype}")
    if len(actions) != len(frames) or len(explanations) != len(frames):
        raise UnifiedError(f"rollout video: {len(frames)} frames, {len(actions)} actions and {len(explanations)} "
                           "explanations: one of each per step")
    h, w = frames.shape[1:3]
    images = []
    for t, (frame, action) in enumerate(zip(frames, actions)):
        picture = Image.fromarray(frame).resize((w * SCALE, h * SCALE), Image.NEAREST)
        lines = [title, f"instruction: {instruction}",
                 f"step {t + 1}/{len(frames)}: acceleration {action[0]:+.2f} m/s2, steering {action[1]:+.3f} rad",
                 f"{label}: {explanations[t] if explanations[t] is not None else '- (acts without one)'}"]
        canvas = Image.new("RGB", (picture.width + PANEL_WIDTH, picture.height))
        canvas.paste(picture, (0, 0))
        canvas.paste(_panel(picture.height, lines), (picture.width, 0))
        images.append(canvas)
    last = images[-1].copy()
    good = outcome == "success"
    last.paste(_panel(h * SCALE, [title, f"outcome: {outcome} after {len(frames)} steps"],
                      (120, 230, 120) if good else (240, 110, 110)), (w * SCALE, 0))
    return images + [last]


def write_gif(path: Path, images: list, fps: float, hold_s: float = HOLD_S) -> Path:
    """The images as an animated GIF at `fps`, the last one held `hold_s` seconds; written whole or not at all."""
    from unified.outputs import write_bytes_atomic

    buffer = io.BytesIO()
    durations = [round(1000 / fps)] * (len(images) - 1) + [round(1000 * hold_s)]
    images[0].save(buffer, format="GIF", save_all=True, append_images=images[1:], duration=durations, loop=0,
                   optimize=False, disposal=1)
    return write_bytes_atomic(Path(path), buffer.getvalue())


def outcome_of(summary) -> str:
    if summary.success:
        return "success"
    return "collision" if summary.collision else "off road" if summary.offroad else f"failure ({summary.end})"


def episode_video(path: Path, episode, explanations: list[str | None], fps: float, title: str,
                  label: str = "reasoning") -> Path:
    """One driven episode (`run_episode(..., render=True)`) as a GIF at `path`."""
    return write_gif(path, rollout_frames(episode.frames, episode.instruction, episode.actions, explanations,
                                          outcome_of(episode.summary), title, label), fps)


def side_by_side(real: np.ndarray, imagined: np.ndarray, labels: tuple[str, str] = ("real", "imagined"),
                 captions: list[str] | None = None) -> list:
    """Two (K, H, W, 3) uint8 sequences -> K images, real left and imagined right, upscaled, with a caption each."""
    from PIL import Image, ImageDraw

    real, imagined = np.asarray(real), np.asarray(imagined)
    if real.shape != imagined.shape or real.ndim != 4:
        raise UnifiedError(f"side by side: expected two (K, H, W, 3) arrays of one shape, got {real.shape} and "
                           f"{imagined.shape}")
    k, h, w = real.shape[:3]
    images = []
    for i in range(k):
        canvas = Image.new("RGB", (2 * w * SCALE + 4, h * SCALE + 2 * LINE_PX + 4), (24, 24, 24))
        for j, frame in enumerate((real[i], imagined[i])):
            canvas.paste(Image.fromarray(frame).resize((w * SCALE, h * SCALE), Image.NEAREST),
                         (j * (w * SCALE + 4), LINE_PX + 2))
        draw = ImageDraw.Draw(canvas)
        for j, label in enumerate(labels):
            draw.text((j * (w * SCALE + 4) + 4, 1), label, fill=(235, 235, 235), font=_font())
        if captions:
            draw.text((4, h * SCALE + LINE_PX + 3), captions[i], fill=(235, 235, 235), font=_font())
        images.append(canvas)
    return images
