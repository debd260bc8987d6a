"""Using a trained model: `Policy.act` (frames + instruction -> reasoning and an action chunk) and
`WorldModel.imagine` (frames + actions -> future frames), loaded from a model directory (`unified.model_dir`)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from unified.errors import UnifiedError
from unified.generation import Decoder
from unified.model import UnifiedModel, state_values
from unified.model_dir import Verify, load_model
from unified.sequences import action_chunk
from unified.tokenizers.action import FAST_DECODING, FAST_DECODINGS, READOUT, READOUTS
from unified.tokenizers.fit import Tokenizers


@dataclass
class ActionResult:
    actions: np.ndarray  # (H, 2) acceleration m/s^2, steering rad
    reasoning: str | None  # the generated explanation, None when asked to act directly
    tokens_generated: int
    latency_ms: float
    # A model's action tokens that do not make a whole chunk (FAST: no `</act>` within the budget, or a number of
    # DCT coefficients other than H * D), in words; None when the chunk is whole. The actions are then the partial
    # decode (missing coefficients zero), and evaluations count these decisions: never silently.
    malformed: str | None = None


def _frames(frames, history: int, shape: tuple[int, int]) -> np.ndarray:
    frames = np.asarray(frames)
    if frames.ndim == 3:
        frames = frames[None]
    if frames.ndim != 4 or frames.shape[1:] != (*shape, 3) or frames.dtype != np.uint8:
        raise UnifiedError(f"expected frames of shape (T, {shape[0]}, {shape[1]}, 3) uint8 (or one frame), got "
                           f"{frames.shape} {frames.dtype}")
    if len(frames) == 0:
        raise UnifiedError("no frames: the policy needs at least the current frame (T >= 1)")
    if len(frames) < history:  # at the start of an episode, as in training: repeat the oldest frame
        frames = np.concatenate([np.repeat(frames[:1], history - len(frames), 0), frames])
    return frames[-history:]


def _state(state, tokenizer) -> np.ndarray:
    """The ego state as (S,) float64, checked: the right length and finite, named as the state in errors."""
    try:
        values = np.asarray(state, np.float64).reshape(-1)
    except (TypeError, ValueError):
        raise UnifiedError(f"state: expected {tokenizer.dim} numbers ({', '.join(tokenizer.names)}), got "
                           f"{state!r}") from None
    if len(values) != tokenizer.dim:
        raise UnifiedError(f"state: expected {tokenizer.dim} values ({', '.join(tokenizer.names)}), got "
                           f"{len(values)}")
    if not np.isfinite(values).all():
        raise UnifiedError(f"state: not finite ({dict(zip(tokenizer.names, values.tolist()))})")
    return values


class Policy:
    """Frames + instruction (+ ego state) -> optional reasoning -> an action chunk in the simulator's units."""

    def __init__(self, model: UnifiedModel, tokenizers: Tokenizers):
        self.model, self.tokenizers, self.layout = model.eval(), tokenizers, model.layout
        self.config = model.config
        self.fast = model.config.action_tokens == "fast"
        self._fast_lengths: np.ndarray | None = None  # DCT coefficients per global id, 0 outside the FAST segment
        if self.fast and tokenizers.action_fast is None:
            raise UnifiedError("this model writes its actions as FAST tokens but its tokenizers have no FAST "
                               "tokenizer (action_fast/)")

    @property
    def fast_budget(self) -> int:
        """The most FAST tokens a chunk may take before `</act>`: one more than a whole chunk can need (each token
        stands for at least one of its H * D coefficients), so that an over-long chunk is seen as one."""
        return self.config.horizon * self.tokenizers.action.dim + 1

    @classmethod
    def from_pretrained(cls, directory: str | Path, device: str = "cpu", verify: Verify = "size") -> Policy:
        """Load an exported model directory, verified against its manifest (`verify`: size, full or none)."""
        model, tokenizers, _ = load_model(directory, device, verify)
        return cls(model, tokenizers)

    def prompt(self, frames, instruction: str, state=None) -> list[int]:
        """Global ids of `<bos> instruction <img> f </img> ... [<state> s </state>]` (no frames for a model with
        `policy_frames: false`; they are still checked)."""
        layout, tok = self.layout, self.tokenizers
        frames = _frames(frames, self.config.history, tok.image.config.image_size)
        if not isinstance(instruction, str) or not instruction.strip():
            raise UnifiedError("the instruction is empty: give the policy a task in words")
        text = layout.to_global("text", tok.text.encode([instruction])[0])
        if len(text) == 0:
            raise UnifiedError(f"the instruction {instruction!r} has no tokens")
        ids = [layout.special("<bos>"), *text.tolist()]
        for codes in tok.image.encode(frames) if self.config.policy_frames else []:
            ids += [layout.special("<img>"), *layout.to_global("image", codes).tolist(), layout.special("</img>")]
        if self.config.use_state:
            if state is None:
                raise UnifiedError("this policy was trained with the ego state: pass state=(speed m/s, heading rad, "
                                   "lane offset m)")
            state = _state(state, tok.state)
            state_ids = layout.to_global("state", tok.state.encode(state[None, None])[0])[:self.config.state_dims]
            ids += [layout.special("<state>"), *state_ids.tolist(), layout.special("</state>")]
        return ids

    def action_masks(self) -> np.ndarray:
        """(D, V) bool: the ids each action dimension may take (its own bins when the tokenizer gives each dimension
        its own, so that steering can never be read from an acceleration bin)."""
        tokenizer, whole = self.tokenizers.action, self.layout.mask("action")
        if not tokenizer.per_dimension:
            return np.tile(whole, (tokenizer.dim, 1))
        start = self.layout.segment("action").start
        masks = np.zeros((tokenizer.dim, len(whole)), bool)
        for d in range(tokenizer.dim):
            masks[d, start + d * tokenizer.bins:start + (d + 1) * tokenizer.bins] = True
        return masks

    def check_context(self, prompt: list[int], reason: bool, given: int | None = None) -> None:
        """Refuse a prompt that, with the reasoning and the chunk still to come, would not fit the model's context:
        past its trained positions a model's output is undefined, so it is an error rather than silent garbage.
        `given`: the prompt ends with an explanation given to read, of that many text tokens."""
        chunk = self.fast_budget + 2 if self.fast else self.config.horizon * (self.tokenizers.action.dim + 1) + 1
        to_come = (self.config.max_reason_tokens + 2 if reason else 0) + chunk
        limit = self.model.backbone.config.max_position_embeddings
        if given is not None and len(prompt) + to_come > limit:
            raise UnifiedError(
                f"reasoning: the explanation given is {given} text tokens; with the prompt ({len(prompt) - given - 2} "
                f"tokens) and the chunk ({chunk}) it needs {len(prompt) + to_come} positions, beyond the model's "
                f"{limit}; give a shorter one (the model writes at most {self.config.max_reason_tokens})")
        if len(prompt) + to_come > limit:
            raise UnifiedError(
                f"the prompt has {len(prompt)} tokens and the answer needs up to {to_come} more, beyond the model's "
                f"{limit} positions; shorten the instruction (it is {len(prompt) - self._fixed_tokens()} tokens)")

    def _fixed_tokens(self) -> int:
        """Prompt tokens besides the instruction: <bos>, the frames with their markers, the state with its markers."""
        per_frame = self.tokenizers.image.config.tokens_per_image + 2
        state = state_values(self.tokenizers.state.dim, self.config) + 2 if self.config.use_state else 0
        return 1 + self.config.history * per_frame * self.config.policy_frames + state

    def act(self, frames, instruction: str, state=None, reason: bool = True, greedy: bool = True,
            temperature: float = 1.0, seed: int = 0, continuous: bool = False, readout: str = READOUT,
            fast_decoding: str = FAST_DECODING, reasoning: str | None = None) -> ActionResult:
        """frames (T, H, W, 3) uint8, newest last -> ActionResult with (H, 2) actions.

        The action tokens of all H steps are written together, in as many forward passes as an action has
        dimensions (see `Decoder.generate_blocks`). `readout` turns each action token's distribution over its
        bins into a value: "mode" the centre of the chosen bin (greedy: the most likely), "mean" the
        probability-weighted mean of the bin centres, "median" the centre of the bin where the cumulative
        probability passes one half (each later token is still conditioned on the chosen earlier ones).
        "mode" is the default. A model that writes FAST tokens decodes a chunk token by token instead, `fast_decoding`
        "whole" (only tokens that still fit the chunk's H * D coefficients; always a whole chunk) or "free" (until
        the model writes `</act>`; a chunk that is not whole is returned with `malformed` saying why).
        `continuous` reads the actions from the continuous head instead: one forward pass over the prompt (and
        the reasoning, if any). `reasoning` (with `reason`) is read in place of writing one: an explanation written
        at an earlier decision, so that a driver can reason less often than it acts; nothing of it is generated and
        the result's `reasoning` is it."""
        if readout not in READOUTS:
            raise UnifiedError(f"readout: {readout!r} is not one of {', '.join(READOUTS)}")
        if fast_decoding not in FAST_DECODINGS:
            raise UnifiedError(f"fast_decoding: {fast_decoding!r} is not one of {', '.join(FAST_DECODINGS)}")
        if self.fast and readout != "mode" and not continuous:
            raise UnifiedError(f"readout {readout}: reads a distribution over bins; this model writes FAST tokens, "
                               "read as they are decoded (readout mode)")
        if reasoning is not None and not reason:
            raise UnifiedError("reasoning: an explanation to read is given, but reason=False skips the reasoning")
        if reasoning is not None and self.config.inductive_reason:
            raise UnifiedError("reasoning: this model reasons in the inductive form (model.inductive_reason), step by "
                               "step; it does not read an explanation given whole")
        start = time.perf_counter()
        layout, act = self.layout, self.layout.special("<act>")
        prompt = self.prompt(frames, instruction, state)
        self.check_context(prompt, reason)
        given = []  # the reasoning to read, as the model reads it
        if reason and reasoning is not None:
            text = layout.to_global("text", self.tokenizers.text.encode([reasoning])[0])
            given = [layout.special("<reason>"), *(int(t) for t in text), layout.special("</reason>")]
            self.check_context(prompt + given, reason=False, given=len(text))
        if continuous and (given or not reason):  # nothing to generate: one forward pass
            return ActionResult(self._continuous(prompt + given + [act], state), reasoning if reason else None, 0,
                                1000 * (time.perf_counter() - start))
        decoder = Decoder(self.model, np.random.default_rng(seed))
        decoder.feed(prompt + given)
        if reason and not given:
            decoder.feed([layout.special("<reason>")])
            if self.config.inductive_reason:
                reasoning = self._inductive_reasoning(decoder, greedy, temperature)
            else:
                text_ids = decoder.generate(layout.mask("text"), stop=layout.special("</reason>"),
                                            max_tokens=self.config.max_reason_tokens, greedy=greedy,
                                            temperature=temperature)
                reasoning = self.tokenizers.text.decode([layout.to_local("text", text_ids)])[0] if text_ids else ""
        if continuous:
            actions = self._continuous(decoder.ids + [act], state)
            return ActionResult(actions, reasoning, decoder.generated, 1000 * (time.perf_counter() - start))
        if self.fast:
            return self._fast_chunk(decoder, reasoning, greedy, temperature, start, fast_decoding)
        action_ids = decoder.generate_blocks(act, self.action_masks(), self.config.horizon,
                                             self.tokenizers.action.dim, greedy=greedy, temperature=temperature,
                                             keep_probs=readout != "mode")
        if readout == "mode":
            actions = self.tokenizers.action.decode(layout.to_local("action", action_ids)[None])[0]
        else:
            actions = self.read_out(decoder.block_probs, readout)
        return ActionResult(actions.astype(np.float32), reasoning, decoder.generated,
                            1000 * (time.perf_counter() - start))

    def _inductive_reasoning(self, decoder: Decoder, greedy: bool, temperature: float) -> str:
        """The reasoning in its inductive form (`model.inductive_reason`, `sequences._inductive_reason`): each step
        written from the prompt and the step before it alone (the cache cropped back to the prompt and `<reason>`,
        the previous step and its `<step>` fed again at the positions right after them), ended by `<step>` (another
        follows) or `</reason>`; then, as training lays out the chunk, the prompt and the last step with `</reason>`
        alone. At most `max_reason_tokens` tokens over all steps; a step cut by that budget is closed with
        `</reason>` as training closes the last one. -> the steps' text, joined by spaces."""
        layout = self.layout
        marker, close = layout.special("<step>"), layout.special("</reason>")
        allowed = layout.mask("text").copy()
        allowed[[marker, close]] = True
        prefix, budget = len(decoder.ids), self.config.max_reason_tokens
        steps: list[list[int]] = []
        while True:
            if steps:
                decoder.crop(prefix)
                decoder.feed([*steps[-1], marker])
            tokens, end = [], None
            while budget > 0 and end is None:
                token = decoder._choose(decoder.last_logits, allowed, greedy, temperature)
                decoder.generated += 1
                budget -= 1
                if token in (marker, close):
                    end = token
                else:
                    tokens.append(token)
                    decoder.feed([token])
            steps.append(tokens)
            if end != marker or budget == 0:
                break
        decoder.crop(prefix)
        decoder.feed([*steps[-1], close])
        text = self.tokenizers.text
        return " ".join(text.decode([layout.to_local("text", step)])[0] if step else "" for step in steps).strip()

    def _fast_chunk(self, decoder: Decoder, reasoning, greedy: bool, temperature: float, start: float,
                    decoding: str) -> ActionResult:
        """`<act>`, then FAST tokens: exactly a chunk's coefficients ("whole"), or until `</act>` (at most
        `fast_budget`; "free"), decoded; a chunk that is not whole is returned with `malformed` saying why."""
        layout, fast = self.layout, self.tokenizers.action_fast
        decoder.feed([layout.special("<act>")])
        if decoding == "whole":
            if self._fast_lengths is None:
                self._fast_lengths = np.zeros(layout.vocab_size, np.int64)
                span = layout.segment("fast")
                self._fast_lengths[span.start:span.stop] = fast.token_lengths()
            ids = decoder.generate_counted(layout.mask("fast"), self._fast_lengths,
                                           self.config.horizon * fast.dim, greedy, temperature)
            stopped = True
        else:
            ids = decoder.generate(layout.mask("fast"), stop=layout.special("</act>"), max_tokens=self.fast_budget,
                                   greedy=greedy, temperature=temperature)
            stopped = decoder.stopped
        local = layout.to_local("fast", ids)
        problem = fast.problem(local) if stopped else f"no </act> within {self.fast_budget} FAST tokens"
        actions = fast.decode([local])[0]
        return ActionResult(actions.astype(np.float32), reasoning, decoder.generated,
                            1000 * (time.perf_counter() - start), problem)

    def read_out(self, probs: np.ndarray, readout: str) -> np.ndarray:
        """probs (H, D, V): each action token's distribution over the vocabulary -> (H, D) actions, the mean or the
        median of its dimension's bin centres under it (`BinActionTokenizer.read_out` on the action segment)."""
        span = self.layout.segment("action")
        return self.tokenizers.action.read_out(probs[..., span.start:span.stop], readout)

    @torch.inference_mode()
    def _continuous(self, ids: list[int], state=None) -> np.ndarray:
        if self.model.action_head is None:
            raise UnifiedError("this policy has no continuous action head: act with continuous=False")
        device = next(self.model.parameters()).device
        states = None
        if self.config.action_head_state:  # the head reads the state as the shards gave it: normalised, first N
            if state is None:
                raise UnifiedError("this policy's action head reads the ego state: pass state=...")
            normalised = self.tokenizers.state.normalizer.normalize(_state(state, self.tokenizers.state))
            states = torch.tensor(normalised[:self.config.state_dims][None], dtype=torch.float32, device=device)
        n = len(ids)
        mask = torch.ones(n, n, dtype=torch.bool, device=device).tril()[None, None]
        _, _, hidden = self.model.logits(torch.tensor([ids], device=device), mask,
                                         torch.arange(n, device=device)[None], hidden=True)
        index = torch.tensor([[0, 0, n - 1]], device=device)
        normalised = self.model.continuous_actions(hidden, index, states)[0].float().clamp(-1, 1).cpu().numpy()
        return self.tokenizers.action.normalizer.unnormalize(normalised).astype(np.float32)


