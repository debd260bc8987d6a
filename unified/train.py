"""Training entry point, run under the DeepSpeed launcher:

    deepspeed --num_accelerators 2 --module unified.train --recipe recipes/joint.yaml [key=value ...] [--resume]

DeepSpeed owns the optimizer, scheduler, gradient accumulation, clipping and precision; this file owns
what is not the engine's: data position (the step), RNG, logging, checkpoints and failure handling.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from unified.errors import UnifiedError

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


def device_peak(me) -> float:
    """The denominator of MFU: the documented peak of this rank's CPU cores or GPU (`unified.train_bench`), or, for
    a GPU whose data sheet it does not know, the rate of a large matmul measured here."""
    from unified.train_bench import peak_flops

    dtype = torch.bfloat16 if me.bf16 else torch.float32
    try:
        return peak_flops(me.device, dtype, torch.get_num_threads())[0]
    except UnifiedError:
        return measure_peak_flops(me.device, dtype)


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


def mixture(config, shards, split: str = "train", gpu: bool = False):
    """The recipe's batches: training draws with its balance, turn weight, image dropout and state noise; the
    held-out split (validation) draws uniformly, keeps every frame the model reads and its states as recorded. Rows
    carry a dense mask unless they attend by flex attention."""
    from unified.batches import MixtureBatches
    from unified.train_config import uses_flex

    data = config.data
    extra = dict(balance=data.balance, turn_weight=data.turn_weight, image_dropout=data.image_dropout,
                 state_noise=data.state_noise) if split == "train" else {}
    return MixtureBatches(shards, data.tasks, data.seq_len, data.batch_size, config.seed,
                          config.model.image_loss_weight, config.model.task_weights,
                          data.with_state and config.model.use_state, config.model.state_dims,
                          split=split, dense_mask=not uses_flex(config, gpu),
                          inductive=config.model.inductive_scratchpad, question_weight=data.question_weight,
                          policy_frames=config.model.policy_frames,
                          inductive_reason=config.model.inductive_reason, **extra)


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


@dataclass
class Rank:
    """This process in the run: its recipe, place among the ranks, device and precision."""

    config: Any
    recipe: str
    rank: int
    world: int
    device: torch.device
    gpu: bool

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def run_dir(self) -> Path:
        return Path(self.config.run_dir)

    @property
    def bf16(self) -> bool:
        from unified.train_config import uses_bf16

        return uses_bf16(self.config, self.gpu)


@dataclass
class ResumePoint:
    """Where the run starts: step 0, or a checkpoint of the same number of ranks or (through its universal form)
    of another."""

    step: int = 0
    checkpoint: Path | None = None
    universal: Path | None = None
    saved_world: int | None = None


def train(recipe: str, overrides: list[str], resume: bool = False, overwrite: bool = False) -> list[float]:
    """The training loop; each step is a function of the module that owns it."""
    from unified.batches import step_batches

    me = start(recipe, overrides)
    locks, shards = prepare_run(me, resume, overwrite)  # noqa: F841 - the run's locks, held while it trains
    point = resume_point(me, resume)
    model = build_model(me, shards, point)
    batches = mixture(me.config, shards, gpu=me.gpu)
    teacher = None
    if me.config.distill.teacher:
        from unified.distill import Teacher

        teacher = Teacher(me.config, shards, batches, me.world, me.device)
    engine, scheduler, ema, client = make_engine(me, model, point)
    log = TrainingLog(me, engine, scheduler, point.step)
    keeper = Keeper(me, shards, ema, client)
    skipped = 0
    for step, micro_batches in step_batches(batches, me.rank, me.config.optim.grad_accum, point.step,
                                            me.config.steps, me.config.data.workers, me.config.data.prefetch):
        result = train_step(me, engine, step, micro_batches, teacher, skipped)
        if result is None:  # a non-finite loss, skipped (on_nan: skip): nothing was backpropagated
            skipped += 1
            log.skipped()
            continue
        if ema is not None:
            ema.update(engine.module, step=step + 1)
        log.step(step, result)
        keeper.after(engine, step, log.writer, "world" in batches.tasks)
    return log.close()


def start(recipe: str, overrides: list[str]) -> Rank:
    """The recipe with its overrides, the process group (gloo on CPUs, NCCL on GPUs) and this rank's device."""
    import deepspeed
    import torch.distributed as dist

    from unified.train_config import load_recipe, uses_flex

    config = load_recipe(recipe, overrides)
    gpu = torch.cuda.is_available()
    uses_flex(config, gpu)  # refused before any rank waits on another
    deepspeed.init_distributed(dist_backend="nccl" if gpu else "gloo")
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if gpu else torch.device("cpu")
    if gpu:
        torch.cuda.set_device(device)
    return Rank(config, recipe, dist.get_rank(), dist.get_world_size(), device, gpu)


