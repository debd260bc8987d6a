"""Incremental decoding with the KV cache, each span constrained to its own token range, under the same
attention rules as training (the action-chunk mask included), and action chunks written all steps at once."""

from __future__ import annotations

import numpy as np
import torch

from unified.model import UnifiedModel
from unified.packing import attention_mask


class Decoder:
    """Decodes one sequence: `feed` tokens (prompt or forced markers), `generate` constrained spans,
    `generate_blocks` an action chunk."""

    def __init__(self, model: UnifiedModel, rng: np.random.Generator | None = None):
        from transformers import DynamicCache

        self.model = model
        self.cache = DynamicCache(config=model.backbone.config)
        self.blocks: list[int] = []  # action block of every position fed so far (-1 outside blocks)
        self.ids: list[int] = []  # in the order fed (the cache's order)
        self.next_position = 0  # position id of the next token in sequence order
        self.last_logits: torch.Tensor | None = None
        self.rng = rng or np.random.default_rng(0)
        self.generated = 0  # tokens chosen by the model
        self.stopped = False  # whether the last `generate` with a stop token met it (rather than its budget)
        self.passes = 0  # forward passes

    def crop(self, length: int) -> None:
        """Forget everything fed after the first `length` tokens (their cache too); the next token is fed at
        position `length` unless told otherwise. An inductive scratchpad crops back to its question before each
        step."""
        self.cache.crop(length - len(self.ids))  # transformers: a negative count of tokens to remove
        self.ids, self.blocks = self.ids[:length], self.blocks[:length]
        self.next_position = length

    @torch.inference_mode()
    def feed(self, ids, blocks=None, positions=None) -> torch.Tensor:
        """Append `ids` (with their action blocks, and position ids, by default the next ones in sequence order)
        and return the (len(ids), V) logits at them; `last_logits` keeps the last row."""
        ids = [int(i) for i in np.atleast_1d(ids)]
        blocks = [-1] * len(ids) if blocks is None else [int(b) for b in np.atleast_1d(blocks)]
        if positions is None:
            positions = np.arange(self.next_position, self.next_position + len(ids))
        positions = np.atleast_1d(positions)
        start = len(self.ids)
        self.ids += ids
        self.blocks += blocks
        self.next_position = max(self.next_position, int(positions.max()) + 1)
        total = len(self.ids)
        mask = attention_mask(np.zeros(total, np.int64), np.asarray(self.blocks))[start:total]  # (q, total)
        device = next(self.model.parameters()).device
        logits, self.cache = self.model.logits(
            torch.tensor([ids], device=device),
            torch.from_numpy(mask)[None, None].to(device),
            torch.as_tensor(positions, device=device)[None],
            self.cache,
        )
        self.passes += 1
        self.last_logits = logits[0, -1].float()
        return logits[0].float()

    def _choose(self, logits: torch.Tensor, allowed: np.ndarray, greedy: bool, temperature: float) -> int:
        logits = logits.clone()
        logits[~torch.from_numpy(allowed).to(logits.device)] = -torch.inf
        if greedy or temperature <= 0:
            return int(torch.argmax(logits))
        probs = torch.softmax(logits / temperature, -1).cpu().double().numpy()
        return int(self.rng.choice(len(probs), p=probs / probs.sum()))

    def generate(self, allowed: np.ndarray, count: int | None = None, stop: int | None = None,
                 max_tokens: int = 64, greedy: bool = True, temperature: float = 1.0) -> list[int]:
        """Generate tokens from `allowed` ((V,) bool): exactly `count`, or until `stop` (which is fed but not
        returned) or `max_tokens`."""
        if stop is not None:
            allowed = allowed.copy()
            allowed[stop] = True
        out: list[int] = []
        limit = count if count is not None else max_tokens
        self.stopped = False
        for _ in range(limit):
            token = self._choose(self.last_logits, allowed, greedy, temperature)
            self.generated += 1
            self.feed([token])
            if stop is not None and token == stop:
                self.stopped = True
                return out
            out.append(token)
        if stop is not None:  # out of budget: close the span as training did
            self.feed([stop])
        return out

    def generate_counted(self, allowed: np.ndarray, lengths: np.ndarray, total: int, greedy: bool = True,
                         temperature: float = 1.0) -> list[int]:
        """Generate tokens from `allowed` ((V,) bool) until their `lengths` ((V,) int, each allowed token's at least
        1) add up to exactly `total`: at every step only the tokens that still fit are allowed, so the output is
        always whole (a FAST chunk of exactly H * D coefficients). The last token is not fed."""
        out: list[int] = []
        remaining = total
        while remaining > 0:
            token = self._choose(self.last_logits, allowed & (lengths <= remaining), greedy, temperature)
            self.generated += 1
            out.append(token)
            remaining -= int(lengths[token])
            if remaining > 0:
                self.feed([token])
        return out

    def generate_blocks(self, marker: int, allowed: np.ndarray, blocks: int, per_block: int, greedy: bool = True,
                        temperature: float = 1.0, keep_probs: bool = False) -> list[int]:
        """An action chunk `marker a_0 marker a_1 ... marker a_{blocks-1}` of `per_block` tokens a step, written in
        `per_block` forward passes: under the action-chunk mask a block sees the prompt and itself only, so
        every block advances at once. `allowed` is (V,) bool, or (per_block, V) to give each token of a step its
        own range (one per action dimension). Returns the chosen tokens step by step, (blocks * per_block,).
        `keep_probs` keeps each token's distribution over its allowed ids (softmax at temperature 1) in
        `self.block_probs`, (blocks, per_block, V), for a readout other than the chosen token."""
        allowed = np.array(np.broadcast_to(allowed, (per_block, len(np.atleast_2d(allowed)[0]))))
        stride = per_block + 1
        starts = self.next_position + stride * np.arange(blocks)  # position of each block's marker
        logits = self.feed([marker] * blocks, np.arange(blocks), starts)  # (blocks, V)
        chosen = np.zeros((blocks, per_block), np.int64)
        self.block_probs = np.zeros((blocks, per_block, logits.shape[-1])) if keep_probs else None
        for r in range(per_block):
            if keep_probs:
                masked = logits.masked_fill(~torch.from_numpy(allowed[r]).to(logits.device), -torch.inf)
                self.block_probs[:, r] = torch.softmax(masked.double(), -1).cpu().numpy()
            chosen[:, r] = [self._choose(logits[k], allowed[r], greedy, temperature) for k in range(blocks)]
            self.generated += blocks
            if r + 1 < per_block:  # the last tokens are not fed: nothing is predicted from them
                logits = self.feed(chosen[:, r], np.arange(blocks), starts + 1 + r)
        self.next_position = int(starts[-1]) + stride
        return chosen.reshape(-1).tolist()


