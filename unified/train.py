"""Training entry point, run under the DeepSpeed launcher:

    deepspeed --num_accelerators 2 --module unified.train --recipe recipes/joint.yaml [key=value ...] [--resume]

DeepSpeed owns the optimizer, scheduler, gradient accumulation, clipping and precision; this file owns
what is not the engine's: data position (the step), RNG, logging, checkpoints and failure handling.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

from unified.errors import UnifiedError

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


def measure_peak_flops(device: torch.device, dtype: torch.dtype, seconds: float = 0.5) -> float:
    """Achievable FLOP/s of a large matmul on this device: the denominator of MFU."""
    n = 1024
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        count += 1
    if device.type == "cuda":
        torch.cuda.synchronize()
    return 2 * n**3 * count / (time.perf_counter() - start)


def deepspeed_dir(recipe: str | Path) -> Path:
    """The directory holding `deepspeed/zeroN.json`: the one beside the recipe, else the repository's recipes."""
    beside = Path(recipe).resolve().parent
    return beside if (beside / "deepspeed").is_dir() else RECIPES


def mixture(config, shards, split: str = "train"):
    """The recipe's batches: training draws with its balance, turn weight and image dropout; the held-out split
    (validation) draws uniformly and keeps every frame."""
    from unified.batches import MixtureBatches

    extra = dict(balance=config.data.balance, turn_weight=config.data.turn_weight,
                 image_dropout=config.data.image_dropout) if split == "train" else {}
    return MixtureBatches(shards, config.data.tasks, config.data.seq_len, config.data.batch_size, config.seed,
                          config.model.image_loss_weight, config.model.task_weights,
                          config.data.with_state and config.model.use_state, config.model.state_dims,
                          split=split, **extra)


def prepare_data(config, run_dir: Path, progress: bool) -> Path:
    """Token shards from `data.path`: used as they are, or made from an episode store into run_dir/shards."""
    from unified.data.tokenize import tokenize

    path = Path(config.data.path)
    if (path / "meta.json").is_file():
        return path
    if (path / "meta" / "info.json").is_file():
        if not config.data.tokenizer:
            raise UnifiedError(f"data={path} is an episode store: give tokenizer=TOKDIR to tokenize it")
        tasks = ",".join(t for t in config.data.tasks)
        out = run_dir / "shards"
        if not (out / "meta.json").is_file():
            tokenize(data=path, tokenizer=Path(config.data.tokenizer), out=out, horizon=config.model.horizon,
                     history=config.model.history, tasks=tasks,
                     operators=Path(config.data.operators) if config.data.operators else None,
                     operator_hops=config.data.operator_hops, progress=progress)
        return out
    raise UnifiedError(f"data={path}: neither token shards (meta.json) nor an episode store (meta/info.json)")


def add_lora(model, lora) -> str:
    """Inject peft LoRA adapters into the backbone's `lora.target_modules`; freeze the rest of the backbone (its
    embeddings included). A continuous action head, outside the backbone, still trains. Returns a summary."""
    from peft import LoraConfig, inject_adapter_in_model

    try:
        inject_adapter_in_model(LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                           target_modules=list(lora.target_modules)), model.backbone)
    except ValueError as e:  # peft names the modules it could not find
        raise UnifiedError(f"lora.target_modules {lora.target_modules}: {e}") from None
    for name, parameter in model.backbone.named_parameters():
        parameter.requires_grad_(".lora_" in name)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for n, p in model.named_parameters() if ".lora_" not in n)
    return (f"LoRA r={lora.r} alpha={lora.alpha:g} on {', '.join(lora.target_modules)}: {trainable:,} trainable "
            f"parameters ({trainable / total:.1%} of the model's {total:,}); checkpoints hold the merged weights")