def prepare_run(me: Rank, resume: bool, overwrite: bool):
    """Rank 0 takes the run directory (its rules and locks) and makes the token shards while the others wait;
    every rank opens the shards and checks them against the model; rank 0 records the tokenizers and config."""
    from unified.config import to_dict
    from unified.data.shards import TokenShards

    config, run_dir = me.config, me.run_dir

    def own_and_prepare():
        held = own_run_dir(config, resume, overwrite)
        run_dir.mkdir(parents=True, exist_ok=True)
        return held, prepare_data(config, run_dir, progress=True)

    locks, shards_dir = on_rank_zero(own_and_prepare, "preparing the run's data") or (None, None)
    shards = TokenShards(shards_dir if me.main else prepare_data(config, run_dir, progress=False))
    check_shards(config, shards)
    tokenizer_dir = Path(shards.meta["tokenizer"])

    def record_run():
        if not (run_dir / "tokenizers" / "layout.json").is_file():
            shutil.copytree(tokenizer_dir, run_dir / "tokenizers", dirs_exist_ok=True,
                            ignore=shutil.ignore_patterns("logs"))
        (run_dir / "config.yaml").write_text(__import__("yaml").safe_dump(to_dict(config), sort_keys=False))

    on_rank_zero(record_run, "copying the tokenizers into the run")
    return locks, shards


def check_shards(config, shards) -> None:
    """The shards hold what the model config needs (horizon, history, the continuous head's targets)."""
    where = shards.root
    if shards.horizon != config.model.horizon or shards.history != config.model.history:
        raise UnifiedError(f"{where}: shards were made with horizon {shards.horizon}, history {shards.history}; "
                           f"the model needs {config.model.horizon}, {config.model.history}")
    # The data decides how many values an action has (2 for the simulator's stores, any number for an imported one).
    config.model.action_dim = int(shards.meta.get("action_dim", config.model.action_dim))
    if config.model.action_tokens != "bins":  # chunks in FAST tokens: the shards encode them, the layout grows
        from unified.tokenizers.fit import Tokenizers

        shards.use_actions(config.model.action_tokens, Tokenizers.from_pretrained(Path(shards.meta["tokenizer"])))
    if config.model.action_head and shards.action_normalizer is None:
        raise UnifiedError(f"{where}/meta.json: no action_range (the shards predate the continuous head's "
                           "targets); tokenize the store again with `unified data tokenize`")
    if config.model.action_head_state:
        if shards.state_normalizer is None:
            raise UnifiedError(f"{where}/meta.json: no state values (the shards predate a head that reads the "
                               "state); tokenize the store again with `unified data tokenize`")
        if not (config.data.with_state and config.model.use_state):
            raise UnifiedError("model.action_head_state: true needs the state in the data (data.with_state and "
                               "model.use_state)")


def resume_point(me: Rank, resume: bool) -> ResumePoint:
    """With --resume, the latest complete checkpoint; one of another number of ranks is converted (by rank 0,
    once) into DeepSpeed's universal form, so that its optimizer moments survive the change."""
    from unified import checkpoint

    if not resume:
        return ResumePoint()
    found = checkpoint.latest(me.run_dir)
    if found is None:
        if me.main:
            print(f"--resume: {me.run_dir} has no complete checkpoint yet; starting from step 0", flush=True)
        return ResumePoint()
    saved = checkpoint.read_info(found)
    point = ResumePoint(saved["step"], found, saved_world=saved["world_size"])
    if saved["world_size"] != me.world:
        on_rank_zero(lambda: checkpoint.to_universal(found), "converting the checkpoint to a universal one")
        point.universal = checkpoint.universal_path(found)
    return point


