"""Nothing lost, whatever the user types: output paths, run directories, signals, exports and inputs.

Each numbered defect of the reliability issue has a test here that fails on the code before it was fixed, and
one property test runs every verb that takes an output path against a directory holding a user's file."""

import contextlib
import errno
import inspect
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch

from unified.cli import VERBS, main
from unified.errors import UnifiedError
from unified.launcher import shared_buffers

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
DEBUG = ROOT / "recipes" / "debug.yaml"
TINY = ["model.horizon=4", "data.seq_len=256", "sample_every=0"]


def unified(*args: str) -> int:
    return main([str(a) for a in args])


def snapshot(directory: Path) -> dict:
    """Every file under `directory` and its bytes: what must survive a refused command."""
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(Path(directory).rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def export(model_data, tmp_path_factory) -> Path:
    from unified.tokenizers.fit import Tokenizers

    from unified.model import ModelConfig, UnifiedModel
    from unified.model_dir import save_model

    torch.manual_seed(0)
    tokenizers = Tokenizers.from_pretrained(model_data / "tok")
    model = UnifiedModel(ModelConfig(hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128,
                                     max_position_embeddings=256, horizon=4, max_reason_tokens=6), tokenizers.layout)
    out = tmp_path_factory.mktemp("export") / "model"
    save_model(model, tokenizers, out)
    return out


# -- 1, 2: --out never deletes or overwrites what it did not write ---------------------------------------------

def test_tokenizer_fit_into_its_own_store_is_refused(model_data, capsys):
    before = snapshot(model_data / "store")
    assert unified("tokenizer", "fit", "--data", model_data / "store", "--out", model_data / "store") == 2
    assert "is the input" in capsys.readouterr().err
    assert snapshot(model_data / "store") == before


def test_tokenize_into_the_tokenizer_is_refused(model_data, capsys):
    before = snapshot(model_data / "tok")
    assert unified("data", "tokenize", "--data", model_data / "store", "--tokenizer", model_data / "tok",
                   "--out", model_data / "tok") == 2
    assert "is the input" in capsys.readouterr().err
    assert snapshot(model_data / "tok") == before


def test_operators_into_an_episode_store_is_refused(model_data, capsys):
    before = snapshot(model_data / "store")
    assert unified("data", "operators", "--out", model_data / "store", "--hops", "2-3", "--n", "4") == 2
    assert "is an episode store, not an operator data set" in capsys.readouterr().err
    assert snapshot(model_data / "store") == before
    from unified.data.store import EpisodeStore

    assert len(EpisodeStore(model_data / "store")) == 10  # still a store every command can use


def test_a_replaced_output_needs_overwrite_and_an_interrupted_one_rolls_back(model_data, tmp_path, capsys):
    from unified.outputs import recover

    out = tmp_path / "ops"
    assert unified("data", "operators", "--out", out, "--hops", "2-3", "--n", "4") == 0
    assert unified("data", "operators", "--out", out, "--hops", "2-3", "--n", "4") == 0  # the same: kept
    assert "kept" in capsys.readouterr().out
    assert unified("data", "operators", "--out", out, "--hops", "2-3", "--n", "6") == 2  # another: refused
    assert "--overwrite" in capsys.readouterr().err
    assert unified("data", "operators", "--out", out, "--hops", "2-3", "--n", "6", "--overwrite") == 0
    assert json.loads((out / "meta" / "info.json").read_text())["examples_per_hop"] == 6
    # A replacement killed between its two renames leaves the old output aside: the next command restores it.
    os.replace(out, tmp_path / ".ops.old-123")
    (tmp_path / ".ops.partial-456").mkdir()
    recover(out)
    assert (out / "meta" / "info.json").is_file() and not list(tmp_path.glob(".ops.*"))


# -- the property: every verb with an output path, against a directory holding a user's file -------------------

def output_cases(model_data, export, run):
    """verb -> the arguments that point its output at FOREIGN (a directory holding thesis.txt) or at the user's
    file itself, with valid inputs otherwise."""
    store, tok, shards, ops = model_data / "store", model_data / "tok", model_data / "shards", model_data / "operators"
    suite = model_data / "suite.yaml"
    return {
        "data generate": lambda f, t: ["--suite", suite, "--episodes", 1, "--out", f],
        "data dagger": lambda f, t: ["--model", export, "--out", f, "--episodes", 1],
        "data operators": lambda f, t: ["--out", f, "--n", 4, "--hops", "2-3"],
        "data tokenize": lambda f, t: ["--data", store, "--tokenizer", tok, "--out", f, "--horizon", 4],
        "tokenizer fit": lambda f, t: ["--data", store, "--out", f, "--image-steps", 2],
        "train": lambda f, t: ["--recipe", DEBUG, f"run_dir={f}", f"data={shards}", *TINY],
        "export": lambda f, t: ["--checkpoint", export, "--out", f],
        "eval closed-loop": lambda f, t: ["--model", "constant", "--scenarios", suite, "--episodes", 1, "--json", t],
        "eval world-model": lambda f, t: ["--model", export, "--data", store, "--json", t],
        "eval reasoning": lambda f, t: ["--model", export, "--data", store, "--json", t],
        "eval operators": lambda f, t: ["--model", export, "--data", ops, "--json", t],
        "eval plot-operators": lambda f, t: [f / "operators.json", "--out", t],
        "eval plot-training": lambda f, t: [run, "--out", t],
        "eval distill": lambda f, t: ["--study", ROOT / "recipes" / "study.yaml", "--out", f],
        "eval ablation": lambda f, t: ["--spec", ROOT / "recipes" / "ablation.yaml", "--out", f],
        "bench latency": lambda f, t: ["--models", export, "--data", store, "--json", t],
        "bench train": lambda f, t: ["--recipe", DEBUG, f"data={shards}", *TINY, "--steps", 1, "--json", t],
        "eval state-response": lambda f, t: ["--model", export, "--data", store, "--json", t],
        "baseline fit-state-mlp": lambda f, t: ["--data", store, "--out", f, "--steps", 2],
        "bench serve": lambda f, t: ["--model", export, "--data", store, "--json", t],
        "data export-lerobot": lambda f, t: ["--data", store, "--out", f],
        "data import-lerobot": lambda f, t: [ROOT / "tests" / "fixtures" / "lerobot_v3", "--out", f],
    }


# Parameters that name where a verb writes (`--json` as a switch that prints JSON is not one); `train` takes
# run_dir among its key=value overrides.
OUTPUT_PARAMETERS = {"out", "json", "strip", "video", "video_dir", "overrides"}


def test_every_verb_with_an_output_is_covered():
    """A verb added later with an output path must join the property test below."""
    import importlib
    import typing

    with_output = set()
    for verb, (module, function, _) in VERBS.items():
        fn = getattr(importlib.import_module(module), function)
        hints = typing.get_type_hints(fn)
        names = [n for n in inspect.signature(fn).parameters if n in OUTPUT_PARAMETERS and hints.get(n) is not bool]
        if names and verb not in ("eval compare", "eval compare-runs"):  # their reports are inputs
            with_output.add(verb)
    assert with_output == set(output_cases(Path("m"), Path("e"), Path("r")))


@pytest.mark.slow
def test_no_verb_destroys_a_users_file(model_data, export, tmp_path, capsys):
    run = tmp_path / "a_run"
    (run / "tensorboard").mkdir(parents=True)
    for verb, arguments in output_cases(model_data, export, run).items():
        foreign = tmp_path / verb.replace(" ", "_")
        foreign.mkdir()
        thesis = foreign / "thesis.txt"
        thesis.write_text("four years of work")
        code = unified(*verb.split(), *arguments(foreign, thesis))
        err = capsys.readouterr().err
        assert code == 2, (verb, err)
        assert thesis.read_text() == "four years of work" and sorted(os.listdir(foreign)) == ["thesis.txt"], verb
        assert "thesis.txt" in err and "(nothing was changed)" in err, (verb, err)  # it says what is there


# -- 3, 4: a run has one owner; signals stop every rank; a new run never overwrites an old one ------------------

def start_training(run: Path, shards: Path, *extra: str, resume: bool = False) -> subprocess.Popen:
    command = [str(BIN / "unified"), "train", "--recipe", str(DEBUG), "--ranks", "2", f"run_dir={run}",
               f"data={shards}", *TINY, "steps=100000", "save_every=5", *extra] + (["--resume"] if resume else [])
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)


