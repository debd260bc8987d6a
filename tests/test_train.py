"""Training through the real DeepSpeed launcher on 2 CPU ranks (gloo): ZeRO-2/3, resume, failures, export."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from unified.errors import UnifiedError
from unified.launcher import shared_buffers
from unified.train_config import TrainConfig, load_recipe

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
DEBUG = ROOT / "recipes" / "debug.yaml"


def launch(ranks: int, run_dir: Path, shards: Path, *overrides: str, resume: bool = False, wait: bool = True):
    command = [str(BIN / "deepspeed"), "--num_accelerators", str(ranks), "--master_port", str(29500 + ranks),
               "--module", "unified.train", "--recipe", str(DEBUG), f"run_dir={run_dir}", f"data={shards}",
               "model.horizon=4", "data.seq_len=256", *overrides] + (["--resume"] if resume else [])
    if not wait:
        return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True, cwd=ROOT)
    return subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=ROOT)


def losses(run_dir: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run_dir / "losses.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def shards(model_data):
    return model_data / "shards"


STEPS = ["steps=10", "save_every=2", "sample_every=0"]


@pytest.fixture(scope="module")
def whole_run(shards, tmp_path_factory) -> Path:
    """A finished 10-step run on 2 ranks, checkpointed every 2 steps (tests copy it before changing it)."""
    run = tmp_path_factory.mktemp("whole") / "run"
    result = launch(2, run, shards, *STEPS)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return run


# study.yaml configures `unified eval distill` (tests/test_study.py), ablation.yaml and action_tokens.yaml
# `unified eval ablation` (tests/test_ablation.py); every other recipe is a training recipe.
@pytest.mark.parametrize("recipe", sorted(p for p in (ROOT / "recipes").glob("*.yaml")
                                          if p.name not in ("study.yaml", "ablation.yaml", "action_tokens.yaml")),
                         ids=lambda p: p.name)
def test_every_recipe_maps_onto_the_config(recipe):
    for gpu in (False, True):
        config = load_recipe(recipe, gpu=gpu)
        assert isinstance(config, TrainConfig)
    assert load_recipe(recipe, gpu=True).zero_stage in (2, 3)


def test_overrides_and_short_keys():
    config = load_recipe(DEBUG, ["steps=7", "zero_stage=3", "model.num_layers=3", "data=/x", "data.tasks.world=0.5"],
                         gpu=False)
    assert (config.steps, config.zero_stage, config.model.num_layers, config.data.path) == (7, 3, 3, "/x")
    assert config.data.tasks["world"] == 0.5
    with pytest.raises(UnifiedError, match=r"unknown key 'optim.learning_rate'.*valid keys: lr, min_lr_ratio"):
        load_recipe(DEBUG, ["optim.learning_rate=1"])
    with pytest.raises(UnifiedError, match="expected key=value"):
        load_recipe(DEBUG, ["steps"])


def test_deepspeed_settings_come_from_the_json_and_its_gpu_section(tmp_path):
    from unified.train_config import deepspeed_config

    config = load_recipe(ROOT / "recipes" / "joint.yaml", ["optim.lr=0.005"], gpu=False)
    cpu = deepspeed_config(config, 2, False, ROOT / "recipes", gpu=False)
    gpu = deepspeed_config(config, 2, True, ROOT / "recipes", gpu=True)
    assert cpu["zero_optimization"]["overlap_comm"] is False and gpu["zero_optimization"]["overlap_comm"] is True
    assert "fused" not in cpu["optimizer"]["params"] and gpu["optimizer"]["params"]["fused"] is True
    assert "gpu" not in cpu and "gpu" not in gpu
    for ds in (cpu, gpu):
        assert ds["optimizer"]["params"]["lr"] == 0.005 and ds["optimizer"]["params"]["torch_adam"] is True
        assert ds["train_batch_size"] == 2 * config.data.batch_size * config.optim.grad_accum
    (tmp_path / "deepspeed").mkdir()
    (tmp_path / "deepspeed" / "zero2.json").write_text('{"zero_optimization": {"stage": 2},')
    with pytest.raises(UnifiedError, match="zero2.json: not valid JSON"):
        deepspeed_config(config, 1, False, tmp_path)


def test_packed_attention_kernel_by_device():
    from unified.train_config import uses_flex

    auto = load_recipe(DEBUG, gpu=False)
    assert (uses_flex(auto, gpu=False), uses_flex(auto, gpu=True)) == (False, True)
    assert not uses_flex(load_recipe(DEBUG, ["attention=sdpa"], gpu=True), gpu=True)
    with pytest.raises(UnifiedError, match="attention=flex trains on GPUs only"):
        uses_flex(load_recipe(DEBUG, ["attention=flex"], gpu=False), gpu=False)


def test_unknown_key_on_the_command_line_starts_no_rank(tmp_path):
    result = subprocess.run([str(BIN / "unified"), "train", "--recipe", str(DEBUG), "--ranks", "2", "modle.x=1"],
                            capture_output=True, text=True)
    assert result.returncode == 2 and "unknown key 'modle.x'" in result.stderr and "valid keys:" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_zero_stages_train_with_falling_loss(shards, tmp_path, stage):
    run = tmp_path / f"zero{stage}"
    validation = ["val_every=6", "val_batches=1"] if stage == 2 else []
    result = launch(2, run, shards, f"zero_stage={stage}", "steps=12", "save_every=6", *validation)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    curve = losses(run)
    assert len(curve) == 12 and np.mean(curve[-3:]) < np.mean(curve[:3])
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_0000012"
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    if stage == 2:
        # A validation loss on the held-out episodes every 6 steps; the best checkpoint is the step with the lowest,
        # and never the one a resume continues from.
        val = [json.loads(line) for line in (run / "validation.jsonl").read_text().splitlines()]
        assert [v["step"] for v in val] == [6, 12] and all(np.isfinite(v["loss"]) for v in val)
        best = json.loads((run / "checkpoints" / "best" / "checkpoint.json").read_text())
        assert best["step"] == min(val, key=lambda v: v["loss"])["step"]
        assert best["val_loss"] == min(v["loss"] for v in val)
    if stage == 3:
        # Built inside deepspeed.zero.Init: rank 0 never held more than its half of the weights.
        built = re.search(r"model built partitioned \(deepspeed.zero.Init\): ([\d,]+) of its ([\d,]+) parameters",
                          result.stdout + result.stderr)
        assert built, result.stdout[-3000:]
        local, total = (int(g.replace(",", "")) for g in built.groups())
        assert local < 0.6 * total  # half, up to the padding of odd-sized tensors
        # Export from ZeRO-3 shards: one consolidated safetensors file, loadable without DeepSpeed.
        from transformers import AutoModelForCausalLM

        from unified.export import export, load_training_checkpoint
        from unified.policy import Policy

        export(checkpoint=run, out=tmp_path / "export")
        model, _ = load_training_checkpoint(run)
        hf = AutoModelForCausalLM.from_pretrained(tmp_path / "export").eval()
        ids = torch.randint(0, model.layout.vocab_size, (1, 20))
        with torch.no_grad():
            torch.testing.assert_close(hf(input_ids=ids).logits, model.logits(ids)[0], atol=0, rtol=0)
        assert Policy.from_pretrained(tmp_path / "export").config.horizon == 4


@pytest.mark.slow
def test_sigkill_then_resume_matches_the_uninterrupted_run(shards, whole_run, tmp_path):
    steps, whole = STEPS, whole_run
    killed = tmp_path / "killed"
    process = launch(2, killed, shards, *steps, wait=False)
    latest = killed / "checkpoints" / "latest"
    deadline = time.time() + 300
    while time.time() < deadline and not (latest.is_file() and latest.read_text().strip() >= "step_0000004"):
        assert process.poll() is None, process.stdout.read()[-3000:]
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    saved = int(latest.read_text().strip().split("_")[1])
    assert saved < 10, "the run finished before it could be killed"
    result = launch(2, killed, shards, *steps, resume=True)
    assert result.returncode == 0, result.stdout[-3000:]
    np.testing.assert_allclose(losses(killed), losses(whole), rtol=1e-5)  # at most the unsaved steps were lost
    # Resume on one rank from the two-rank checkpoint, through DeepSpeed's universal checkpoint: with gradient
    # accumulation 2 the one rank sees the two ranks' batches, and with the optimizer's moments restored the
    # optimisation continues as if nothing had changed (fresh moments would make the next steps' losses jump).
    one = tmp_path / "one"
    shutil.copytree(whole, one)
    for late in ("step_0000008", "step_0000010"):
        shutil.rmtree(one / "checkpoints" / late)
    (one / "checkpoints" / "latest").write_text("step_0000006\n")
    result = launch(1, one, shards, *steps, "optim.grad_accum=2", resume=True)
    assert result.returncode == 0, result.stdout[-3000:]
    assert "from a 2-rank checkpoint: weights, optimizer moments and schedule restored" in result.stdout
    assert (one / "checkpoints" / "universal" / "step_0000006" / "zero").is_dir()
    assert len(losses(one)) == 10
    np.testing.assert_allclose(losses(one), losses(whole), rtol=1e-5)


@pytest.mark.slow
def test_moving_average_of_the_weights(shards, whole_run, tmp_path):
    """ema_decay: checkpoints hold the average (timm's warm-up schedule, updated once per optimizer step) in
    model.safetensors and the trained weights in training.safetensors; training itself is unchanged, and a resumed
    run continues the average exactly. This run also builds its batches in DataLoader workers (data.workers=2):
    the same batches, so the same losses and weights as the plain run."""
    from safetensors.torch import load_file
    from timm.utils import ModelEmaV3

    run = tmp_path / "ema"
    result = launch(2, run, shards, "steps=10", "save_every=1", "sample_every=0", "ema_decay=0.9", "data.workers=2")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    np.testing.assert_allclose(losses(run), losses(whole_run), rtol=1e-6)
    step = lambda root, s: root / "checkpoints" / f"step_{s:07d}"  # noqa: E731
    trained = [load_file(step(run, s) / "training.safetensors") for s in range(1, 11)]
    for key, value in load_file(step(whole_run, 10) / "model.safetensors").items():
        torch.testing.assert_close(trained[-1][key], value, rtol=1e-5, atol=1e-6)
    # The average by hand, from every step's trained weights, with timm's decay schedule.
    schedule = ModelEmaV3(torch.nn.Linear(1, 1), decay=0.9, use_warmup=True)
    average = {k: v.clone() for k, v in trained[0].items()}
    for s, weights in enumerate(trained[1:], start=2):
        d = schedule.get_decay(s)
        average = {k: d * average[k] + (1 - d) * weights[k] for k in average}
    saved = load_file(step(run, 10) / "model.safetensors")
    key = "backbone.model.layers.0.self_attn.q_proj.weight"
    assert not torch.allclose(saved[key], trained[-1][key])
    for key in average:
        torch.testing.assert_close(saved[key], average[key], rtol=1e-5, atol=1e-6)
    # Resume from step 6: the average continues as if never interrupted.
    resumed = tmp_path / "resumed"
    shutil.copytree(run, resumed)
    for s in range(7, 11):
        shutil.rmtree(step(resumed, s))
    (resumed / "checkpoints" / "latest").write_text("step_0000006\n")
    result = launch(2, resumed, shards, "steps=10", "save_every=1", "sample_every=0", "ema_decay=0.9", resume=True)
    assert result.returncode == 0, result.stdout[-3000:]
    again = load_file(step(resumed, 10) / "model.safetensors")
    for key in saved:
        torch.testing.assert_close(again[key], saved[key], rtol=1e-5, atol=1e-6)
    # A checkpoint saved without an average cannot silently start one from its trained weights.
    plain = tmp_path / "plain"
    shutil.copytree(whole_run, plain)
    # Refused by `unified train` before any rank starts (the ranks check the same for a bare `deepspeed` launch).
    result = subprocess.run([str(BIN / "unified"), "train", "--recipe", str(DEBUG), "--ranks", "2", f"run_dir={plain}",
                             f"data={shards}", "model.horizon=4", "data.seq_len=256", "steps=12", "save_every=2",
                             "sample_every=0", "ema_decay=0.9", "--resume"],
                            capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 2 and "saved without a moving average" in result.stderr, result.stderr
    assert "--num_accelerators" not in result.stdout  # no launcher command printed: no rank started


@pytest.mark.slow
def test_damaged_checkpoint_is_detected(shards, whole_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(whole_run, run)
    (run / "checkpoints" / "latest").write_text("step_0000002\n")
    weights = run / "checkpoints" / "step_0000002" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    result = launch(2, run, shards, "steps=4", resume=True)
    assert result.returncode != 0 and "model.safetensors: damaged" in result.stdout + result.stderr


@pytest.mark.slow
def test_non_finite_loss_stops_and_names_the_step(shards, tmp_path):
    # A z-loss weight beyond float32's range makes the very first loss infinite.
    result = launch(2, tmp_path / "nan", shards, "model.z_loss=1e39", "steps=3")
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "non-finite loss at step 0" in output and "samples ['episode" in output
    result = launch(2, tmp_path / "skip", shards, "model.z_loss=1e39", "steps=5", "on_nan=skip", "max_skipped=2")
    output = result.stdout + result.stderr
    assert result.returncode != 0 and "skipping step 0" in output and "2 steps skipped" in output
    logged = tmp_path / "skip" / "losses.jsonl"  # a skipped step is not a loss of 0
    assert not logged.is_file() or not logged.read_text().strip()
    with pytest.raises(UnifiedError, match="on_nan: skip needs optim.grad_accum 1"):
        load_recipe(DEBUG, ["on_nan=skip", "optim.grad_accum=2"], gpu=False)


@pytest.mark.slow
def test_an_error_on_rank_zero_ends_every_rank_with_it(model_data, tmp_path):
    """Ranks started without the DeepSpeed launcher (which would kill the others when one fails, but only on its
    own machine): rank 0 fails while preparing the data, and rank 1 ends too, naming rank 0's error."""
    store = model_data / "store"
    assert (store / "meta" / "info.json").is_file()
    env = os.environ | {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29611", "WORLD_SIZE": "2"}
    command = [sys.executable, "-m", "unified.train", "--recipe", str(DEBUG), f"run_dir={tmp_path / 'run'}",
               f"data={store}"]
    ranks = [subprocess.Popen(command, env=env | {"RANK": str(r), "LOCAL_RANK": str(r)}, cwd=ROOT, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for r in (0, 1)]
    outputs = [p.communicate(timeout=300)[0] for p in ranks]
    assert [p.returncode for p in ranks] == [2, 2], outputs
    assert "error: data=" in outputs[0] and "give tokenizer=TOKDIR" in outputs[0]
    assert "error: rank 0 failed while preparing the run's data: data=" in outputs[1]
    assert "Traceback" not in outputs[1]


@pytest.mark.slow
def test_finetune_and_distill_recipes_run(shards, model_data, tmp_path):
    from unified.tokenizers.fit import Tokenizers

    from unified.model import ModelConfig, UnifiedModel
    from unified.model_dir import save_model

    # The teacher: a tiny model saved as an export (what it learned does not matter here, where it starts does).
    torch.manual_seed(0)
    teacher = UnifiedModel(ModelConfig(hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128,
                                       max_position_embeddings=256, horizon=4), shards_layout(model_data))
    save_model(teacher, Tokenizers.from_pretrained(model_data / "tok"), tmp_path / "teacher_export")
    tiny = ["model.hidden_size=64", "model.num_layers=2", "model.num_heads=4", "model.intermediate_size=128",
            "model.max_position_embeddings=256", "model.horizon=4", "data.seq_len=256", "data.batch_size=2",
            "steps=3", "save_every=3", "sample_every=0"]
    for recipe, extra in (("finetune.yaml", [f"init_from={tmp_path / 'teacher_export'}", "lora.enabled=true"]),
                          ("distill_action_only.yaml", [f"distill.teacher={tmp_path / 'teacher_export'}"])):
        run = tmp_path / recipe.split(".")[0]
        result = subprocess.run(
            [str(BIN / "unified"), "train", "--recipe", str(ROOT / "recipes" / recipe), "--ranks", "2",
             f"run_dir={run}", f"data={shards}", *tiny, *extra], capture_output=True, text=True, timeout=600, cwd=ROOT)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        assert len(losses(run)) == 3 and all(np.isfinite(losses(run)))
        if recipe == "finetune.yaml":
            assert "LoRA r=8" in result.stdout + result.stderr
    from unified.train import initial_weights  # fine-tuning really started from the teacher's weights

    config = load_recipe(ROOT / "recipes" / "finetune.yaml", [f"init_from={tmp_path / 'teacher_export'}"], gpu=False)
    from unified.export import load_training_checkpoint

    start = initial_weights(config, teacher.layout)
    torch.testing.assert_close(start["backbone.model.embed_tokens.weight"],
                               teacher.backbone.model.embed_tokens.weight)
    # The fine-tune trained LoRA adapters: its checkpoint is a plain model (merged weights, no adapter keys) in
    # which only the adapted projections moved; the frozen embeddings are still the teacher's.
    tuned, _ = load_training_checkpoint(tmp_path / "finetune")
    before, after = teacher.state_dict(), tuned.state_dict()
    assert set(after) == set(before)
    adapted = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    for key in before:
        assert (not torch.equal(before[key], after[key])) == any(f".{m}." in key for m in adapted), key



@pytest.mark.slow
def test_bf16_joint_recipe_saves_fp32_master_weights(shards, tmp_path):
    """The GPU section's precision and ZeRO stage, on the CPU: the joint recipe trains in bf16 under ZeRO-3, and
    checkpoints hold the optimizer's fp32 master weights (as DeepSpeed's own zero_to_fp32 rebuilds them), not
    16-bit copies."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from safetensors.torch import load_file

    run = tmp_path / "bf16"
    tiny = ["model.hidden_size=64", "model.num_layers=2", "model.num_heads=4", "model.intermediate_size=128",
            "model.max_position_embeddings=256", "model.horizon=4", "data.seq_len=256", "data.batch_size=2",
            "steps=3", "save_every=3", "sample_every=0", "val_every=0", "precision=bf16", "zero_stage=3"]
    result = subprocess.run(
        [str(BIN / "unified"), "train", "--recipe", str(ROOT / "recipes" / "joint.yaml"), "--ranks", "2",
         f"run_dir={run}", f"data={shards}", *tiny], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    # A run that ends by itself removes the ranks' shared all-reduce buffers (a killed one: tests/test_reliability.py),
    # named after the port the launcher was given (its command line is printed first).
    launched = next(line for line in result.stdout.splitlines() if line.startswith("$ ")).split()
    assert "--master_port" in launched and shared_buffers(launched) == []
    assert len(losses(run)) == 3 and all(np.isfinite(losses(run)))
    saved = load_file(run / "checkpoints" / "step_0000003" / "model.safetensors")
    masters = get_fp32_state_dict_from_zero_checkpoint(str(run / "checkpoints"), tag="step_0000003")
    assert {v.dtype for v in saved.values()} == {torch.float32}
    for key, value in masters.items():
        torch.testing.assert_close(saved[key], value.float(), rtol=0, atol=0)
    weight = saved["backbone.model.layers.0.mlp.up_proj.weight"]
    assert not torch.equal(weight, weight.bfloat16().float())  # finer than bf16: the masters, not the copies
    # The recipe's continuous head was built partitioned too (its decoder blocks one by one) and trained with it.
    head = [k for k in saved if k.startswith("action_head.blocks.layers.1.")]
    assert head and set(head) <= set(masters) and "action_head.state_mean" in saved


def shards_layout(model_data):
    from unified.tokenizers.fit import Tokenizers

    return Tokenizers.from_pretrained(model_data / "tok").layout


def test_merged_lora_weights_give_the_adapted_models_logits(model_data):
    """Checkpoints of a LoRA run hold merged weights (W + alpha/r * B @ A): exact, and a plain model's keys."""
    from unified.tokenizers.fit import Tokenizers

    from unified.checkpoint import merge_lora
    from unified.config import from_dict
    from unified.model import ModelConfig, UnifiedModel
    from unified.train import add_lora
    from unified.train_config import LoraConfig

    layout = Tokenizers.from_pretrained(model_data / "tok").layout
    config = ModelConfig(hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128, max_position_embeddings=64)
    torch.manual_seed(0)
    adapted, plain = UnifiedModel(config, layout), UnifiedModel(config, layout)
    plain.load_state_dict(adapted.state_dict())
    note = add_lora(adapted, from_dict(LoraConfig, {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}, "t"))
    assert "r=4" in note and "trainable" in note
    trainable = {n for n, p in adapted.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n and ("q_proj" in n or "v_proj" in n) for n in trainable)
    for name, parameter in adapted.named_parameters():
        if ".lora_B." in name:
            parameter.data.normal_(0, 0.05)  # peft starts B at zero: make the adapters do something
    merged = merge_lora(adapted.state_dict(), 8 / 4)
    assert set(merged) == set(plain.state_dict())
    plain.load_state_dict(merged)
    ids = torch.randint(0, layout.vocab_size, (1, 12))
    adapted.eval(), plain.eval()
    with torch.no_grad():
        a, b = adapted.backbone(input_ids=ids).logits, plain.backbone(input_ids=ids).logits
        assert not torch.allclose(a, UnifiedModel(config, layout).backbone(input_ids=ids).logits)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    with pytest.raises(UnifiedError, match="lora.target_modules"):
        add_lora(UnifiedModel(config, layout), from_dict(LoraConfig, {"target_modules": ["nothing_here"]}, "t"))