def build_model(me: Rank, shards, point: ResumePoint):
    """The model of the recipe: fresh (its binned segments ordered), or from `init_from` (fine-tuning); label
    spreading and LoRA adapters when asked. A resumed run's weights come with its checkpoint (`make_engine`).
    Under ZeRO-3 (without LoRA) it is built inside `deepspeed.zero.Init`: each layer is partitioned across the
    ranks as soon as it exists, so no rank ever holds the whole model; the weights set here are gathered one
    tensor at a time (the whole model once, to load `init_from`)."""
    import deepspeed

    from unified.model import UnifiedModel, ordinal_init
    from unified.tokenizers.fit import Tokenizers

    config = me.config
    zero_init = config.zero_stage == 3 and not config.lora.enabled
    torch.manual_seed(config.seed)
    with _zero_init(me) if zero_init else contextlib.nullcontext():
        model = UnifiedModel(config.model, shards.layout, state_dim=shards.meta["state_dim"])
    if zero_init and me.main:
        local, total = sum(p.ds_tensor.numel() for p in model.parameters()), sum(p.ds_numel for p in model.parameters())
        print(f"model built partitioned (deepspeed.zero.Init): {local:,} of its {total:,} parameters on this rank",
              flush=True)
    initial = initial_weights(config, shards.layout) if point.checkpoint is None and config.init_from else None
    if initial is not None:
        with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=0, enabled=zero_init):
            missing, unexpected = model.load_state_dict(initial, strict=False)
        # An export holds no state_value: it is folded into the rows there, and learning it starts again from 0.
        if unexpected or [k for k in missing if not k.startswith("action_head.") and k != "state_value"]:
            raise UnifiedError(f"initial weights do not fit the model config (missing {missing[:3]}, "
                               f"unexpected {unexpected[:3]})")
    head = model.action_head
    if head is not None and head.standardize and point.checkpoint is None and not (
            initial is not None and "action_head.state_mean" in initial):
        head.set_state_stats(head_state_values(shards, config.model.state_dims))
    fresh_ordered = initial is None and point.checkpoint is None and config.ordinal_init
    if fresh_ordered or config.model.action_label_sigma > 0:
        tokenizers = Tokenizers.from_pretrained(Path(shards.meta["tokenizer"]))
        if fresh_ordered:
            embeddings = model.backbone.get_input_embeddings().weight
            with deepspeed.zero.GatheredParameters([embeddings], modifier_rank=0, enabled=zero_init):
                ordinal_init(model, "action", tokenizers.action.bins, config.seed)
                ordinal_init(model, "state", tokenizers.state.bins, config.seed + 1)
        if config.model.action_label_sigma > 0:
            model.spread_action_targets(tokenizers.action.bins)
    if config.lora.enabled:
        note = add_lora(model, config.lora)
        if me.main:
            print(note, flush=True)
    return model


def head_state_values(shards, state_dims: int | None) -> np.ndarray:
    """(N, K) the state values a continuous head reads (normalised over the tokenizer's range, the first K) at
    the training split's policy rows: what `model.action_head_standardize` takes its statistics from."""
    rows = np.asarray(shards.index("policy", "train"), np.int64)
    values = shards.state_normalizer.normalize(np.asarray(shards.arrays["state_values"][rows], np.float64))
    return values[:, :state_dims]


@contextlib.contextmanager
def _zero_init(me: Rank):
    """`deepspeed.zero.Init`, with transformers told of ZeRO-3 while the backbone is built (so that it initialises
    its weights gathered, one module at a time) and not after (a teacher loaded later stays whole)."""
    import deepspeed
    from transformers.integrations import HfDeepSpeedConfig

    from unified.train_config import deepspeed_config

    ds_config = deepspeed_config(me.config, me.world, me.bf16, deepspeed_dir(me.recipe), me.gpu)
    told = HfDeepSpeedConfig(ds_config)  # transformers holds a weak reference: ZeRO-3 for as long as this lives
    # Imported now: zero.Init patches torch.Tensor.__new__, and torch._dynamo (which transformers imports lazily,
    # through torchvision) refuses to import while it is patched.
    import torch._dynamo  # noqa: F401
    with deepspeed.zero.Init(config_dict_or_path=ds_config):
        yield
    del told


