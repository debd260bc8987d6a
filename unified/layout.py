"""The one vocabulary: `[specials | text | image codes | action | state bins]` and the markers between spans, and, for
a model whose actions are FAST tokens (`model.action_tokens: fast`), a `fast` segment after them: appended, so that
every other id keeps its value and a bins model's layout is the same with or without a FAST tokenizer fitted.

Every other part asks the layout where a modality's ids live; nobody adds offsets by hand. Saved as JSON
beside every tokenizer directory and checkpoint.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from unified.errors import UnifiedError

FORMAT = "unified-token-layout"
FORMAT_VERSION = 1
SPECIALS = (
    "<pad>", "<bos>", "<eos>",
    "<img>", "</img>", "<row>",  # an image span; <row> is an optional break between rows of codes
    "<act>", "</act>",
    "<reason>", "</reason>",
    "<state>", "</state>",
    "<step>",  # ends a step of an inductive scratchpad (the operator questions' reasoning)
)
MODALITIES = ("special", "text", "image", "action", "state")
OPTIONAL = ("fast",)  # segments a layout may add after the others


@dataclass(frozen=True)
class Segment:
    name: str
    start: int
    size: int

    @property
    def stop(self) -> int:
        return self.start + self.size


class TokenLayout:
    """Global ids of each modality. `to_global`/`to_local` map a tokenizer's own ids in and out."""

    def __init__(self, segments: list[Segment], specials: tuple[str, ...] = SPECIALS):
        names = [s.name for s in segments]
        required = [n for n in names if n not in OPTIONAL]
        if sorted(required) != sorted(MODALITIES) or len(set(names)) != len(names):
            raise UnifiedError(f"token layout: needs exactly the segments {', '.join(MODALITIES)} (and optionally "
                               f"{', '.join(OPTIONAL)}), got {names}")
        ordered = sorted(segments, key=lambda s: s.start)
        for s in ordered:
            if s.size < 0 or s.start < 0:
                raise UnifiedError(f"token layout: segment {s.name!r} has a negative start or size")
        for a, b in zip(ordered, ordered[1:]):
            if b.start < a.stop:
                raise UnifiedError(
                    f"token layout: segments {a.name!r} [{a.start}, {a.stop}) and {b.name!r} [{b.start}, {b.stop}) "
                    "overlap"
                )
        self.segments = {s.name: s for s in segments}
        if self.segments["special"].size != len(specials):
            raise UnifiedError(
                f"token layout: {len(specials)} special tokens but the special segment holds "
                f"{self.segments['special'].size}"
            )
        self.specials = tuple(specials)
        self.vocab_size = max(s.stop for s in segments)

    @classmethod
    def build(cls, text: int, image: int, action: int, state: int = 0,
              specials: tuple[str, ...] = SPECIALS) -> TokenLayout:
        """Consecutive segments in the order of docs/design.md, from each tokenizer's vocabulary size. `specials`:
        today's markers by default; a layout saved before `<step>` was added keeps its own."""
        sizes = {"special": len(specials), "text": text, "image": image, "action": action, "state": state}
        segments, start = [], 0
        for name in MODALITIES:
            segments.append(Segment(name, start, sizes[name]))
            start += sizes[name]
        return cls(segments, tuple(specials))

    def with_fast(self, size: int) -> TokenLayout:
        """This layout with a `fast` segment of `size` ids appended (the FAST action tokenizer's vocabulary)."""
        if "fast" in self.segments:
            if self.segments["fast"].size != size:
                raise UnifiedError(f"token layout: has a fast segment of {self.segments['fast'].size} ids, not {size}")
            return self
        return TokenLayout([*self.segments.values(), Segment("fast", self.vocab_size, size)], self.specials)

    def has(self, modality: str) -> bool:
        return modality in self.segments

    # -- ids --------------------------------------------------------------------------------------------

    def special(self, token: str) -> int:
        """Global id of a marker such as '<act>'."""
        try:
            return self.segments["special"].start + self.specials.index(token)
        except ValueError:
            known = ", ".join(self.specials)
            raise UnifiedError(f"token layout: no special token {token!r}; there are {known}") from None

    def segment(self, modality: str) -> Segment:
        if modality not in self.segments:
            raise UnifiedError(f"token layout: no modality {modality!r}; there are {', '.join(self.segments)}")
        return self.segments[modality]

    def to_global(self, modality: str, ids) -> np.ndarray:
        """A tokenizer's own ids (0..size-1) -> global ids."""
        s = self.segment(modality)
        ids = np.asarray(ids, np.int64)
        bad = (ids < 0) | (ids >= s.size)
        if bad.any():
            raise UnifiedError(f"token layout: {modality} id {int(ids[bad][0])} outside [0, {s.size})")
        return ids + s.start

    def to_local(self, modality: str, ids) -> np.ndarray:
        """Global ids -> the tokenizer's own ids; refuses ids of another modality."""
        s = self.segment(modality)
        ids = np.asarray(ids, np.int64)
        bad = (ids < s.start) | (ids >= s.stop)
        if bad.any():
            value = int(ids[bad][0])
            raise UnifiedError(
                f"token layout: id {value} is {self.modality_of(value)!r}, not {modality!r} [{s.start}, {s.stop})"
            )
        return ids - s.start

    def modality_of(self, token: int) -> str:
        for s in self.segments.values():
            if s.start <= token < s.stop:
                return s.name
        return "outside the vocabulary"

    def mask(self, *modalities: str) -> np.ndarray:
        """(vocab_size,) bool, True on the ids of `modalities` (for loss masks and constrained decoding)."""
        out = np.zeros(self.vocab_size, bool)
        for m in modalities:
            s = self.segment(m)
            out[s.start:s.stop] = True
        return out

    # -- files ------------------------------------------------------------------------------------------

    def to_dict(self) -> dict:
        return {
            "format": FORMAT, "format_version": FORMAT_VERSION, "vocab_size": self.vocab_size,
            "specials": list(self.specials),
            "segments": {s.name: {"start": s.start, "size": s.size} for s in self.segments.values()},
        }

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> TokenLayout:
        path = Path(path)
        if not path.is_file():
            raise UnifiedError(f"{path}: no token layout file")
        try:
            data = json.loads(path.read_text())
            if data.get("format") != FORMAT:
                raise UnifiedError(f"{path}: not a token layout (expected \"format\": \"{FORMAT}\")")
            if data.get("format_version") != FORMAT_VERSION:
                raise UnifiedError(f"{path}: token layout format_version {data.get('format_version')!r}, expected 1")
            segments = [Segment(n, int(v["start"]), int(v["size"])) for n, v in data["segments"].items()]
            layout = cls(segments, tuple(data["specials"]))
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError, ValueError) as e:
            raise UnifiedError(f"{path}: not a valid token layout ({e})") from None
        except UnifiedError as e:
            message = str(e)
            raise UnifiedError(message if message.startswith(str(path)) else f"{path}: {message}") from None
        return layout

    def __eq__(self, other) -> bool:
        return isinstance(other, TokenLayout) and self.to_dict() == other.to_dict()

    def __repr__(self) -> str:
        parts = ", ".join(f"{s.name}[{s.start}:{s.stop}]" for s in self.segments.values())
        return f"TokenLayout({parts}, vocab_size={self.vocab_size})"
