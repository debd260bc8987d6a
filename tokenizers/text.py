"""Text tokenizer: sentencepiece BPE with byte fallback, trained here on instructions, reasons and operator
questions; or the tokenizer of a local pretrained LM when the backbone starts from one."""

from __future__ import annotations

import io
import json
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import sentencepiece as spm
from unified.tokenizers.files import FORMAT_VERSION, read_config, write_config

from unified.errors import UnifiedError


def _check_texts(texts, where: str) -> list[str]:
    if isinstance(texts, str):
        texts = [texts]
    texts = list(texts)
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise UnifiedError(f"{where}: text {i} is {type(t).__name__}, expected str")
        if not t.strip():
            raise UnifiedError(f"{where}: text {i} is empty")
    return texts


class TextTokenizer:
    """Batched `encode(list[str]) -> list[list[int]]` and `decode`; ids in [0, vocab_size)."""

    def __init__(self, model_proto: bytes):
        self.model_proto = model_proto
        self.sp = spm.SentencePieceProcessor(model_proto=model_proto)

    @classmethod
    def fit(cls, texts: Iterable[str], vocab_size: int = 1024) -> TextTokenizer:
        """Train BPE with byte fallback: any text, even with unseen characters, encodes and decodes exactly."""
        model = io.BytesIO()
        corpus = [t for t in texts if t.strip()]
        if not corpus:
            raise UnifiedError("text tokenizer: no text to fit on")
        try:
            cls._train(corpus, model, vocab_size)
        except RuntimeError as e:
            message = f"text tokenizer: sentencepiece could not train with vocab_size {vocab_size} ({e})"
            raise UnifiedError(message) from None
        return cls(model.getvalue())

    @staticmethod
    def _train(corpus: list[str], model: io.BytesIO, vocab_size: int) -> None:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(corpus), model_writer=model, model_type="bpe", vocab_size=vocab_size,
            byte_fallback=True, character_coverage=1.0, hard_vocab_limit=False,
            # The token layout owns <pad>/<bos>/<eos>; sentencepiece keeps only its unknown piece.
            unk_id=0, bos_id=-1, eos_id=-1, pad_id=-1,
            split_digits=True, num_threads=2, minloglevel=2,
            # Exact round trips: no Unicode normalisation, no whitespace folding, no implicit leading space.
            normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=False,
        )

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    def encode(self, texts) -> list[list[int]]:
        return self.sp.encode(_check_texts(texts, "text tokenizer"))

    def decode(self, ids: list[list[int]]) -> list[str]:
        out = []
        for row in ids:
            row = np.asarray(row, np.int64)
            bad = (row < 0) | (row >= self.vocab_size)
            if bad.any():
                raise UnifiedError(f"text tokenizer: id {int(row[bad][0])} outside [0, {self.vocab_size})")
            out.append(self.sp.decode(row.tolist()))
        return out

    def save_pretrained(self, directory: str | Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "spm.model").write_bytes(self.model_proto)
        write_config(directory, "text_sentencepiece", {"format_version": FORMAT_VERSION, "vocab_size": self.vocab_size})

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> TextTokenizer:
        directory = Path(directory)
        config = read_config(directory, ("text_sentencepiece", "text_pretrained"))
        if config["type"] == "text_pretrained":
            return PretrainedTextTokenizer.from_pretrained(directory)  # type: ignore[return-value]
        return cls((directory / "spm.model").read_bytes())


class PretrainedTextTokenizer:
    """The tokenizer of a local pretrained LM directory (Hugging Face format), with the same interface."""

    def __init__(self, tokenizer, source: str):
        self.tokenizer, self.source = tokenizer, source

    @classmethod
    def from_lm(cls, directory: str | Path) -> PretrainedTextTokenizer:
        from transformers import AutoTokenizer

        try:
            return cls(AutoTokenizer.from_pretrained(str(directory), local_files_only=True), str(directory))
        except (OSError, ValueError) as e:
            raise UnifiedError(f"{directory}: no tokenizer of a pretrained LM could be loaded ({e})") from None

    @property
    def vocab_size(self) -> int:
        return len(self.tokenizer)

    def encode(self, texts) -> list[list[int]]:
        return self.tokenizer(_check_texts(texts, "text tokenizer"), add_special_tokens=False)["input_ids"]

    def decode(self, ids: list[list[int]]) -> list[str]:
        for row in ids:
            row = np.asarray(row, np.int64)
            bad = (row < 0) | (row >= self.vocab_size)
            if bad.any():
                raise UnifiedError(f"text tokenizer: id {int(row[bad][0])} outside [0, {self.vocab_size})")
        return self.tokenizer.batch_decode([list(map(int, r)) for r in ids], skip_special_tokens=False)

    def save_pretrained(self, directory: str | Path) -> None:
        directory = Path(directory)
        self.tokenizer.save_pretrained(str(directory / "hf"))
        write_config(directory, "text_pretrained",
                     {"format_version": FORMAT_VERSION, "vocab_size": self.vocab_size, "source": self.source})

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> PretrainedTextTokenizer:
        loaded = cls.from_lm(Path(directory) / "hf")
        loaded.source = json.loads((Path(directory) / "config.json").read_text()).get("source", loaded.source)
        return loaded
