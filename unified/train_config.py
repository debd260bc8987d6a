"""Training recipes: YAML mapped onto typed dataclasses, `key=value` overrides on dotted paths, short keys.

A recipe may hold a `gpu:` section of overrides applied when a GPU is present (bf16, a bigger model,
ZeRO-3), so that one file serves the laptop and the cluster.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from unified.config import apply_overrides, check_dotted, from_dict, load_yaml, set_dotted, to_dict
from unified.errors import UnifiedError
from unified.model import ModelConfig

# Short keys that always work on the command line, and the dotted field each stands for.
SHORT_KEYS = {
    "data": "data.path",
    "tokenizer": "data.tokenizer",
    "run_dir": "run_dir",
    "steps": "steps",
    "save_every": "save_every",
    "zero_stage": "zero_stage",
    "seed": "seed",
}


@dataclass
class DataConfig:
    path: str = ""  # token shards (`unified data tokenize`) or an episode store (tokenized into run_dir/shards)
    tokenizer: str = ""  # tokenizer directory; needed when `path` is an episode store
    operators: str | None = None  # operator data set for the text task when `path` is a store
    operator_hops: str = "2-4"  # hop counts trained on (length generalisation is tested on more)
    tasks: dict[str, float] = field(default_factory=lambda: {"world": 1.0, "policy_reason": 1.0, "policy": 1.0})
    seq_len: int = 1024  # packed row length
    batch_size: int = 4  # packed rows per rank per micro step
    with_state: bool = True  # the ego state in policy prompts
    # Draw policy samples of rare decisions (slow down, yield, change lanes) more often than the common "keep lane":
    # weight (share of the sample's decision) ** -balance; 0 draws uniformly, 1 gives each decision the same share.
    balance: float = 0.0
    # Draw policy samples whose action chunk steers beyond 0.1 rad (turns, lane changes, corrections: a few steps in
    # a hundred) this many times as often as the others; 1 draws uniformly.
    turn_weight: float = 1.0
    # The share of policy samples (with and without reasoning) whose prompt leaves out the frame(s): the state and the
    # instruction alone must then give the action, so the policy cannot lean only on recognising the picture.
    image_dropout: float = 0.0
    # Each state token of a training policy prompt shifted by a bin drawn uniformly from -k .. k (0: as recorded),
    # within the bins its dimension takes, so that no prompt names its sample's exact state (measured: worse).
    state_noise: int = 0
    # The operator questions' premises and question as targets too, at this loss weight relative to the scratchpad
    # and answer (0: only those are trained). Predicting the premises trains the model to match a name with where it
    # appeared before, the match a scratchpad's lookup needs.
    question_weight: float = 0.0
    # Batches built ahead by this many DataLoader worker processes (0: on the training process, between steps),
    # `prefetch` steps each; the batches are the same either way.
    workers: int = 0
    prefetch: int = 2


@dataclass
class OptimConfig:
    lr: float = 1e-3
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 20
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    grad_accum: int = 1  # micro steps per optimizer step


@dataclass
class DistillConfig:
    teacher: str | None = None  # an exported model directory (the frozen teacher); None: no distillation
    # What the teacher reads before the chunk: its own greedy reasoning, generated once for every state the student
    # trains on (cached beside the teacher), or the simulator's recorded sentence (an oracle it never has driving).
    teacher_reasoning: Literal["generated", "recorded"] = "generated"
    workers: int = 2  # processes that generate the teacher's reasoning
    kl_weight: float = 1.0  # KL(teacher || student) on action tokens, teacher reading its reasoning
    ce_weight: float = 0.0  # cross-entropy on the ground-truth action tokens besides
    temperature: float = 1.0
    # The continuous head's target, when the student has one: the teacher's expected chunk under its action-token
    # distributions ("teacher"), the chunk the teacher's own continuous head writes ("teacher_head"; both read the
    # teacher's reasoning first) or the recorded one ("ground_truth").
    head_target: Literal["teacher", "teacher_head", "ground_truth"] = "teacher"


@dataclass
class LoraConfig:
    """Low-rank adapters (peft) on the backbone's linear layers: only they (and a continuous head, if any) train.
    Checkpoints and exports hold the merged weights, so everything downstream sees a plain model."""

    enabled: bool = False
    r: int = 8
    alpha: float = 16.0  # the update is scaled by alpha / r
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: [
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])

    def __post_init__(self):
        if self.r < 1 or not self.target_modules:
            raise UnifiedError(f"lora: r must be at least 1 and target_modules non-empty, got r={self.r}, "
                               f"target_modules={self.target_modules}")

    @property
    def scaling(self) -> float:
        return self.alpha / self.r


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    name: str = "run"
    run_dir: str = "runs/train"
    steps: int = 100  # optimizer steps
    save_every: int = 50  # checkpoint every N steps (and always at the end)
    log_every: int = 5
    sample_every: int = 50  # world-model sample images to TensorBoard every N steps; 0: never
    # Loss on the store's held-out episodes every N steps (0: never), over val_batches batches per rank, to
    # TensorBoard and RUN/validation.jsonl; the weights with the lowest one are kept in RUN/checkpoints/best.
    val_every: int = 0
    val_batches: int = 4
    seed: int = 0
    zero_stage: int = 2
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 on GPUs, fp32 on the CPU
    init_from: str | None = None  # fine-tune: weights from an exported model directory or a checkpoint
    ordinal_init: bool = True  # a fresh model's action and state bins start ordered (unified.model.ordinal_init)
    # An exponential moving average of the weights (timm's ModelEmaV3, its warm-up: the decay grows as
    # 1 - (1 + step) ** -2/3 up to this cap; 0: none). With it, a checkpoint's model.safetensors (what validation,
    # export, fine-tuning and distillation read) holds the averaged weights and training.safetensors the trained ones.
    ema_decay: float = 0.0
    # How packed rows attend: sdpa with a dense (B, 1, T, T) mask, or flex attention with a block mask built from
    # the samples' segments (no dense mask; fully masked blocks skipped; compiled on first use); auto: flex on
    # GPUs, sdpa on the CPU (PyTorch's flex attention has no backward there).
    attention: Literal["auto", "sdpa", "flex"] = "auto"
    on_nan: Literal["stop", "skip"] = "stop"  # a NaN/inf loss stops the run (naming step, task, samples) or is skipped
    max_skipped: int = 10  # with on_nan: skip, stop after this many skipped steps
    gpu: dict[str, Any] = field(default_factory=dict)  # overrides applied when a GPU is present

    def __post_init__(self):
        if self.zero_stage not in (0, 1, 2, 3):
            raise UnifiedError(f"zero_stage must be 0, 1, 2 or 3, got {self.zero_stage}")
        if self.steps < 1 or self.save_every < 1:
            raise UnifiedError(f"steps and save_every must be at least 1, got {self.steps} and {self.save_every}")
        if self.data.balance < 0 or self.data.turn_weight <= 0:
            raise UnifiedError(f"data.balance must not be negative and data.turn_weight must be positive, got "
                               f"{self.data.balance} and {self.data.turn_weight}")
        if self.data.workers < 0 or self.data.prefetch < 1:
            raise UnifiedError(f"data.workers must not be negative and data.prefetch must be at least 1, got "
                               f"{self.data.workers} and {self.data.prefetch}")
        if not 0 <= self.data.image_dropout <= 1:
            raise UnifiedError(f"data.image_dropout is a share of the policy samples, in [0, 1]; got "
                               f"{self.data.image_dropout}")
        if not isinstance(self.data.state_noise, int) or self.data.state_noise < 0:
            raise UnifiedError(f"data.state_noise is a number of bins, a whole number 0 or more; got "
                               f"{self.data.state_noise!r}")
        if self.data.state_noise and (self.model.state_value_embedding or self.model.action_head_state):
            raise UnifiedError("data.state_noise shifts the state tokens, not the state values that "
                               "model.state_value_embedding and model.action_head_state read; set one of them off")
        if self.data.question_weight < 0:
            raise UnifiedError(f"data.question_weight is a loss weight, 0 or more; got {self.data.question_weight}")
        if self.on_nan == "skip" and self.optim.grad_accum > 1:
            raise UnifiedError("on_nan: skip needs optim.grad_accum 1: a skipped micro step would leave DeepSpeed's "
                               "accumulation boundary out of step with the run's; use on_nan: stop")
        if self.model.fixed_state_embedding and not self.ordinal_init:
            raise UnifiedError("model.fixed_state_embedding keeps the state bins' rows where ordinal_init puts them: "
                               "it needs ordinal_init: true")
        if not 0 <= self.ema_decay < 1:
            raise UnifiedError(f"ema_decay is the moving average's decay, in [0, 1) (0: none); got {self.ema_decay}")
        if self.ema_decay and self.zero_stage == 3:
            raise UnifiedError("ema_decay needs whole weights on every rank: use zero_stage 0, 1 or 2 (ZeRO-3 "
                               "partitions them)")
        unknown = sorted(set(self.data.tasks) - {"policy_reason", "policy", "world", "text"})
        if unknown:
            raise UnifiedError(f"data.tasks: unknown task(s) {unknown}; tasks are policy_reason, policy, world, text")


def uses_bf16(config: TrainConfig, gpu: bool) -> bool:
    """Whether the run trains in bf16 (`precision`, auto: on GPUs)."""
    return config.precision == "bf16" or (config.precision == "auto" and gpu)


def uses_flex(config: TrainConfig, gpu: bool) -> bool:
    """Whether packed rows attend through a flex-attention block mask (`attention`, auto: on GPUs). Training with
    it on a CPU is refused: PyTorch's flex attention has no backward there."""
    if config.attention == "flex" and not gpu:
        raise UnifiedError("attention=flex trains on GPUs only (PyTorch's flex attention has no backward on the "
                           "CPU); use attention=sdpa or auto")
    return config.attention == "flex" or (config.attention == "auto" and gpu)


