"""`unified tokenizer eval`: reconstruction, codebook usage, encode throughput and action round-trip errors of a
fitted tokenizer directory on an episode store's held-out episodes."""

from __future__ import annotations

import json as jsonlib
import time
from pathlib import Path

import numpy as np
import torch
from unified.tokenizers.fit import Tokenizers, action_chunks, frames_of
from unified.tokenizers.image_training import codebook_usage, psnr_db

from unified.data.store import EpisodeStore
from unified.errors import UnifiedError


def encode_throughput(tokenizer, frames: np.ndarray, repeats: int = 3) -> float:
    """Frames per second of `ImageTokenizer.encode` on this machine (best of `repeats`, after a warm-up)."""
    batch = np.resize(frames, (1024, *frames.shape[1:]))  # 1024 frames, repeating the held-out ones
    tokenizer.encode(batch[:256])
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        tokenizer.encode(batch)
        best = min(best, time.perf_counter() - start)
    return len(batch) / best


def evaluate(*, tokenizer: Path, data: Path, json: bool = False, max_frames: int = 2000) -> dict:
    """Figures of the tokenizers in `tokenizer` on the held-out episodes of `data` (no training step saw them;
    an evaluation-only store holds out all of its episodes)."""
    tokenizers = Tokenizers.from_pretrained(tokenizer)
    if tokenizers.action_fast is None or tokenizers.image.encoder_only:
        raise UnifiedError(f"{tokenizer}: an action-only export (no image decoder, no FAST): nothing to evaluate")
    store = EpisodeStore(data)
    indices = store.held_out_indices()
    if not indices:
        raise UnifiedError(f"{data}: no held-out episodes to evaluate on ({store.rule.description})")
    frames = frames_of(store, indices, max_frames, seed=0)
    codes = tokenizers.image.encode(frames)
    reconstruction = tokenizers.image.decode(codes)
    horizon = tokenizers.action_fast.horizon
    chunks = action_chunks(store, horizon, indices)
    names = tokenizers.action.names or tuple(f"dim{i}" for i in range(tokenizers.action.dim))
    bins_error = np.abs(tokenizers.action.decode(tokenizers.action.encode(chunks)) - chunks).mean((0, 1))
    fast_ids = tokenizers.action_fast.encode(chunks)
    fast_error = np.abs(tokenizers.action_fast.decode(fast_ids) - chunks).mean((0, 1))
    report = {
        "data": str(data),
        "episodes": len(indices),
        "held_out": store.rule.description,
        "scenarios": sorted({store.suite.scenario_for_episode(i).name for i in indices}),
        "frames": int(len(frames)),
        "image_psnr_db": psnr_db(frames, reconstruction),
        "image_codebook_usage": codebook_usage(codes, tokenizers.image.config.codebook_size),
        "image_encode_fps": encode_throughput(tokenizers.image, frames),
        "image_tokens_per_frame": tokenizers.image.config.tokens_per_image,
        "action_chunk": horizon,
        "action_units": dict(zip(names, store.info["action_units"])),
        "action_bins_mae": dict(zip(names, map(float, bins_error))),
        "action_bins_tokens_per_chunk": horizon * tokenizers.action.dim,
        "action_fast_mae": dict(zip(names, map(float, fast_error))),
        "action_fast_tokens_per_chunk": float(np.mean([len(i) for i in fast_ids])),
        "text_vocab_size": tokenizers.text.vocab_size,
        "vocab_size": tokenizers.layout.vocab_size,
        "threads": torch.get_num_threads(),
    }
    if json:
        print(jsonlib.dumps(report, indent=2))
    else:
        print(f"{tokenizer} on {data} ({report['episodes']} episodes, {report['frames']} frames)")
        print(f"image  PSNR {report['image_psnr_db']:.2f} dB, codebook usage {report['image_codebook_usage']:.0%}, "
              f"encode {report['image_encode_fps']:.0f} frames/s on {report['threads']} threads")
        for label, key in (("bins", "action_bins"), ("FAST", "action_fast")):
            errors = ", ".join(f"{n} {v:.4f} {report['action_units'][n]}" for n, v in report[f"{key}_mae"].items())
            print(f"action {label}: mean abs error {errors}; {report[f'{key}_tokens_per_chunk']:.1f} tokens per "
                  f"chunk of {horizon}")
        print(f"text   {report['text_vocab_size']} tokens; vocabulary {report['vocab_size']} in all")
    return report