def wait_for_steps(run: Path, process: subprocess.Popen, steps: int, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    path = run / "losses.jsonl"
    while time.time() < deadline:
        if path.is_file() and len(path.read_text().splitlines()) >= steps:
            return
        assert process.poll() is None, process.stdout.read()[-3000:]
        time.sleep(0.2)
    raise AssertionError("training made no progress")


def training_processes(run: Path) -> list[psutil.Process]:
    found = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if any(f"run_dir={run}" == part for part in p.info["cmdline"] or []):
                found.append(p)
        except psutil.Error:
            continue
    return found


def master_port(run: Path, process: subprocess.Popen | None = None, timeout: float = 120) -> str:
    """The port the DeepSpeed launcher of `run` was given (its command line), waiting for it to start."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        for p in training_processes(run):
            with contextlib.suppress(psutil.Error):
                command = p.cmdline()
                if "--master_port" in command:
                    return command[command.index("--master_port") + 1]
        assert process is None or process.poll() is None, "the run ended before its launcher was seen"
        time.sleep(0.05)
    raise AssertionError("no launcher with --master_port")


def wait_until_gone(run: Path, timeout: float = 60) -> list:
    deadline = time.time() + timeout
    while time.time() < deadline and training_processes(run):
        time.sleep(0.2)
    return training_processes(run)


@pytest.mark.slow
def test_a_killed_trainer_takes_its_ranks_with_it_and_a_run_has_one_owner(model_data, tmp_path):
    shards = model_data / "shards"
    run = tmp_path / "run"
    first = start_training(run, shards)
    wait_for_steps(run, first, 2)
    assert len(training_processes(run)) >= 3  # unified train, the launcher, the ranks
    # A second trainer on the same run is refused, naming the owner; the run goes on undisturbed.
    second = subprocess.run([str(BIN / "unified"), "train", "--recipe", str(DEBUG), "--ranks", "1",
                             f"run_dir={run}", f"data={shards}", *TINY, "--resume"],
                            capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert second.returncode == 2 and f'"pid": {first.pid}' in second.stderr, second.stderr
    # The CPU ranks share memory through DeepSpeed's all-reduce buffers in /dev/shm, named after the port.
    port = master_port(run)
    assert shared_buffers(["--master_port", port]), "the ranks' shared buffers exist while the run trains"
    # SIGTERM on `unified train`: the launcher and both ranks stop, and their buffers are removed.
    first.send_signal(signal.SIGTERM)
    first.wait(timeout=60)
    assert wait_until_gone(run) == []
    assert shared_buffers(["--master_port", port]) == []
    logged = (run / "losses.jsonl").read_text()
    # SIGKILL: nothing can run in the killed process, yet the ranks notice (the guard's parent-death signal).
    third = start_training(run, shards, resume=True)
    wait_for_steps(run, third, len(logged.splitlines()) + 2)
    port = master_port(run)
    third.kill()
    third.wait()
    assert wait_until_gone(run) == []
    assert shared_buffers(["--master_port", port]) == []
    # Starting again without --resume is refused, and the run is left as it was.
    before = snapshot(run / "checkpoints"), (run / "losses.jsonl").read_text()
    again = subprocess.run([str(BIN / "unified"), "train", "--recipe", str(DEBUG), "--ranks", "1",
                            f"run_dir={run}", f"data={shards}", *TINY, "steps=3"],
                           capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert again.returncode == 2 and "--resume continues it, --overwrite deletes it" in again.stderr
    assert (snapshot(run / "checkpoints"), (run / "losses.jsonl").read_text()) == before


def test_resume_without_latest_uses_the_newest_complete_checkpoint(tmp_path):
    from unified import checkpoint
    from unified.launcher import check_run_dir

    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text("name: x\n")
    for step in (2, 4):
        d = run / "checkpoints" / f"step_{step:07d}"
        d.mkdir()
        (d / "checkpoint.json").write_text(json.dumps({"step": step}))
        (d / "manifest.json").write_text(json.dumps({"checkpoint.json": {
            "bytes": (d / "checkpoint.json").stat().st_size, "sha256": checkpoint.sha256_file(d / "checkpoint.json")}}))
    (run / "checkpoints" / "step_0000004" / "checkpoint.json").write_text("{}")  # damaged: skipped
    (run / "validation.jsonl").write_text('{"step": 2, "loss": 3.0}\n')  # a run with val_every writes it
    assert checkpoint.latest(run) == run / "checkpoints" / "step_0000002"
    assert check_run_dir(run, resume=True, overwrite=False) == "resume"
    from unified.train import _keep_rows

    (run / "validation.jsonl").write_text("".join(json.dumps({"step": s, "loss": 3.0}) + "\n" for s in (1, 2, 3)))
    _keep_rows(run / "validation.jsonl", 2)  # resuming from step 2: step 3's row is measured again
    assert [json.loads(line)["step"] for line in (run / "validation.jsonl").read_text().splitlines()] == [1, 2]
    with pytest.raises(UnifiedError, match=r"latest checkpoint is step 2, 0 steps logged\); --resume continues"):
        check_run_dir(run, resume=False, overwrite=False)
    with pytest.raises(UnifiedError, match="pass one of them"):
        check_run_dir(run, resume=True, overwrite=True)


def test_a_missing_hostfile_and_bad_numbers_are_refused(model_data, tmp_path, capsys):
    shards = model_data / "shards"
    assert unified("train", "--recipe", DEBUG, "--hostfile", tmp_path / "hosts", f"run_dir={tmp_path / 'r'}",
                   f"data={shards}") == 2
    assert "no such file (without it the launcher would train on this machine only)" in capsys.readouterr().err
    (tmp_path / "hosts").write_text("node1 slots=8\nnode2 eight\n")
    assert unified("train", "--recipe", DEBUG, "--hostfile", tmp_path / "hosts", f"run_dir={tmp_path / 'r'}",
                   f"data={shards}") == 2
    assert "expected lines `HOST slots=N`" in capsys.readouterr().err
    suite = model_data / "suite.yaml"
    with pytest.raises(SystemExit) as exit_info:
        unified("eval", "closed-loop", "--model", "constant", "--scenarios", suite, "--replan-every", 0)
    assert exit_info.value.code == 2
    assert "argument --replan-every: must be at least 1, got 0" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_a_binary_suite_file_is_named(tmp_path, capsys):
    (tmp_path / "suite.yaml").write_bytes(bytes(range(256)) * 4)
    assert unified("data", "generate", "--suite", tmp_path / "suite.yaml", "--episodes", 1, "--out",
                   tmp_path / "s") == 2
    assert "suite.yaml: not a text file" in capsys.readouterr().err


# -- 5: a damaged export never drives; inputs are checked at the API boundary -----------------------------------

def test_a_damaged_export_is_refused(export, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    from unified.model_dir import load_model
    from unified.policy import Policy

    assert json.loads((export / "manifest.json").read_text())["model.safetensors"]["sha256"]
    nan = tmp_path / "nan"
    shutil.copytree(export, nan)
    weights = load_file(nan / "model.safetensors")
    weights["model.norm.weight"] = torch.full_like(weights["model.norm.weight"], float("nan"))
    save_file(weights, nan / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(UnifiedError, match="model.norm.weight holds NaN"):  # the same size: the values are refused
        Policy.from_pretrained(nan)
    with pytest.raises(UnifiedError, match="size or checksum differs from manifest.json"):
        load_model(nan, verify="full")  # and the full check sees the file changed since export
    flipped = tmp_path / "flipped"
    shutil.copytree(export, flipped)
    data = bytearray((flipped / "model.safetensors").read_bytes())
    data[-10] ^= 0xFF  # same size: only the full check sees it
    (flipped / "model.safetensors").write_bytes(bytes(data))
    Policy.from_pretrained(flipped)
    with pytest.raises(UnifiedError, match="model.safetensors: damaged"):
        load_model(flipped, verify="full")


def test_policy_inputs_are_checked(export, model_data):
    from unified.data.store import EpisodeStore
    from unified.policy import Policy

    policy = Policy.from_pretrained(export)
    episode = EpisodeStore(model_data / "store").read_episode(0)
    frames, state = episode.frames[:1], episode.states[0]
    with pytest.raises(UnifiedError, match="no frames"):
        policy.act(frames[:0], "Drive.", state=state)
    with pytest.raises(UnifiedError, match="beyond the model's 256 positions; shorten the instruction"):
        policy.act(frames, "Drive carefully. " * 600, state=state)
    with pytest.raises(UnifiedError, match=r"state: not finite"):
        policy.act(frames, "Drive.", state=np.where(np.arange(len(state)) == 0, np.nan, state))
    with pytest.raises(UnifiedError,
                       match=r"state: expected 21 values \(speed, heading, lane_offset, route_heading_8m, "
                             r"route_heading_16m, lanes_left, .*\), got 2"):
        policy.act(frames, "Drive.", state=(20.0, 0.0))
    assert policy.act(frames, "Drive.", state=state, reason=False).actions.shape == (4, 2)


# -- 6: a full disk names the file and leaves the last complete output --------------------------------------------

def test_a_full_disk_during_generation_names_the_file(tiny_suite, tmp_path, monkeypatch, capsys):
    import pyarrow.parquet as pq

    out = tmp_path / "store"
    assert unified("data", "generate", "--suite", tiny_suite, "--episodes", 2, "--out", out) == 0
    real = pq.write_table

    def full(table, where, **kwargs):
        real(table, where, **kwargs)  # part of the file reaches the disk, then it is full
        raise OSError(errno.ENOSPC, "No space left on device", str(where))

    monkeypatch.setattr(pq, "write_table", full)
    assert unified("data", "generate", "--suite", tiny_suite, "--episodes", 4, "--out", out) == 2
    err = capsys.readouterr().err
    assert "episode_000002.parquet: the disk is full; free space and rerun" in err
    assert sorted(p.name for p in (out / "episodes").iterdir()) == ["episode_000000.parquet", "episode_000001.parquet"]
    monkeypatch.undo()
    assert unified("data", "generate", "--suite", tiny_suite, "--episodes", 4, "--out", out) == 0  # and it resumes


def test_an_unwritable_report_fails_before_the_evaluation(model_data, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    started = time.perf_counter()
    assert unified("eval", "closed-loop", "--model", "expert", "--scenarios", model_data / "suite.yaml",
                   "--episodes", 20, "--json", tmp_path / "file" / "report.json") == 2
    assert "cannot be written" in capsys.readouterr().err
    assert time.perf_counter() - started < 30  # no episode was driven first


@pytest.mark.slow
def test_a_full_disk_while_saving_a_checkpoint_keeps_the_last_one(model_data, tmp_path):
    """A real DeepSpeed engine on one in-process rank; the consolidated weights' write fails with ENOSPC."""
    script = """
import errno, os, sys, json
from pathlib import Path
import deepspeed, torch
import unified.checkpoint as checkpoint
from unified.errors import UnifiedError
os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT="29631")
deepspeed.init_distributed(dist_backend="gloo")
model = torch.nn.Linear(4, 4)
config = {"train_micro_batch_size_per_gpu": 1, "optimizer": {"type": "AdamW", "params": {"lr": 0.01,
          "torch_adam": True}}, "zero_optimization": {"stage": 0}}
engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
run = Path(sys.argv[1])
checkpoint.save(engine, run, 1, {}, {})
def full(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device", str(run / "checkpoints" / ".tmp_step_0000002"))
checkpoint.save_file = full
try:
    checkpoint.save(engine, run, 2, {}, {})
except UnifiedError as e:
    print("ERROR", e)
"""
    result = subprocess.run([sys.executable, "-c", script, str(tmp_path / "run")], capture_output=True, text=True,
                            timeout=300, cwd=tmp_path)
    assert "ERROR" in result.stdout and "the disk is full" in result.stdout, result.stdout + result.stderr
    checkpoints = tmp_path / "run" / "checkpoints"
    assert (checkpoints / "latest").read_text().strip() == "step_0000001"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["latest", "step_0000001"]  # no temporary leftovers


def test_every_numeric_option_of_every_verb_refuses_a_value_out_of_range(capsys):
    """-1 is below the minimum of every numeric option (counts at least 1, seeds at least 0): each verb refuses it
    with a one-line usage error that names the option, before doing anything."""
    import importlib
    import typing

    checked = 0
    for verb, (module, function, _) in VERBS.items():
        fn = getattr(importlib.import_module(module), function)
        hints = typing.get_type_hints(fn)
        for name, parameter in inspect.signature(fn).parameters.items():
            hint = hints.get(name)
            if typing.get_origin(hint) in (typing.Union, __import__("types").UnionType):
                hint = next(a for a in typing.get_args(hint) if a is not type(None))
            if hint not in (int, float) or parameter.kind is not inspect.Parameter.KEYWORD_ONLY:
                continue
            flag = "--" + name.replace("_", "-")
            with pytest.raises(SystemExit) as exit_info:
                main([*verb.split(), flag, "-1"])
            assert exit_info.value.code == 2
            assert f"argument {flag}: must be" in capsys.readouterr().err, (verb, flag)
            checked += 1
    assert checked >= 30
