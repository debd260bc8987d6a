"""Run checkpoints: DeepSpeed's own files (model, optimizer, scheduler per rank) plus, in the same directory,
the consolidated weights as one safetensors file and a manifest. Written under a temporary name, renamed,
and `latest` last, so a checkpoint is never half-written; the manifest detects a damaged one at load.

    RUN/checkpoints/step_0000100/   DeepSpeed files, model.safetensors, checkpoint.json, manifest.json
                                    (with a moving average of the weights: model.safetensors holds the average,
                                    training.safetensors the trained weights)
    RUN/checkpoints/latest          the tag of the newest complete checkpoint
    RUN/tokenizers/, RUN/config.yaml, RUN/losses.jsonl, RUN/tensorboard/
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from unified.errors import UnifiedError

FORMAT = "unified-checkpoint"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def consolidated_state(engine, lora_scaling: float | None = None) -> dict[str, torch.Tensor] | None:
    """The full model weights on rank 0 (None elsewhere), LoRA adapters merged when `lora_scaling` is given.
    Collective (ZeRO-3, 16-bit training): call on every rank. A 16-bit run's weights are its fp32 master copies,
    not the bf16 ones the forward pass used."""
    if engine.bfloat16_enabled() or engine.fp16_enabled():
        state = _fp32_masters(engine)
    elif engine.zero_optimization_stage() == 3:
        state = engine._zero3_consolidated_16bit_state_dict()
    else:
        state = engine.module.state_dict()
    if torch.distributed.get_rank() != 0:
        return None
    state = {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}
    return merge_lora(state, lora_scaling) if lora_scaling is not None else state


def _fp32_masters(engine) -> dict[str, torch.Tensor]:
    """Every parameter from the optimizer's fp32 master copy (frozen ones, which have none, from the module,
    gathered under ZeRO-3), and the persistent buffers."""
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param

    zero3 = engine.zero_optimization_stage() == 3
    state = {}
    for name, parameter in engine.module.named_parameters():
        full = safe_get_full_fp32_param(parameter) if parameter.requires_grad else None
        if full is None:
            with deepspeed.zero.GatheredParameters([parameter], enabled=zero3):
                full = parameter.detach().float().clone()
        state[name] = full.float()
    for name, value in engine.module.state_dict().items():
        if name not in state:
            state[name] = value.float() if value.is_floating_point() else value
    return state


def merge_lora(state: dict[str, torch.Tensor], scaling: float) -> dict[str, torch.Tensor]:
    """A state dict with peft LoRA layers (`X.base_layer.weight`, `X.lora_A.default.weight`, ...) -> the plain
    model's (`X.weight` = W + scaling * B @ A). Works on the consolidated dict, so under ZeRO-3 too."""
    merged = {}
    for key, value in state.items():
        if ".lora_" in key:
            continue
        if key.endswith(".base_layer.weight"):
            prefix = key[: -len(".base_layer.weight")]
            a, b = state[f"{prefix}.lora_A.default.weight"], state[f"{prefix}.lora_B.default.weight"]
            merged[f"{prefix}.weight"] = (value.float() + scaling * (b.float() @ a.float())).to(value.dtype)
        else:
            merged[key.replace(".base_layer.", ".")] = value
    return merged


def save(engine, run_dir: Path, step: int, client_state: dict, info: dict, lora_scaling: float | None = None,
         tag: str | None = None, ema: torch.nn.Module | None = None) -> Path:
    """Save on every rank; returns the checkpoint directory. `model.safetensors` holds the merged weights, or the
    moving average `ema` of them when given (the trained ones then go to `training.safetensors`).

    Written under a temporary name and renamed, `latest` last; if writing fails (a full disk), the temporary files
    are removed, the previous checkpoint stays the latest, and the error names the file."""
    import torch.distributed as dist

    root = Path(run_dir) / "checkpoints"
    latest = tag is None  # a named checkpoint (e.g. "best") never becomes the one a resume continues from
    tag = tag or f"step_{step:07d}"
    temporary = f".tmp_{tag}"
    if dist.get_rank() == 0:
        shutil.rmtree(root / temporary, ignore_errors=True)
    dist.barrier()
    try:
        engine.save_checkpoint(str(root), tag=temporary, client_state=client_state, save_latest=False)
        state = consolidated_state(engine, lora_scaling)
        dist.barrier()
        if dist.get_rank() == 0:
            files = {"model.safetensors": state}
            if ema is not None:
                average = {k: v.detach().to("cpu").contiguous().clone() for k, v in ema.state_dict().items()}
                files = {"model.safetensors": merge_lora(average, lora_scaling) if lora_scaling is not None
                         else average, "training.safetensors": state}
            _finish(root / temporary, root, tag, files, step, info, latest)
    except OSError as e:
        shutil.rmtree(root / temporary, ignore_errors=True)
        from unified.outputs import disk_error

        raise disk_error(e) from None
    dist.barrier()
    return root / tag


