"""`unified export`: a checkpoint -> a self-contained Hugging Face directory (see `unified.policy`)."""

from __future__ import annotations

from pathlib import Path

from unified.errors import UnifiedError
from unified.policy import load_model, save_model


def export(*, checkpoint: Path, out: Path, action_only: bool = False) -> list[str]:
    """Write `checkpoint` (a model directory) to `out`, loadable by `AutoModelForCausalLM.from_pretrained`,
    `Policy.from_pretrained` and, unless `action_only`, `WorldModel.from_pretrained`."""
    checkpoint, out = Path(checkpoint), Path(out)
    if out.resolve() == checkpoint.resolve():
        raise UnifiedError(f"--out {out} is the checkpoint itself; export to another directory")
    model, tokenizers, _ = load_model(checkpoint)
    kept = save_model(model, tokenizers, out, action_only=action_only)
    print(f"exported {checkpoint} -> {out} ({model.num_parameters / 1e6:.2f} M parameters)")
    print("kept: " + ", ".join(kept))
    if action_only:
        print("dropped: image decoder (a policy only encodes frames), FAST tokenizer (the model emits bins); "
              "the text tokenizer stays because instructions are text")
    return kept