class WorldModel:
    """Frames + action chunks -> the frames after each chunk, imagined autoregressively."""

    def __init__(self, model: UnifiedModel, tokenizers: Tokenizers):
        if tokenizers.image.encoder_only:
            raise UnifiedError("this model was exported action-only: it has no image decoder to imagine frames")
        self.model, self.tokenizers, self.layout, self.config = model.eval(), tokenizers, model.layout, model.config

    @classmethod
    def from_pretrained(cls, directory: str | Path, device: str = "cpu", verify: Verify = "size") -> WorldModel:
        model, tokenizers, _ = load_model(directory, device, verify)
        return cls(model, tokenizers)

    def imagine(self, frames, actions, horizon: int | None = None, greedy: bool = True, seed: int = 0) -> np.ndarray:
        """frames (T, H, W, 3) uint8 newest last; actions (K * H_chunk, 2) in m/s^2, rad -> (K, H, W, 3) uint8,
        frame k being the one after chunk k. `horizon` (chunks) defaults to all the actions given."""
        layout, tok, h = self.layout, self.tokenizers, self.config.horizon
        actions = np.asarray(actions, np.float64)
        if actions.ndim != 2 or actions.shape[1] != tok.action.dim or len(actions) < h:
            raise UnifiedError(f"expected actions of shape (K * {h}, {tok.action.dim}), got {actions.shape}")
        chunks = len(actions) // h if horizon is None else horizon
        if chunks < 1:
            raise UnifiedError(f"horizon must be at least 1 chunk, got {chunks}")
        if not np.isfinite(actions).all():
            raise UnifiedError("actions: not finite (NaN or infinite values)")
        if chunks * h > len(actions):
            raise UnifiedError(f"horizon {chunks} chunks needs {chunks * h} actions, got {len(actions)}")
        codes = list(tok.image.encode(_frames(frames, self.config.history, tok.image.config.image_size)))
        rng = np.random.default_rng(seed)
        imagined = []
        for k in range(chunks):
            decoder = Decoder(self.model, rng)
            ids = [layout.special("<bos>")]
            for c in codes[-self.config.history:]:
                ids += [layout.special("<img>"), *layout.to_global("image", c).tolist(), layout.special("</img>")]
            decoder.feed(ids)
            chunk_actions = actions[k * h:(k + 1) * h][None]
            if self.config.action_tokens == "fast":
                fast_ids = layout.to_global("fast", tok.action_fast.encode(chunk_actions)[0])
                decoder.feed([layout.special("<act>"), *fast_ids.tolist()])
            else:
                action_ids = layout.to_global("action", tok.action.encode(chunk_actions)[0])
                chunk, blocks = action_chunk(action_ids.reshape(h, -1), layout)
                decoder.feed(chunk, blocks)
            decoder.feed([layout.special("</act>"), layout.special("<img>")])
            new = decoder.generate(layout.mask("image"), count=tok.image.config.tokens_per_image, greedy=greedy)
            codes.append(layout.to_local("image", new))
            imagined.append(codes[-1])
        return tok.image.decode(np.stack(imagined))


@torch.inference_mode()
def next_frame_accuracy(model: UnifiedModel, batch: dict) -> float:
    """Teacher-forced accuracy on image targets of a packed batch (world task)."""
    logits, _ = model.logits(batch["input_ids"], batch["attention_mask"], batch["position_ids"])
    targets = batch["targets"]
    image = model.image_ids[targets.clamp_min(0)] & (targets >= 0)
    return float(((logits.argmax(-1) == targets) & image).sum() / image.sum().clamp_min(1))
