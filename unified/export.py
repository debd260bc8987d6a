"""`unified export`: a checkpoint -> a self-contained Hugging Face directory (see `unified.policy`)."""

from __future__ import annotations

from pathlib import Path

from unified.errors import UnifiedError
from unified.policy import load_model, save_model


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
    model = UnifiedModel(config, tokenizers.layout)
    missing, unexpected = model.load_state_dict(checkpoints.load_weights(step_dir), strict=False)
    if missing or unexpected:
        raise UnifiedError(f"{step_dir / 'model.safetensors'}: does not match the model config in checkpoint.json "
                           f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    return model.eval(), tokenizers


def export(*, checkpoint: Path, out: Path, action_only: bool = False) -> list[str]:
    """Write `checkpoint` (a model directory) to `out`, loadable by `AutoModelForCausalLM.from_pretrained`,
    `Policy.from_pretrained` and, unless `action_only`, `WorldModel.from_pretrained`."""
    checkpoint, out = Path(checkpoint), Path(out)
    if out.resolve() == checkpoint.resolve():
        raise UnifiedError(f"--out {out} is the checkpoint itself; export to another directory")
    if (checkpoint / "unified.json").is_file():
        model, tokenizers, _ = load_model(checkpoint)
    else:
        model, tokenizers = load_training_checkpoint(checkpoint)
    kept = save_model(model, tokenizers, out, action_only=action_only)
    print(f"exported {checkpoint} -> {out} ({model.num_parameters / 1e6:.2f} M parameters)")
    print("kept: " + ", ".join(kept))
    if action_only:
        print("dropped: image decoder (a policy only encodes frames), FAST tokenizer (the model emits bins); "
              "the text tokenizer stays because instructions are text")
    return kept