def _finish(directory: Path, root: Path, tag: str, files: dict[str, dict], step: int, info: dict,
            latest: bool) -> None:
    """Rank 0: the consolidated weights, the info and the manifest, then the rename and `latest`."""
    import torch.distributed as dist

    for name, state in files.items():
        save_file(state, directory / name)
    (directory / "checkpoint.json").write_text(json.dumps(
        {"format": FORMAT, "step": step, "world_size": dist.get_world_size(), **info}, indent=2) + "\n")
    files = sorted(p for p in directory.rglob("*") if p.is_file() and p.name != "manifest.json")
    manifest = {str(p.relative_to(directory)): {"bytes": p.stat().st_size, "sha256": sha256_file(p)} for p in files}
    (directory / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    shutil.rmtree(root / tag, ignore_errors=True)
    os.replace(directory, root / tag)
    if latest:
        pointer = root / ".latest.tmp"
        pointer.write_text(tag + "\n")
        os.replace(pointer, root / "latest")


def latest(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint of a run: the one `latest` names or, when `latest` is missing (a run killed
    while renaming it), the newest step directory that passes its manifest. None when there is none."""
    root = Path(run_dir) / "checkpoints"
    if (root / "latest").is_file():
        return find(run_dir)
    for step_dir in sorted(root.glob("step_*"), reverse=True) if root.is_dir() else []:
        try:
            verify(step_dir)
        except UnifiedError:
            continue
        print(f"{root}: no `latest` file; using the newest complete checkpoint, {step_dir.name}", flush=True)
        return step_dir
    return None


def check_moving_average(directory: Path, ema_decay: float) -> None:
    """A run with ema_decay resumes only from a checkpoint that saved an average: starting one from the trained
    weights would silently give an average of a different run."""
    if ema_decay and not (Path(directory) / "training.safetensors").is_file():
        raise UnifiedError(f"{directory}: saved without a moving average of the weights; resume it without "
                           "ema_decay, or start the run again with it")


def find(path: str | Path) -> Path:
    """A run directory (its latest checkpoint) or a step directory -> the step directory, verified."""
    path = Path(path)
    if (path / "checkpoints" / "latest").is_file():
        tag = (path / "checkpoints" / "latest").read_text().strip()
        path = path / "checkpoints" / tag
    elif (path / "latest").is_file():
        path = path / (path / "latest").read_text().strip()
    if not (path / "checkpoint.json").is_file():
        if (path / "checkpoints").is_dir():
            found = latest(path)
            if found is not None:
                return found
            raise UnifiedError(f"{path}: a run directory without a complete checkpoint yet")
        raise UnifiedError(f"{path}: not a checkpoint (no checkpoint.json) nor a run directory with checkpoints")
    verify(path)
    return path


def verify(directory: Path) -> None:
    """Compare every file with the manifest written at save time; name the first that differs."""
    manifest_path = directory / "manifest.json"
    if not manifest_path.is_file():
        raise UnifiedError(f"{directory}: damaged checkpoint (no manifest.json); resume from an earlier step")
    manifest = json.loads(manifest_path.read_text())
    for name, expected in manifest.items():
        path = directory / name
        if not path.is_file():
            raise UnifiedError(f"{path}: missing from the checkpoint (damaged); resume from an earlier step")
        if path.stat().st_size != expected["bytes"] or sha256_file(path) != expected["sha256"]:
            raise UnifiedError(f"{path}: damaged (its size or checksum differs from manifest.json); "
                               "resume from an earlier step")


def universal_path(directory: Path) -> Path:
    """Where the universal form of checkpoint `directory` goes: RUN/checkpoints/universal/step_N."""
    directory = Path(directory)
    return directory.parent / "universal" / directory.name


def to_universal(directory: Path) -> Path:
    """DeepSpeed's universal checkpoint of `directory` (fp32 weights and optimizer moments per parameter, free of
    the number of ranks that wrote them), made once (written aside and renamed) and reused while the checkpoint it
    came from is unchanged. Rank 0 only."""
    import argparse
    import contextlib
    import io

    from deepspeed.checkpoint.ds_to_universal import main as convert

    out = universal_path(directory)
    source = sha256_file(Path(directory) / "manifest.json")  # a step rewritten by a later run is converted again
    marker = out / "source.sha256"
    if (out / "zero").is_dir() and marker.is_file() and marker.read_text().strip() == source:
        return out
    shutil.rmtree(out, ignore_errors=True)
    staging = out.parent / f".tmp_{out.name}"
    shutil.rmtree(staging, ignore_errors=True)
    print(f"{directory}: converting to a universal checkpoint ({out}), to resume on another number of ranks",
          flush=True)
    with contextlib.redirect_stdout(io.StringIO()):  # the converter narrates every stage
        convert(argparse.Namespace(input_folder=str(directory), output_folder=str(staging), num_extract_workers=1,
                                   num_merge_workers=1, keep_temp_folder=False, strict=True,
                                   inject_missing_state=True))
    (staging / "source.sha256").write_text(source + "\n")
    os.replace(staging, out)
    return out


def read_info(directory: Path) -> dict:
    return json.loads((Path(directory) / "checkpoint.json").read_text())


def load_weights(directory: Path, trained: bool = False) -> dict[str, torch.Tensor]:
    """The checkpoint's model weights (the moving average, when the run kept one); `trained`: the weights the
    optimizer trained, to continue training from."""
    directory = Path(directory)
    if trained and (directory / "training.safetensors").is_file():
        return load_file(directory / "training.safetensors")
    return load_file(directory / "model.safetensors")