def initial_weights(config, layout):
    """Weights to start from: a checkpoint or an exported model directory (fine-tuning), else None."""
    from unified import checkpoint

    source = Path(config.init_from)
    if (source / "unified.json").is_file():
        from unified.model_dir import load_model

        model, _, _ = load_model(source)
        if model.layout != layout:
            raise UnifiedError(f"init_from {source}: its token layout differs from the data's; tokenize the data "
                               "with the model's tokenizers (its tokenizers/ directory)")
        state = {f"backbone.{k}": v for k, v in model.backbone.state_dict().items()}
        if model.action_head is not None:
            state |= {f"action_head.{k}": v for k, v in model.action_head.state_dict().items()}
        return state
    return checkpoint.load_weights(checkpoint.find(source))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="unified.train", description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", required=True, help="recipes/NAME.yaml")
    parser.add_argument("--resume", action="store_true", help="continue from run_dir's latest checkpoint")
    parser.add_argument("--overwrite", action="store_true", help="delete the run in run_dir and start again")
    parser.add_argument("--local_rank", type=int, default=0, help=argparse.SUPPRESS)  # set by the launcher
    parser.add_argument("overrides", nargs="*", help="key=value, e.g. steps=200 model.num_layers=4 data=DIR")
    args = parser.parse_args(argv)
    try:
        train(args.recipe, args.overrides, args.resume, args.overwrite)
    except UnifiedError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return _leave(2)
    except OSError as e:  # disk full, permission denied: name the file, keep the last checkpoint
        from unified.outputs import disk_error

        print(f"error: {disk_error(e)}", file=sys.stderr, flush=True)
        return _leave(2)
    return _leave(0)