def run_inputs(config: TrainConfig) -> list[str]:
    """The paths a run reads: its run directory must be none of them, nor lie inside one."""
    return [p for p in (config.data.path, config.data.tokenizer, config.data.operators, config.init_from,
                        config.distill.teacher) if p]


def load_recipe(path: str | Path, overrides: list[str] = (), gpu: bool | None = None) -> TrainConfig:
    """Read a recipe and apply `key=value` overrides (YAML values: numbers, lists, booleans, null)."""
    data = apply_overrides(TrainConfig, load_yaml(path) if path else {}, overrides, SHORT_KEYS)
    config = from_dict(TrainConfig, data, str(path))
    if gpu is None:
        import torch

        gpu = torch.cuda.is_available()
    if gpu and config.gpu:
        merged = to_dict(config)
        for key, value in _flatten(config.gpu):
            check_dotted(TrainConfig, key, f"{path}: gpu")
            set_dotted(merged, key, value, f"{path}: gpu")
        apply_overrides(TrainConfig, merged, overrides, SHORT_KEYS)  # the command line wins over the gpu section
        config = from_dict(TrainConfig, merged, f"{path} (gpu)")
    return config


def _flatten(tree: dict, prefix: str = "") -> list[tuple[str, Any]]:
    out = []
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and k not in ("tasks", "task_weights"):
            out += _flatten(v, key + ".")
        else:
            out.append((key, v))
    return out