@torch.inference_mode()
def generate_batch(model: UnifiedModel, prompts: list[list[int]], allowed: np.ndarray, stop,
                   max_tokens: int, keep_stop: bool = False) -> list[list[int]]:
    """Greedy decoding of several prompts at once, each until a token of `stop` (one id or several) or
    `max_tokens`, choosing from `allowed` ((V,) bool) and the stops. The stop token ends a sequence's output when
    `keep_stop` (so a caller can tell which stop it met), else it is left out. The prompts are left-padded; padding
    is masked out and every prompt keeps its own position ids from 0, so each sequence decodes exactly as it
    would alone (tested against `Decoder.generate`)."""
    stops = [int(s) for s in np.atleast_1d(stop)]
    device = next(model.parameters()).device
    lengths = np.array([len(p) for p in prompts])
    b, width = len(prompts), int(lengths.max())
    pad = model.layout.special("<pad>")
    ids = np.full((b, width), pad, np.int64)
    positions = np.zeros((b, width), np.int64)
    real = np.zeros((b, width), bool)  # key columns that hold a token of the sequence (not padding)
    for k, prompt in enumerate(prompts):
        ids[k, width - len(prompt):] = prompt
        positions[k, width - len(prompt):] = np.arange(len(prompt))
        real[k, width - len(prompt):] = True
    causal = np.tri(width, dtype=bool)
    mask = (causal[None] & real[:, None, :]) | np.eye(width, dtype=bool)[None]  # padding rows see themselves only
    from transformers import DynamicCache

    cache = DynamicCache(config=model.backbone.config)
    logits, cache = model.logits(torch.from_numpy(ids).to(device), torch.from_numpy(mask[:, None]).to(device),
                                 torch.from_numpy(positions).to(device), cache)
    choice = torch.from_numpy(allowed | np.isin(np.arange(len(allowed)), stops)).to(device)
    out: list[list[int]] = [[] for _ in prompts]
    done = np.zeros(b, bool)
    last = logits[:, -1].float()
    next_position = lengths.copy()
    for _ in range(max_tokens):
        tokens = torch.where(choice, last, -torch.inf).argmax(-1).cpu().numpy()
        for k in np.flatnonzero(~done):
            if tokens[k] in stops:
                done[k] = True
                if keep_stop:
                    out[k].append(int(tokens[k]))
            else:
                out[k].append(int(tokens[k]))
        if done.all():
            break
        real = np.concatenate([real, np.ones((b, 1), bool)], 1)  # the new token is real for every row
        logits, cache = model.logits(torch.from_numpy(tokens[:, None]).to(device),
                                     torch.from_numpy(real[:, None, None]).to(device),
                                     torch.from_numpy(next_position[:, None]).to(device), cache)
        next_position += 1
        last = logits[:, -1].float()
    return out
