"""Incremental decoding with the KV cache, each span constrained to its own token range, under the same
attention rules as training (the action-chunk mask included)."""

from __future__ import annotations

import numpy as np
import torch

from unified.model import UnifiedModel
from unified.packing import attention_mask


class Decoder:
    """Decodes one sequence: `feed` tokens (prompt or forced markers), `generate` constrained spans."""

    def __init__(self, model: UnifiedModel, rng: np.random.Generator | None = None):
        from transformers import DynamicCache

        self.model = model
        self.cache = DynamicCache(config=model.backbone.config)
        self.blocks: list[int] = []  # action block of every position fed so far (-1 outside blocks)
        self.ids: list[int] = []
        self.last_logits: torch.Tensor | None = None
        self.rng = rng or np.random.default_rng(0)
        self.generated = 0

    @torch.inference_mode()
    def feed(self, ids, blocks=None) -> torch.Tensor:
        """Append `ids` (with their action blocks) and return the (V,) logits of the next token."""
        ids = [int(i) for i in np.atleast_1d(ids)]
        blocks = [-1] * len(ids) if blocks is None else [int(b) for b in np.atleast_1d(blocks)]
        start = len(self.ids)
        self.ids += ids
        self.blocks += blocks
        total = len(self.ids)
        mask = attention_mask(np.zeros(total, np.int64), np.asarray(self.blocks))[start:total]  # (q, total)
        device = next(self.model.parameters()).device
        logits, self.cache = self.model.logits(
            torch.tensor([ids], device=device),
            torch.from_numpy(mask)[None, None].to(device),
            torch.arange(start, total, device=device)[None],
            self.cache,
        )
        self.last_logits = logits[0, -1].float()
        return self.last_logits

    def _choose(self, allowed: np.ndarray, greedy: bool, temperature: float) -> int:
        logits = self.last_logits.clone()
        logits[~torch.from_numpy(allowed).to(logits.device)] = -torch.inf
        if greedy or temperature <= 0:
            return int(torch.argmax(logits))
        probs = torch.softmax(logits / temperature, -1).cpu().double().numpy()
        return int(self.rng.choice(len(probs), p=probs / probs.sum()))

    def generate(self, allowed: np.ndarray, count: int | None = None, stop: int | None = None,
                 max_tokens: int = 64, blocks_of=None, greedy: bool = True, temperature: float = 1.0) -> list[int]:
        """Generate tokens from `allowed` ((V,) bool): exactly `count`, or until `stop` (which is fed but not
        returned) or `max_tokens`. `blocks_of(k)` gives the action block of the k-th generated token."""
        if stop is not None:
            allowed = allowed.copy()
            allowed[stop] = True
        out: list[int] = []
        limit = count if count is not None else max_tokens
        for k in range(limit):
            token = self._choose(allowed, greedy, temperature)
            self.generated += 1
            self.feed([token], [blocks_of(k) if blocks_of else -1])
            if stop is not None and token == stop:
                return out
            out.append(token)
        if stop is not None:  # out of budget: close the span as training did
            self.feed([stop])
        return out
