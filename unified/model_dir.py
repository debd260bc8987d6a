"""The self-describing model directory that `unified export` writes and `Policy`/`WorldModel` load:

    DIR/config.json, DIR/model.safetensors   the backbone, loadable by AutoModelForCausalLM.from_pretrained
    DIR/action_head.safetensors              the continuous action head, if the model has one
    DIR/unified.json                         the model config (what it reads and writes) and what was kept
    DIR/layout.json                          the token layout
    DIR/tokenizers/                          the tokenizers (see `unified tokenizer fit`)
    DIR/stats.json                           action and state normalisation statistics (q01/q99)
    DIR/manifest.json                        size and SHA-256 of every file above, written last

Like a checkpoint, an export is verified when it is loaded: every file's size by default (instant), every
checksum on request (`verify="full"`, which the closed-loop evaluation does, since it fingerprints the weights
anyway); weights that are not finite are refused, so a damaged export never drives.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict
from pathlib import Path
from typing import Literal

import torch

from unified.checkpoint import sha256_file
from unified.config import from_dict
from unified.errors import UnifiedError
from unified.layout import TokenLayout
from unified.model import ModelConfig, UnifiedModel
from unified.tokenizers.fit import Tokenizers

FORMAT = "unified-model"
FORMAT_VERSION = 1
Verify = Literal["size", "full", "none"]
UNLISTED = ("manifest.json", "cache")  # not in the manifest: itself, and caches made beside the model later


def save_model(
    model: UnifiedModel, tokenizers: Tokenizers, directory: str | Path, action_only: bool = False,
    source: dict | None = None,
) -> list[str]:
    """Write `model` with everything it needs; `action_only` drops what a deployed policy never uses; `source`
    (where the weights came from) is recorded in unified.json. Returns the list of what was kept."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    weights = None
    if model.state_value is not None:  # folded into the state rows: the saved backbone alone computes the model
        embedding = model.backbone.get_input_embeddings().weight
        name = next(n for n, p in model.backbone.named_parameters() if p is embedding)
        weights = model.backbone.state_dict() | {name: model.folded_embeddings()}
    model.backbone.save_pretrained(directory, safe_serialization=True, state_dict=weights)
    if model.action_head is not None:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in model.action_head.state_dict().items()},
                  directory / "action_head.safetensors")
    fast = model.config.action_tokens == "fast"
    tokenizers.save_pretrained(directory / "tokenizers", action_only=action_only, keep_fast=fast)
    model.layout.save(directory / "layout.json")
    kept = ["backbone (all logits)", *(["continuous action head"] if model.action_head is not None else []),
            "token layout", "image encoder", "text tokenizer (instructions)",
            *(["FAST action tokenizer (its actions)"] if fast else []),
            "action bins", "state bins", "normalisation stats"]
    if not action_only:
        kept += ["image decoder (world model)", *([] if fast else ["FAST action tokenizer"])]
    stats = {
        "action": {"names": list(tokenizers.action.names), "q01": list(tokenizers.action.q01),
                   "q99": list(tokenizers.action.q99)},
        "state": {"names": list(tokenizers.state.names), "q01": list(tokenizers.state.q01),
                  "q99": list(tokenizers.state.q99)},
    }
    (directory / "stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    info = {"format": FORMAT, "format_version": FORMAT_VERSION, "model": asdict(model.config),
            "action_only": action_only, "kept": kept, "source": source}
    (directory / "unified.json").write_text(json.dumps(info, indent=2) + "\n")
    write_manifest(directory)
    return kept


def _listed(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*")
                  if p.is_file() and p.relative_to(directory).parts[0] not in UNLISTED)