def make_engine(me: Rank, model, point: ResumePoint):
    """The DeepSpeed engine of the recipe's ZeRO stage, restored from the resume point (weights, optimizer,
    schedule, RNG), and the moving average of the weights when asked. Returns (engine, scheduler, ema or None,
    the checkpoint's client state)."""
    import deepspeed

    from unified import checkpoint
    from unified.train_config import deepspeed_config

    ds_config = deepspeed_config(me.config, me.world, me.bf16, deepspeed_dir(me.recipe), me.gpu)
    if point.universal is not None:
        ds_config["checkpoint"] = {"load_universal": True}
    trainable = [p for p in model.parameters() if p.requires_grad]
    engine, _, _, scheduler = deepspeed.initialize(model=model, model_parameters=trainable, config=ds_config)
    client: dict = {}
    if point.checkpoint is not None:
        source = point.universal or point.checkpoint
        _, client = engine.load_checkpoint(str(source.parent), tag=source.name)
        restore = {"python": random.setstate, "numpy": np.random.set_state, "torch": torch.set_rng_state,
                   "cuda": torch.cuda.set_rng_state_all if me.gpu else lambda state: None}
        for name, state in client.get("rng", {}).items():
            restore[name](state)
        if point.universal is not None and me.main:
            print(f"resuming at step {point.step} on {me.world} rank(s) from a {point.saved_world}-rank checkpoint: "
                  "weights, optimizer moments and schedule restored (universal checkpoint)", flush=True)
    ema = None
    if me.config.ema_decay:
        from timm.utils import ModelEmaV3

        ema = ModelEmaV3(engine.module, decay=me.config.ema_decay, use_warmup=True, dtype=torch.float32)
        if point.checkpoint is not None:
            checkpoint.check_moving_average(point.checkpoint, me.config.ema_decay)
            ema.module.load_state_dict(checkpoint.load_weights(point.checkpoint))
    return engine, scheduler, ema, client


@dataclass
class StepResult:
    loss: float  # mean over micro steps and ranks
    tokens: int  # target tokens on this rank
    positions: int  # positions processed on this rank (rows x seq_len: what the FLOPs are spent on)
    metrics: dict[str, float]  # loss/TASK and accuracy/TASK on this rank
    seconds: float


def train_step(me: Rank, engine, step: int, micro_batches: list, teacher, skipped: int) -> StepResult | None:
    """One optimizer step over this rank's micro-batches. A non-finite loss (checked on every rank together)
    stops the run naming the step, tasks and samples, or, with on_nan: skip and under max_skipped, skips the step
    (None) before anything is backpropagated."""
    import torch.distributed as dist

    from unified.sequences import TASKS

    config, started = me.config, time.perf_counter()
    total, tokens, positions, metrics = 0.0, 0, 0, {}
    for batch in micro_batches:
        tensors = batch.to_torch(me.device)
        if teacher is not None:
            tensors |= teacher.targets(batch)
        loss, found = engine(tensors)
        bad = torch.tensor(0.0 if torch.isfinite(loss) else 1.0, device=me.device)
        dist.all_reduce(bad)
        if bad.item() > 0:
            where = f"step {step}, tasks {sorted({TASKS[t] for t in batch.task_ids.flatten() if t >= 0})}"
            samples = [s for row in batch.sample_ids for s in row][:6]
            if config.on_nan == "stop" or skipped >= config.max_skipped:
                raise UnifiedError(f"non-finite loss at {where}, samples {samples} (on rank {me.rank}); "
                                   f"{'on_nan: stop' if config.on_nan == 'stop' else f'{skipped} steps skipped'}")
            if me.main:
                print(f"skipping step {step}: non-finite loss ({where})", flush=True)
            return None  # one micro step per step under on_nan: skip (see TrainConfig): the weights are unchanged
        engine.backward(loss)
        engine.step()
        total += float(loss.detach()) / len(micro_batches)
        tokens += int(found["tokens"])
        positions += batch.input_ids.size
        for k, v in found.items():
            if k.startswith(("loss/", "accuracy/")):
                metrics[k] = metrics.get(k, 0.0) + float(v) / len(micro_batches)
    mean = torch.tensor(total, device=me.device, dtype=torch.float64)
    dist.all_reduce(mean)
    return StepResult(float(mean) / me.world, tokens, positions, metrics, time.perf_counter() - started)


