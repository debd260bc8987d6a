"""`unified export`: a checkpoint -> a self-contained Hugging Face directory (see `unified.model_dir`)."""

from __future__ import annotations

import json
from pathlib import Path

from unified.errors import UnifiedError
from unified.model_dir import check_finite, load_model, save_model


def load_training_checkpoint(path: Path):
    """A run directory (its latest checkpoint) or one step of it -> (model, tokenizers), from the consolidated
    weights: no DeepSpeed needed, whatever the ZeRO stage and the number of ranks that wrote it."""
    from unified import checkpoint as checkpoints
    from unified.config import from_dict
    from unified.model import ModelConfig, UnifiedModel
    from unified.tokenizers.fit import Tokenizers

    step_dir = checkpoints.find(path)
    info = checkpoints.read_info(step_dir)
    run_dir = step_dir.parent.parent
    tokenizers = Tokenizers.from_pretrained(run_dir / "tokenizers")
    config = from_dict(ModelConfig, info["model"], f"{step_dir / 'checkpoint.json'}: model")
    config.init_from = None
    model = UnifiedModel(config, tokenizers.layout_for(config.action_tokens), state_dim=tokenizers.state.dim)
    missing, unexpected = model.load_state_dict(checkpoints.load_weights(step_dir), strict=False)
    if missing or unexpected:
        raise UnifiedError(f"{step_dir / 'model.safetensors'}: does not match the model config in checkpoint.json "
                           f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    check_finite(model, step_dir / "model.safetensors")
    return model.eval(), tokenizers


def source_weights(checkpoint: Path) -> str:
    """A digest of the weights an export would be made from: a checkpoint's (from its verified manifest) or an
    exported model's fingerprint. Equal digests: exporting again would write the same model."""
    from unified import checkpoint as checkpoints
    from unified.model_dir import weights_fingerprint

    checkpoint = Path(checkpoint)
    if (checkpoint / "unified.json").is_file():
        return weights_fingerprint(checkpoint)
    step_dir = checkpoints.find(checkpoint)
    return json.loads((step_dir / "manifest.json").read_text())["model.safetensors"]["sha256"]


def export_once(checkpoint: Path, out: Path, action_only: bool = False) -> Path:
    """Export unless `out` already holds the export of the same weights (its cache, e.g. a teacher's generated
    reasoning, then survives); for directories a command owns, such as a study's."""
    info_path = Path(out) / "unified.json"
    if info_path.is_file():
        info = json.loads(info_path.read_text())
        if (info.get("source") or {}).get("weights") == source_weights(checkpoint) and \
                info.get("action_only") == action_only:
            print(f"{out}: the export of these weights, reused", flush=True)
            return Path(out)
    export(checkpoint=checkpoint, out=out, action_only=action_only, overwrite=True)
    return Path(out)


def export(*, checkpoint: Path, out: Path, action_only: bool = False, overwrite: bool = False) -> list[str]:
    """Write `checkpoint` (a run, a step of it, or an exported model) to `out`, loadable by
    `AutoModelForCausalLM.from_pretrained`, `Policy.from_pretrained` and, unless `action_only`,
    `WorldModel.from_pretrained`, with a manifest of every file's checksum. An existing export at `out` is replaced
    only with `overwrite`; anything else there is refused."""
    from unified.outputs import check_dir, staged_dir

    checkpoint, out = Path(checkpoint), Path(out)
    check_dir(out, "model", [checkpoint])  # before loading anything: a bad --out costs nothing
    source = {"path": str(checkpoint), "weights": source_weights(checkpoint)}
    if (checkpoint / "unified.json").is_file():
        model, tokenizers, _ = load_model(checkpoint, verify="full")
    else:
        model, tokenizers = load_training_checkpoint(checkpoint)
    with staged_dir(out, "model", [checkpoint], overwrite) as staging:
        kept = save_model(model, tokenizers, staging, action_only=action_only, source=source)
    print(f"exported {checkpoint} -> {out} ({model.num_parameters / 1e6:.2f} M parameters)")
    print("kept: " + ", ".join(kept))
    if action_only:
        fast = "" if model.config.action_tokens == "fast" else ", FAST tokenizer (the model emits bins)"
        print(f"dropped: image decoder (a policy only encodes frames){fast}; the text tokenizer stays because "
              "instructions are text")
    return kept