def write_manifest(directory: Path) -> None:
    manifest = {str(p.relative_to(directory)): {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
                for p in _listed(directory)}
    (directory / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")


def verify_model(directory: str | Path, verify: Verify = "size") -> None:
    """Compare the directory with its manifest (sizes, and checksums when `verify="full"`); name the first file that
    differs or is missing."""
    directory = Path(directory)
    if verify == "none":
        return
    path = directory / "manifest.json"
    if not path.is_file():
        raise UnifiedError(f"{directory}: no manifest.json, so the files cannot be verified (damaged, or written by "
                           "an earlier unified); export it again")
    try:
        manifest = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise UnifiedError(f"{path}: damaged (not valid JSON: {e}); export the model again") from None
    for name, expected in manifest.items():
        file = directory / name
        if not file.is_file():
            raise UnifiedError(f"{file}: missing from the exported model (damaged); export it again")
        if file.stat().st_size != expected["bytes"] or (verify == "full" and sha256_file(file) != expected["sha256"]):
            raise UnifiedError(f"{file}: damaged (its {'size' if verify == 'size' else 'size or checksum'} differs "
                               "from manifest.json); export the model again")


def weights_fingerprint(directory: str | Path) -> str:
    """SHA-256 over a model directory's weight files (names and digests): what a cached evaluation is keyed on."""
    h = hashlib.sha256()
    for path in sorted(Path(directory).glob("*.safetensors")):
        h.update(path.name.encode() + sha256_file(path).encode())
    return h.hexdigest()


def check_finite(module: torch.nn.Module, where: Path) -> None:
    for name, tensor in module.state_dict().items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise UnifiedError(f"{where}: weight {name} holds NaN or infinite values; the model is damaged and would "
                               "act on garbage (export it again from a good checkpoint)")


DEVICES = ("auto", "cpu", "cuda")


def resolve_device(device: str) -> str:
    """`--device`: "auto" is cuda when a GPU is present, else cpu; "cuda" (or "cuda:N") without one is an error."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        return device
    if device == "cuda" or re.fullmatch(r"cuda:\d+", device):
        if not torch.cuda.is_available():
            raise UnifiedError(f"--device {device}: no CUDA GPU is visible to torch on this machine; use --device cpu "
                               "(or auto)")
        return device
    raise UnifiedError(f"--device {device!r}: expected auto, cpu, cuda or cuda:N")


def load_model(directory: str | Path, device: str = "cpu",
               verify: Verify = "size") -> tuple[UnifiedModel, Tokenizers, dict]:
    """A model directory written by `save_model` or `unified export` -> (model in eval mode, tokenizers, info),
    verified against its manifest (`verify`) and refused if any weight is not finite."""
    from transformers import AutoModelForCausalLM

    directory = Path(directory)
    path = directory / "unified.json"
    if not path.is_file():
        raise UnifiedError(f"{directory}: not a unified model directory (no unified.json); export one with "
                           "`unified export`")
    info = json.loads(path.read_text())
    if info.get("format") != FORMAT or info.get("format_version") != FORMAT_VERSION:
        raise UnifiedError(f"{path}: not a unified model of format version {FORMAT_VERSION}")
    verify_model(directory, verify)
    config = from_dict(ModelConfig, info["model"], f"{path}: model")
    config.init_from = None  # the weights are here now
    layout = TokenLayout.load(directory / "layout.json")
    tokenizers = Tokenizers.from_pretrained(directory / "tokenizers")
    if tokenizers.layout_for(config.action_tokens) != layout:
        raise UnifiedError(f"{directory}: layout.json does not match the tokenizers' layout (for "
                           f"model.action_tokens {config.action_tokens})")
    backbone = AutoModelForCausalLM.from_pretrained(directory, attn_implementation="sdpa")
    model = UnifiedModel(config, layout, backbone=backbone, state_dim=tokenizers.state.dim)
    if model.action_head is not None:
        from safetensors.torch import load_file

        path = directory / "action_head.safetensors"
        if not path.is_file():
            raise UnifiedError(f"{directory}: the model config has a continuous action head but {path.name} is missing")
        model.action_head.load_state_dict(load_file(path))
    check_finite(model, directory)
    return model.to(device).eval(), tokenizers, info