class TrainingLog:
    """Rank 0's record of the run: RUN/losses.jsonl (continued from the resume point), TensorBoard (loss, per-task
    losses and accuracies, learning rate, grad norm, tokens/s, MFU) and the progress bar."""

    def __init__(self, me: Rank, engine, scheduler, start_step: int):
        from torch.utils.tensorboard import SummaryWriter
        from tqdm import tqdm

        self.me, self.engine, self.scheduler = me, engine, scheduler
        self.path = me.run_dir / "losses.jsonl"
        # losses.jsonl numbers its steps from 0, validation.jsonl counts the steps done.
        self.losses = [r["loss"] for r in _keep_rows(self.path, start_step - 1)] if me.main else []
        if me.main:
            _keep_rows(me.run_dir / "validation.jsonl", start_step)
        self.writer = SummaryWriter(str(me.run_dir / "tensorboard")) if me.main else None
        self.peak = device_peak(me)
        from unified.train_bench import model_flops_per_token

        self.flops_per_token = model_flops_per_token(engine.module, me.config.data.seq_len)
        self.bar = tqdm(total=me.config.steps, initial=start_step, desc=me.config.name, unit="step",
                        disable=not me.main, dynamic_ncols=True)

    def skipped(self) -> None:
        """A skipped step: counted by the bar, never logged as a loss."""
        if self.me.main:
            self.bar.update(1)

    def step(self, step: int, result: StepResult) -> None:
        me, config = self.me, self.me.config
        if not me.main:
            return
        self.losses.append(result.loss)
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, "loss": result.loss}) + "\n")
        tokens_per_s = result.tokens / max(result.seconds, 1e-9)
        self.bar.update(1)
        self.bar.set_postfix_str(f"loss {result.loss:.4f}, {tokens_per_s * me.world:.0f} tok/s")
        if step % config.log_every == 0 or step + 1 == config.steps:
            w = self.writer
            w.add_scalar("train/loss", result.loss, step)
            w.add_scalar("train/learning_rate", self.scheduler.get_last_lr()[0], step)
            grad_norm = self.engine.get_global_grad_norm()
            if grad_norm is not None:
                w.add_scalar("train/grad_norm", float(grad_norm), step)
            w.add_scalar("train/tokens_per_s", tokens_per_s * me.world, step)
            positions_per_s = result.positions / max(result.seconds, 1e-9)
            w.add_scalar("train/mfu", self.flops_per_token * positions_per_s / self.peak, step)
            for k, v in result.metrics.items():
                w.add_scalar(k, v, step)

    def close(self) -> list[float]:
        self.bar.close()
        if self.writer is not None:
            self.writer.close()
            print(f"{self.me.config.name}: {self.me.config.steps} steps, final loss "
                  f"{self.losses[-1] if self.losses else float('nan'):.4f}; checkpoints in "
                  f"{self.me.run_dir / 'checkpoints'}", flush=True)
        return self.losses


class Keeper:
    """What happens after a step: a world-model sample to TensorBoard, the validation loss on held-out episodes
    with the best checkpoint, and the periodic checkpoint (with the data position and RNG)."""

    def __init__(self, me: Rank, shards, ema, client: dict):
        from unified.config import to_dict

        config = me.config
        self.me, self.shards = me, shards
        self.average = ema.module if ema is not None else None  # what checkpoints save as the model, if any
        self.held_out = mixture(config, shards, split="held_out", gpu=me.gpu) if config.val_every else None
        self.best = client.get("best_val_loss", float("inf"))
        self.info = {"model": to_dict(config.model), "recipe": str(me.recipe), "name": config.name,
                     "ema_decay": config.ema_decay}
        self.lora = config.lora.scaling if config.lora.enabled else None

    def after(self, engine, step: int, writer, world_task: bool) -> None:
        from unified import checkpoint

        me, config, done = self.me, self.me.config, step + 1
        if config.sample_every and done % config.sample_every == 0 and world_task:
            _world_sample(engine.module, self.shards, Path(self.shards.meta["tokenizer"]), writer, step, me.device)
        if self.held_out is not None and (done % config.val_every == 0 or done == config.steps):
            model = engine if self.average is None else self.average
            val_loss = validate(model, self.held_out, config.val_batches, me.rank, me.device)
            if me.main:
                writer.add_scalar("val/loss", val_loss, step)
                with open(me.run_dir / "validation.jsonl", "a") as f:
                    f.write(json.dumps({"step": done, "loss": val_loss}) + "\n")
            if val_loss < self.best:  # the same on every rank: the loss is all-reduced
                self.best = val_loss
                checkpoint.save(engine, me.run_dir, done, {"step": done, "best_val_loss": self.best},
                                self.info | {"val_loss": val_loss}, self.lora, tag="best", ema=self.average)
        if done % config.save_every == 0 or done == config.steps:
            rng = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
            if me.gpu:
                rng["cuda"] = torch.cuda.get_rng_state_all()
            checkpoint.save(engine, me.run_dir, done, {"step": done, "best_val_loss": self.best, "rng": rng},
                            self.info, self.lora, ema=self.average)


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


def _keep_rows(path: Path, last_step: int) -> list[dict]:
    """The rows of a JSON-lines log whose step is at most `last_step`, written back without the later ones (a run
    that died after its checkpoint logged them; the resumed run logs them again)."""
    if not path.is_file():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    kept = [r for r in rows if r["step"] <= last_step]
    path.write_text("".join(json.dumps(r) + "\n" for r in kept))
    return kept


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