def deepspeed_config(config: TrainConfig, world_size: int, bf16: bool, recipes: Path, gpu: bool = False) -> dict:
    """The DeepSpeed JSON of the recipe's ZeRO stage, filled with the recipe's batch, optimizer and schedule.

    The JSON owns the engine's own settings (communication overlap, buckets, the optimizer's implementation, e.g.
    `"optimizer": {"params": {"fused": true}}`); its `"gpu"` section is merged over them when a GPU trains. The
    recipe owns what it trains with: batch sizes, learning rate, betas, weight decay, clipping, schedule."""
    import json

    path = recipes / "deepspeed" / f"zero{config.zero_stage}.json"
    if not path.is_file():
        raise UnifiedError(f"{path}: missing DeepSpeed config for zero_stage {config.zero_stage}")
    try:
        ds = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UnifiedError(f"{path}: not valid JSON ({e})") from None
    on_gpu = ds.pop("gpu", {})
    if gpu:
        ds = _merged(ds, on_gpu)
    o = config.optim
    ds["train_micro_batch_size_per_gpu"] = config.data.batch_size
    ds["gradient_accumulation_steps"] = o.grad_accum
    ds["train_batch_size"] = config.data.batch_size * o.grad_accum * world_size
    ds["gradient_clipping"] = o.grad_clip
    optimizer = ds.get("optimizer", {})
    ds["optimizer"] = {"type": optimizer.get("type", "AdamW"), "params": {
        "eps": 1e-8, "torch_adam": True, **optimizer.get("params", {}),
        "lr": o.lr, "betas": list(o.betas), "weight_decay": o.weight_decay}}
    ds["scheduler"] = {"type": "WarmupCosineLR", "params": {
        "total_num_steps": config.steps, "warmup_num_steps": o.warmup_steps, "warmup_type": "linear",
        "warmup_min_ratio": 0.0, "cos_min_ratio": o.min_lr_ratio}}
    ds["bf16"] = {"enabled": bf16}
    ds["steps_per_print"] = 10**9  # the progress bar and TensorBoard report instead
    return ds


def _merged(base: dict, over: dict) -> dict:
    out = dict(base)
    for key, value in over.items():
        out[key] = _merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out
