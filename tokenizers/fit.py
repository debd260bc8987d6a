"""`unified tokenizer fit`: fit the image, text and action (and state) tokenizers from an episode store, and
write them with their token layout into one directory that `Tokenizers.from_pretrained` reads."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from unified.tokenizers.action import BinActionTokenizer, FastActionTokenizer
from unified.tokenizers.image import ImageTokenizer, ImageTokenizerConfig
from unified.tokenizers.image_training import ImageFitConfig, fit_image, psnr_db
from unified.tokenizers.text import PretrainedTextTokenizer, TextTokenizer

from unified.data.store import EpisodeStore
from unified.errors import UnifiedError
from unified.layout import TokenLayout
from unified.outputs import staged_dir

FORMAT = "unified-tokenizers"
FORMAT_VERSION = 1


@dataclass
class Tokenizers:
    """Everything that turns an episode into ids and back, plus the layout that places them in one vocabulary."""

    image: ImageTokenizer
    text: TextTokenizer | PretrainedTextTokenizer
    action: BinActionTokenizer
    action_fast: FastActionTokenizer | None  # None in an action-only export of a model that emits bins
    state: BinActionTokenizer
    layout: TokenLayout  # the tokenizers' own: without a fast segment (see `layout_for`)

    def layout_for(self, action_tokens: str) -> TokenLayout:
        """The layout of a model whose actions are `action_tokens` ("bins": the tokenizers' own; "fast": with the
        FAST tokenizer's vocabulary appended as the `fast` segment)."""
        if action_tokens == "bins":
            return self.layout
        if action_tokens != "fast":
            raise UnifiedError(f"model.action_tokens: expected bins or fast, got {action_tokens!r}")
        if self.action_fast is None:
            raise UnifiedError("model.action_tokens: fast, but these tokenizers have no FAST action tokenizer "
                               "(action_fast/); fit them with `unified tokenizer fit`")
        return self.layout.with_fast(self.action_fast.bpe_vocab_size)

    def save_pretrained(self, directory: str | Path, action_only: bool = False, keep_fast: bool = False) -> None:
        """`action_only` keeps what a deployed policy uses: no image decoder, and no FAST tokenizer unless
        `keep_fast` (a model that emits FAST tokens)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.image.save_pretrained(directory / "image", encoder_only=action_only)
        self.text.save_pretrained(directory / "text")
        self.action.save_pretrained(directory / "action")
        if self.action_fast is not None and (keep_fast or not action_only):
            self.action_fast.save_pretrained(directory / "action_fast")
        self.state.save_pretrained(directory / "state")
        self.layout.save(directory / "layout.json")

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> Tokenizers:
        directory = Path(directory)
        if not (directory / "layout.json").is_file():
            raise UnifiedError(
                f"{directory}: not a tokenizer directory (no layout.json); make one with `unified tokenizer fit`"
            )
        loaded = cls(
            image=ImageTokenizer.from_pretrained(directory / "image"),
            text=TextTokenizer.from_pretrained(directory / "text"),
            action=BinActionTokenizer.from_pretrained(directory / "action"),
            action_fast=(FastActionTokenizer.from_pretrained(directory / "action_fast")
                         if (directory / "action_fast").is_dir() else None),
            state=BinActionTokenizer.from_pretrained(directory / "state"),
            layout=TokenLayout.load(directory / "layout.json"),
        )
        expected = TokenLayout.build(loaded.text.vocab_size, loaded.image.config.codebook_size,
                                     loaded.action.vocab_size, loaded.state.vocab_size, loaded.layout.specials)
        if expected != loaded.layout:
            raise UnifiedError(f"{directory / 'layout.json'}: does not match the tokenizers beside it ({expected})")
        return loaded


def texts_of(store: EpisodeStore, operators: Path | None) -> list[str]:
    """Instructions and causation sentences of the store's training episodes, and operator prompts and targets if
    given."""
    texts = set()
    for index in store.train_indices():
        table = store.read_columns(index, ["instruction", "reason"])
        texts.update(table.column("instruction").unique().to_pylist())
        texts.update(table.column("reason").unique().to_pylist())
    corpus = sorted(texts)
    if operators is not None:
        from unified.data.operators import read_info

        read_info(operators, "--operators ")
        files = sorted(Path(operators).glob("hops_*.jsonl"))
        if not files:
            raise UnifiedError(f"{operators}: no hops_*.jsonl files (make them with `unified data operators`)")
        for path in files:
            for line_number, line in enumerate(path.read_text().splitlines(), 1):
                try:
                    example = json.loads(line)
                    corpus += [example["prompt"], example["target"]]
                except (json.JSONDecodeError, KeyError) as e:
                    raise UnifiedError(f"{path}:{line_number}: not an operator example ({e})") from None
    return corpus


def action_chunks(store: EpisodeStore, horizon: int, indices: list[int]) -> np.ndarray:
    """(N, horizon, 2) every window of `horizon` consecutive actions within an episode."""
    chunks = []
    for index in indices:
        actions = store.read_episode(index, frames=False).actions
        if len(actions) >= horizon:
            windows = np.lib.stride_tricks.sliding_window_view(actions, horizon, axis=0)  # (N, 2, H)
            chunks.append(windows.transpose(0, 2, 1))
    if not chunks:
        raise UnifiedError(f"{store.root}: no episode has {horizon} steps for an action chunk")
    return np.concatenate(chunks)


def frames_of(store: EpisodeStore, indices: list[int], max_frames: int, seed: int) -> np.ndarray:
    """(N, H, W, 3) uint8 frames of `indices`, at most `max_frames`, spread evenly over all episodes."""
    total = sum(store.episode_meta(i)["summary"]["steps"] for i in indices)
    keep = min(1.0, max_frames / max(total, 1))
    rng = np.random.default_rng(seed)
    frames = []
    for index in indices:
        episode_frames = store.read_episode(index).frames
        frames.append(episode_frames[rng.random(len(episode_frames)) < keep])
    return np.concatenate(frames) if frames else np.zeros((0, *store.info["image_shape"]), np.uint8)


def fit(
    *, data: Path, out: Path, operators: Path | None = None, text_from: Path | None = None,
    codebook_size: int = 1024, downsample: int = 8, image_steps: int = 700, image_batch: int = 16,
    max_frames: int = 20000, text_vocab: int = 1024, action_bins: int = 256, state_bins: int = 64,
    horizon: int = 10, fast_scale: float = 10.0, fast_vocab: int = 1024, seed: int = 0, shared_bins: bool = False,
    action_range: Literal["full", "quantiles"] = "full",
    state_binning: Literal["uniform", "equal_count"] = "uniform",
    overwrite: bool = False,
    progress: bool = True,
) -> Tokenizers:
    """Fit all tokenizers on `data` (held-out episodes excluded) and write them to `out`.

    `operators` adds an operator data set to the text corpus; `text_from` uses the tokenizer of a local
    pretrained LM directory instead of training one. `horizon` is the action chunk length FAST is fitted for.
    Action bins span the training actions' whole range (`action_range full`, min to max) or their q01..q99
    (`quantiles`, clipping the rest). State bins are equal-width from min to max (`state_binning uniform`) or
    equal-count over the training episodes' states (`equal_count`: finest where states are dense). Each
    action and state dimension has its own bins unless `shared_bins` (one set of bins for all dimensions, as earlier
    versions had). An existing tokenizer directory at `out` is replaced only with `overwrite`; anything else there
    is refused.
    """
    store = EpisodeStore(data)
    fit_on, held_out = store.train_indices(), store.held_out_indices()
    if not fit_on or not held_out:
        raise UnifiedError(
            f"{data}: {len(fit_on)} training and {len(held_out)} held-out episode(s); fitting needs both (the store "
            f"holds out {store.rule.description}): generate more episodes"
        )
    if store.info["action_stats"] is None:
        raise UnifiedError(f"{data}: meta/info.json has no action statistics; rerun `unified data generate`")
    out = Path(out)
    with staged_dir(out, "tokenizers", [data, operators, text_from], overwrite) as staging:
        say = print if progress else (lambda *a, **k: None)
        say(f"tokenizer fit: {len(fit_on)} episodes to fit on, {len(held_out)} held out", flush=True)
        h, w = store.info["image_shape"][:2]
        image_config = ImageTokenizerConfig(image_size=(h, w), codebook_size=codebook_size, downsample=downsample)
        # Weights are chosen on frames of the training episodes set aside (1 in 20); the held-out episodes are only
        # measured, once, at the end.
        frames = frames_of(store, fit_on, max_frames, seed)
        aside = np.zeros(len(frames), bool)
        aside[np.random.default_rng(seed).permutation(len(frames))[:min(1024, max(1, len(frames) // 20))]] = True
        train_frames, validation = frames[~aside], frames[aside]
        image, image_log = fit_image(
            train_frames, validation, image_config,
            ImageFitConfig(max_steps=image_steps, batch_size=image_batch, seed=seed),
            log_dir=staging / "logs", progress=progress,
        )
        test_frames = frames_of(store, held_out, max(512, max_frames // 10), seed)
        image_log["heldout_psnr_db"] = psnr_db(test_frames, image.decode(image.encode(test_frames)))
        say(f"image: held-out PSNR {image_log['heldout_psnr_db']:.2f} dB (validation "
            f"{image_log['validation_psnr_db']:.2f} dB), codebook usage {image_log['codebook_usage']:.0%} after "
            f"{image_log['steps']} steps", flush=True)

        if text_from is not None:
            text = PretrainedTextTokenizer.from_lm(text_from)
        else:
            text = TextTokenizer.fit(texts_of(store, operators), vocab_size=text_vocab)
        say(f"text: {text.vocab_size} tokens", flush=True)

        # Each action dimension its own bins: a step's steering token can never repeat its acceleration token.
        # The whole range by default: the expert's strongest corrections (steering up to 0.79 rad back to the lane)
        # are rare, so q01/q99 would clip them to a fraction of their size, and a policy could never command them.
        stats = store.info["action_stats"]
        if action_range == "full":
            stats = stats | {"q01": stats["min"], "q99": stats["max"]}
        action = BinActionTokenizer.from_stats(stats, bins=action_bins, per_dimension=not shared_bins)
        chunks = action_chunks(store, horizon, fit_on)
        fast = FastActionTokenizer.fit(chunks, store.info["action_stats"], scale=fast_scale, vocab_size=fast_vocab)
        # State bins span what the training data holds, min to max: a state beyond the 1%/99% quantiles (the slow
        # speeds a policy reaches when it brakes too long) must still read differently from the quantile itself.
        span = store.info["state_stats"] | {"q01": store.info["state_stats"]["min"],
                                            "q99": store.info["state_stats"]["max"]}
        if state_binning == "equal_count":
            # The expert steers on a heading error of hundredths of a radian, inside a range of +-0.7 rad: equal-
            # width bins would give the common headings a handful of tokens, equal-count bins give them most.
            states = np.concatenate([store.read_episode(i, frames=False).states for i in fit_on])
            state = BinActionTokenizer.from_samples(states, span, bins=state_bins, per_dimension=not shared_bins)
        else:
            state = BinActionTokenizer.from_stats(span, bins=state_bins, per_dimension=not shared_bins)
        say(f"action: {action_bins} bins; FAST {fast.bpe_vocab_size} tokens over {len(chunks)} chunks of {horizon}",
            flush=True)

        layout = TokenLayout.build(text.vocab_size, codebook_size, action.vocab_size, state.vocab_size)
        tokenizers = Tokenizers(image, text, action, fast, state, layout)
        tokenizers.save_pretrained(staging)
        fit_info = {
            "format": FORMAT, "format_version": FORMAT_VERSION, "data": str(data),
            "suite_hash": store.info["suite_hash"],
            "held_out": store.rule.description, "held_out_indices": held_out,
            "fit_episodes": len(fit_on), "held_out_episodes": len(held_out), "train_frames": int(len(train_frames)),
            "image": image_log, "options": {
                "codebook_size": codebook_size, "downsample": downsample, "image_steps": image_steps,
                "image_batch": image_batch, "max_frames": max_frames, "text_vocab": text_vocab,
                "text_from": None if text_from is None else str(text_from), "action_bins": action_bins,
                "state_bins": state_bins, "horizon": horizon, "fast_scale": fast_scale, "fast_vocab": fast_vocab,
                "seed": seed, "operators": None if operators is None else str(operators), "shared_bins": shared_bins,
                "action_range": action_range, "state_binning": state_binning,
            },
            "image_config": asdict(image_config),
        }
        (staging / "fit.json").write_text(json.dumps(fit_info, indent=2) + "\n")
    say(f"tokenizers written to {out} (layout: {layout})", flush=True)
    return tokenizers
