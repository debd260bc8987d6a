"""The config.json every tokenizer directory holds: its type, its format version, its settings."""

from __future__ import annotations

import json
from pathlib import Path

from unified.errors import UnifiedError

FORMAT_VERSION = 1


def write_config(directory: str | Path, kind: str, config: dict) -> None:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps({"type": kind, **config}, indent=2) + "\n")


def read_config(directory: str | Path, kind: str | tuple[str, ...]) -> dict:
    """The settings in `directory/config.json`, checked to be of `kind` (its "type" stays in the result) and of
    this version's format."""
    kinds = (kind,) if isinstance(kind, str) else kind
    path = Path(directory) / "config.json"
    if not path.is_file():
        raise UnifiedError(f"{directory}: not a tokenizer directory (no config.json)")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UnifiedError(f"{path}: not valid JSON ({e})") from None
    if config.get("type") not in kinds:
        raise UnifiedError(f"{path}: not a {' or '.join(kinds)} tokenizer")
    if config.get("format_version") != FORMAT_VERSION:
        raise UnifiedError(
            f"{path}: format_version {config.get('format_version')!r} was written by an incompatible version of "
            f"unified; this one reads {FORMAT_VERSION}; refit with `unified tokenizer fit`"
        )
    return config