def _leave(code: int) -> int:
    """Close the process group before exiting: a rank that exits with it open can abort in its communication
    threads' teardown (SIGABRT instead of the exit code)."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
    return code


def on_rank_zero(work, what: str):
    """Run `work` on rank 0 while the other ranks wait; every rank returns its result (None off rank 0) or ends
    with its error. The outcome is broadcast, so the others never wait at a barrier for a rank that died (NCCL
    would hang there until its timeout; gloo ends with a bare "connection closed")."""
    import torch.distributed as dist

    result, failure, message = None, None, None
    if dist.get_rank() == 0:
        try:
            result = work()
        except UnifiedError as e:
            failure, message = e, str(e)
        except OSError as e:
            from unified.outputs import disk_error

            failure = disk_error(e)
            message = str(failure)
        except BaseException as e:  # a bug, or Ctrl-C: the others must not wait for it either
            failure, message = e, f"{type(e).__name__}: {e}"
    outcome = [message]
    dist.broadcast_object_list(outcome, src=0)
    if outcome[0] is not None:
        if failure is not None:
            raise failure
        raise UnifiedError(f"rank 0 failed while {what}: {outcome[0]}")
    return result


def own_run_dir(config, resume: bool, overwrite: bool) -> list:
    """On rank 0, before anything is written: the run directory's rules (`unified.launcher.check_run_dir`) and its
    locks. `unified train` holds RUN/.lock for its ranks; a rank started by the bare launcher takes it itself.
    Rank 0 holds RUN/.ranks.lock while it trains. Returns the locks (held until the process ends)."""
    from unified.launcher import OWNER_ENV, RunLock, check_run_dir, clear_run
    from unified.train_config import run_inputs

    run_dir = Path(config.run_dir)
    state = check_run_dir(run_dir, resume, overwrite, run_inputs(config))
    locks = [] if os.environ.get(OWNER_ENV) else [RunLock(run_dir).acquire("is being trained")]
    locks.append(RunLock(run_dir, ".ranks.lock").acquire("is being trained by other ranks"))
    if state == "overwrite":
        clear_run(run_dir)
        print(f"{run_dir}: the earlier run was deleted (--overwrite)", flush=True)
    return locks


def train(recipe: str, overrides: list[str], resume: bool = False, overwrite: bool = False) -> list[float]:
    import deepspeed
    import torch.distributed as dist
    from torch.utils.tensorboard import SummaryWriter
    from tqdm import tqdm

    from unified import checkpoint
    from unified.config import to_dict
    from unified.data.tokenize import TokenShards
    from unified.distill import distill_targets
    from unified.model import UnifiedModel, state_values
    from unified.sequences import TASKS
    from unified.train_config import deepspeed_config, load_recipe

    config = load_recipe(recipe, overrides)
    gpu = torch.cuda.is_available()
    deepspeed.init_distributed(dist_backend="nccl" if gpu else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if gpu else torch.device("cpu")
    if gpu:
        torch.cuda.set_device(device)
    bf16 = config.precision == "bf16" or (config.precision == "auto" and gpu)
    run_dir = Path(config.run_dir)
    main_rank = rank == 0

    # Everything rank 0 prepares, the others wait for; an error on rank 0 ends every rank with its message.
    def own_and_prepare():
        held = own_run_dir(config, resume, overwrite)
        run_dir.mkdir(parents=True, exist_ok=True)
        return held, prepare_data(config, run_dir, progress=True)

    locks, shards_dir = on_rank_zero(own_and_prepare, "preparing the run's data") or (None, None)  # noqa: F841
    shards_dir = prepare_data(config, run_dir, progress=False) if not main_rank else shards_dir
    shards = TokenShards(shards_dir)
    layout = shards.layout
    if shards.horizon != config.model.horizon or shards.history != config.model.history:
        raise UnifiedError(f"{shards_dir}: shards were made with horizon {shards.horizon}, history {shards.history}; "
                           f"the model needs {config.model.horizon}, {config.model.history}")
    if config.model.action_head and shards.action_normalizer is None:
        raise UnifiedError(f"{shards_dir}/meta.json: no action_range (the shards predate the continuous head's "
                           "targets); tokenize the store again with `unified data tokenize`")
    if config.model.action_head_state:
        if shards.state_normalizer is None:
            raise UnifiedError(f"{shards_dir}/meta.json: no state values (the shards predate a head that reads the "
                               "state); tokenize the store again with `unified data tokenize`")
        if not (config.data.with_state and config.model.use_state):
            raise UnifiedError("model.action_head_state: true needs the state in the data (data.with_state and "
                               "model.use_state)")
    tokenizer_dir = Path(shards.meta["tokenizer"])

    def record_run():
        if not (run_dir / "tokenizers" / "layout.json").is_file():
            shutil.copytree(tokenizer_dir, run_dir / "tokenizers", dirs_exist_ok=True,
                            ignore=shutil.ignore_patterns("logs"))
        (run_dir / "config.yaml").write_text(__import__("yaml").safe_dump(to_dict(config), sort_keys=False))

    on_rank_zero(record_run, "copying the tokenizers into the run")

    # Resume: the same world size restores everything through DeepSpeed; another one goes through DeepSpeed's
    # universal checkpoint (weights, fp32 masters, optimizer moments and schedule, whatever the number of ranks).
    start_step, resume_dir, same_world = 0, None, False
    if resume:
        resume_dir = checkpoint.latest(run_dir)
        if resume_dir is None:
            if main_rank:
                print(f"--resume: {run_dir} has no complete checkpoint yet; starting from step 0", flush=True)
        else:
            saved = checkpoint.read_info(resume_dir)
            start_step, same_world = saved["step"], saved["world_size"] == world

    torch.manual_seed(config.seed)
    model = UnifiedModel(config.model, layout, state_size=state_values(shards.meta["state_dim"], config.model))
    initial = None
    if resume_dir is not None and not same_world:
        initial = checkpoint.load_weights(resume_dir, trained=True)
    elif resume_dir is None and config.init_from:
        initial = initial_weights(config, layout)
    if initial is not None:
        missing, unexpected = model.load_state_dict(initial, strict=False)
        if unexpected or [k for k in missing if not k.startswith("action_head.")]:
            raise UnifiedError(f"initial weights do not fit the model config (missing {missing[:3]}, "
                               f"unexpected {unexpected[:3]})")
    fresh_ordered = initial is None and config.ordinal_init  # a fresh model: its binned segments start ordered
    if fresh_ordered or config.model.action_label_sigma > 0:
        from unified.model import ordinal_init
        from unified.tokenizers.fit import Tokenizers

        run_tokenizers = Tokenizers.from_pretrained(tokenizer_dir)
        if fresh_ordered:
            ordinal_init(model, "action", run_tokenizers.action.bins, config.seed)
            ordinal_init(model, "state", run_tokenizers.state.bins, config.seed + 1)
        if config.model.action_label_sigma > 0:
            model.spread_action_targets(run_tokenizers.action.bins)
    if config.lora.enabled:
        note = add_lora(model, config.lora)
        if main_rank:
            print(note, flush=True)
    batches = mixture(config, shards)
    teacher, reasoning = None, None
    if config.distill.teacher:
        if set(t for t, w in config.data.tasks.items() if w > 0) != {"policy"}:
            raise UnifiedError("distillation trains an action-only student: set data.tasks to {policy: 1.0}")
        from unified.model_dir import load_model

        teacher, teacher_tokenizers, _ = load_model(config.distill.teacher, device=str(device))
        if teacher.layout != layout:
            raise UnifiedError(f"distill.teacher {config.distill.teacher}: its layout differs from the data's")
        teacher.requires_grad_(False)
        # The continuous head, if any, learns the teacher's expected chunk (or the recorded one).
        head_from_teacher = config.model.action_head and config.distill.head_target == "teacher"
        centres = torch.from_numpy(teacher_tokenizers.action.centres()) if head_from_teacher else None
        if config.distill.teacher_reasoning == "generated":
            from unified.distill import student_rows, teacher_reasoning

            rows = student_rows(batches, config.steps, config.optim.grad_accum, world)
            # Generated once, by worker processes, while the other ranks wait.
            on_rank_zero(lambda: teacher_reasoning(config.distill.teacher, shards, rows, config.distill.workers,
                                                   progress=True), "generating the teacher's reasoning")
            reasoning = teacher_reasoning(config.distill.teacher, shards, rows, progress=False)

    ds_config = deepspeed_config(config, world, bf16, deepspeed_dir(recipe), gpu)
    universal = None
    if resume_dir is not None and not same_world:
        on_rank_zero(lambda: checkpoint.to_universal(resume_dir), "converting the checkpoint to a universal one")
        universal = checkpoint.universal_path(resume_dir)
        ds_config["checkpoint"] = {"load_universal": True}
    trainable = [p for p in model.parameters() if p.requires_grad]
    engine, _, _, scheduler = deepspeed.initialize(model=model, model_parameters=trainable, config=ds_config)
    ema = None
    if config.ema_decay:
        from timm.utils import ModelEmaV3

        ema = ModelEmaV3(engine.module, decay=config.ema_decay, use_warmup=True, dtype=torch.float32)
    client: dict = {}
    if resume_dir is not None:
        source = resume_dir if universal is None else universal
        _, client = engine.load_checkpoint(str(source.parent), tag=source.name)
        restore = {"python": random.setstate, "numpy": np.random.set_state, "torch": torch.set_rng_state,
                   "cuda": torch.cuda.set_rng_state_all if gpu else lambda state: None}
        for name, state in client.get("rng", {}).items():
            restore[name](state)
        if universal is not None and main_rank:
            print(f"resuming at step {start_step} on {world} rank(s) from a {saved['world_size']}-rank checkpoint: "
                  "weights, optimizer moments and schedule restored (universal checkpoint)", flush=True)
    if ema is not None and resume_dir is not None:
        if not (resume_dir / "training.safetensors").is_file():
            raise UnifiedError(f"{resume_dir}: saved without a moving average of the weights; resume it without "
                               "ema_decay, or start the run again with it")
        ema.module.load_state_dict(checkpoint.load_weights(resume_dir))
    average = ema.module if ema is not None else None  # what checkpoints save as the model

    held_out = None
    if config.val_every:
        held_out = mixture(config, shards, split="held_out")
    best = client.get("best_val_loss", float("inf"))
    peak = measure_peak_flops(device, torch.bfloat16 if bf16 else torch.float32)
    flops_per_token = 6 * sum(p.numel() for p in model.parameters())
    writer = SummaryWriter(str(run_dir / "tensorboard")) if main_rank else None
    losses_path = run_dir / "losses.jsonl"
    losses = _read_losses(losses_path, start_step) if main_rank else []
    bar = tqdm(total=config.steps, initial=start_step, desc=config.name, unit="step", disable=not main_rank,
               dynamic_ncols=True)
    skipped = 0
    info = {"model": to_dict(config.model), "recipe": str(recipe), "name": config.name,
            "ema_decay": config.ema_decay}
    from unified.batches import step_batches

    for step, micro_batches in step_batches(batches, rank, config.optim.grad_accum, start_step, config.steps,
                                            config.data.workers, config.data.prefetch):
        started = time.perf_counter()  # the step's own time: its batches were built before (or ahead, by workers)
        step_loss, tokens, task_metrics, stepped = 0.0, 0, {}, True
        for batch in micro_batches:
            tensors = batch.to_torch(device)
            if teacher is not None:
                d = config.distill
                tensors |= distill_targets(teacher, shards, batch, d.temperature, centres, device, reasoning)
                tensors["distill"] = torch.tensor([d.ce_weight, d.kl_weight, d.temperature])
            loss, metrics = engine(tensors)
            bad = torch.tensor(0.0 if torch.isfinite(loss) else 1.0, device=device)
            dist.all_reduce(bad)
            if bad.item() > 0:
                where = f"step {step}, tasks {sorted({TASKS[t] for t in batch.task_ids.flatten() if t >= 0})}"
                samples = [s for row in batch.sample_ids for s in row][:6]
                if config.on_nan == "stop" or skipped >= config.max_skipped:
                    raise UnifiedError(f"non-finite loss at {where}, samples {samples} (on rank {rank}); "
                                       f"{'on_nan: stop' if config.on_nan == 'stop' else f'{skipped} steps skipped'}")
                skipped, stepped = skipped + 1, False
                if main_rank:
                    print(f"skipping step {step}: non-finite loss ({where})", flush=True)
                break  # nothing was backpropagated (one micro step per step: see TrainConfig): weights unchanged
            engine.backward(loss)
            engine.step()
            step_loss += float(loss.detach()) / config.optim.grad_accum
            tokens += int(metrics["tokens"])
            for k, v in metrics.items():
                if k.startswith(("loss/", "accuracy/")):
                    task_metrics[k] = task_metrics.get(k, 0.0) + float(v) / config.optim.grad_accum
        if not stepped:  # logged as skipped above, not as a loss of 0
            if main_rank:
                bar.update(1)
            continue
        if ema is not None:
            ema.update(engine.module, step=step + 1)
        mean_loss = torch.tensor(step_loss, device=device, dtype=torch.float64)
        dist.all_reduce(mean_loss)
        mean_loss = float(mean_loss) / world
        elapsed = time.perf_counter() - started
        if main_rank:
            losses.append(mean_loss)
            with open(losses_path, "a") as f:
                f.write(json.dumps({"step": step, "loss": mean_loss}) + "\n")
            tokens_per_s = tokens / max(elapsed, 1e-9)
            bar.update(1)
            bar.set_postfix_str(f"loss {mean_loss:.4f}, {tokens_per_s * world:.0f} tok/s")
            if step % config.log_every == 0 or step + 1 == config.steps:
                writer.add_scalar("train/loss", mean_loss, step)
                writer.add_scalar("train/learning_rate", scheduler.get_last_lr()[0], step)
                grad_norm = engine.get_global_grad_norm()
                if grad_norm is not None:
                    writer.add_scalar("train/grad_norm", float(grad_norm), step)
                writer.add_scalar("train/tokens_per_s", tokens_per_s * world, step)
                writer.add_scalar("train/mfu", flops_per_token * tokens_per_s / peak, step)
                for k, v in task_metrics.items():
                    writer.add_scalar(k, v, step)
        if config.sample_every and (step + 1) % config.sample_every == 0 and "world" in batches.tasks:
            _world_sample(engine.module, shards, tokenizer_dir, writer, step, device)
        if held_out is not None and ((step + 1) % config.val_every == 0 or step + 1 == config.steps):
            val_loss = validate(engine if ema is None else ema.module, held_out, config.val_batches, rank, device)
            if main_rank:
                writer.add_scalar("val/loss", val_loss, step)
                with open(run_dir / "validation.jsonl", "a") as f:
                    f.write(json.dumps({"step": step + 1, "loss": val_loss}) + "\n")
            if val_loss < best:  # the same on every rank: the loss is all-reduced
                best = val_loss
                checkpoint.save(engine, run_dir, step + 1, {"step": step + 1, "best_val_loss": best},
                                info | {"val_loss": val_loss}, config.lora.scaling if config.lora.enabled else None,
                                tag="best", ema=average)
        if (step + 1) % config.save_every == 0 or step + 1 == config.steps:
            client_state = {"step": step + 1, "best_val_loss": best,
                            "rng": {"python": random.getstate(), "numpy": np.random.get_state(),
                                    "torch": torch.get_rng_state()} |
                            ({"cuda": torch.cuda.get_rng_state_all()} if gpu else {})}
            checkpoint.save(engine, run_dir, step + 1, client_state, info,
                            config.lora.scaling if config.lora.enabled else None, ema=average)
    bar.close()
    if writer is not None:
        writer.close()
        print(f"{config.name}: {config.steps} steps, final loss {losses[-1] if losses else float('nan'):.4f}; "
              f"checkpoints in {run_dir / 'checkpoints'}", flush=True)
    return losses


@torch.no_grad()
def validate(model, held_out, batches: int, rank: int, device) -> float:
    """The mean loss of `model` (the engine, or the moving average of its weights) over `batches` batches of
    held-out episodes per rank, all-reduced (the same on every rank).
    A distilled student is validated on the cross-entropy of the recorded actions (no teacher targets)."""
    import torch.distributed as dist

    total = torch.zeros(2, device=device, dtype=torch.float64)
    for k in range(batches):
        tensors = held_out.batch(k, rank).to_torch(device)
        loss, _ = model(tensors)
        total += torch.tensor([float(loss), 1.0], device=device, dtype=torch.float64)
    dist.all_reduce(total)
    return float(total[0] / total[1])


def _read_losses(path: Path, start_step: int) -> list[float]:
    """The per-step losses before `start_step`; later lines (from a run that died after its checkpoint) go."""
    if not path.is_file():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    kept = [r for r in rows if r["step"] < start_step]
    path.write_text("".join(json.dumps(r) + "\n" for r in kept))
    return [r["loss"] for r in kept]


def _world_sample(model, shards, tokenizer_dir: Path, writer, step: int, device) -> None:
    """Real next frame vs the model's teacher-forced prediction, to TensorBoard (all ranks compute: ZeRO-3)."""
    from unified.packing import collate
    from unified.sequences import build
    from unified.tokenizers.image import ImageTokenizer

    index = shards.index("world", "held_out")
    index = index if len(index) else shards.index("world")
    sample = shards.sample("world", int(index[len(index) // 2]))
    built = build(sample, shards.layout)
    tensors = collate([[built]], len(built), shards.layout).to_torch(device)
    with torch.no_grad():
        logits, _ = model.logits(tensors["input_ids"], tensors["attention_mask"], tensors["position_ids"])
    start, stop = built.spans["next_frame"]
    image = shards.layout.segment("image")
    predicted = logits[0, start - 1:stop - 1, image.start:image.stop].argmax(-1).cpu().numpy()
    if writer is None:
        return
    tokenizer = ImageTokenizer.from_pretrained(tokenizer_dir / "image")
    now = shards.layout.to_local("image", sample.frames[-1])
    truth = shards.layout.to_local("image", sample.next_frame)
    frames = tokenizer.decode(np.stack([now, truth, predicted]))
    writer.add_images("world/now_true_predicted", frames, step, dataformats="NHWC")


if __name__ == "__main__":
    sys.exit(main())
