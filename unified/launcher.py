"""`unified train`: the DeepSpeed launcher, started on a run directory that it owns and stopped with it.

- A run directory has one owner: `unified train` holds RUN/.lock (pid and host inside) for as long as it runs, and
  rank 0 holds RUN/.ranks.lock while it trains; a second trainer on the same run is refused, naming the owner.
- Starting in a directory that holds a run needs `--resume` (continue it) or `--overwrite` (start again).
- Ctrl-C or SIGTERM on `unified train` reaches the launcher and every rank (they run in their own process group,
  which the command signals and waits for); if `unified train` is killed outright (SIGKILL), a small guard
  process between it and the launcher gets the kernel's parent-death signal and stops the whole group.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from unified.errors import UnifiedError

OWNER_ENV = "UNIFIED_RUN_OWNER"  # set for the ranks by `unified train`: it holds RUN/.lock for them
STOP_GRACE_S = 20.0  # after SIGTERM, how long the launcher and ranks get before SIGKILL
PR_SET_PDEATHSIG = 1


class RunLock:
    """An exclusive lock on a file of the run directory, recording who holds it."""

    def __init__(self, run_dir: Path, name: str = ".lock"):
        self.path = Path(run_dir) / name
        self.handle = None

    def acquire(self, what: str) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(self.path, "a+")  # noqa: SIM115 - held until release()
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            owner = handle.read().strip() or "unknown"
            handle.close()
            raise UnifiedError(f"{self.path.parent}: {what} already ({owner}); one trainer per run directory: wait "
                               "for it, stop it, or choose another run_dir") from None
        handle.seek(0)
        handle.truncate()
        handle.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%F %T")}))
        handle.flush()
        self.handle = handle
        return self

    def release(self) -> None:
        if self.handle is not None:
            self.handle.close()
            self.handle = None


def latest_step(run_dir: Path) -> int | None:
    """The step of the run's newest complete checkpoint, or None."""
    from unified import checkpoint

    found = checkpoint.latest(run_dir)
    return None if found is None else checkpoint.read_info(found)["step"]


def check_run_dir(run_dir: Path, resume: bool, overwrite: bool, inputs=()) -> str:
    """Before any rank starts: 'new' (nothing there), 'resume' or 'overwrite' (a run, and the flag that says what to
    do with it). Anything else is an error that says what is there and what to pass."""
    from unified.outputs import check_dir

    if resume and overwrite:
        raise UnifiedError("--resume continues a run and --overwrite starts it again: pass one of them")
    run_dir = Path(run_dir)
    state = check_dir(run_dir, "run", inputs, what="run_dir")
    if state == "new":
        if resume:
            raise UnifiedError(f"--resume: {run_dir} holds no run to resume; leave out --resume to start one")
        return "new"
    if resume:
        return "resume"
    if overwrite:
        return "overwrite"
    step = latest_step(run_dir)
    losses = run_dir / "losses.jsonl"
    logged = len(losses.read_text().splitlines()) if losses.is_file() else 0
    where = f"its latest checkpoint is step {step}" if step is not None else "no checkpoint yet"
    raise UnifiedError(f"run_dir {run_dir} holds a training run ({where}, {logged} steps logged); --resume continues "
                       "it, --overwrite deletes it and starts again")


def clear_run(run_dir: Path) -> None:
    """Delete a run's own files (`--overwrite`; `check_run_dir` has made sure nothing else is there)."""
    for entry in Path(run_dir).iterdir():
        if entry.name in (".lock", ".ranks.lock"):
            continue
        shutil.rmtree(entry) if entry.is_dir() else entry.unlink()


def check_hostfile(hostfile: Path) -> None:
    """The DeepSpeed hostfile must exist and list `host slots=N` lines: a missing one would silently train on this
    machine alone."""
    path = Path(hostfile)
    if not path.is_file():
        raise UnifiedError(f"--hostfile {path}: no such file (without it the launcher would train on this machine "
                           "only)")
    lines = [line.split("#")[0].strip() for line in path.read_text(errors="replace").splitlines()]
    hosts = [line for line in lines if line]
    bad = [line for line in hosts if not re.fullmatch(r"\S+\s+slots=\d+", line)]
    if not hosts or bad:
        raise UnifiedError(f"--hostfile {path}: expected lines `HOST slots=N`, got {bad[:2] or 'no hosts'}")


def train(overrides: list[str] = (), *, recipe: Path, ranks: int = 1, resume: bool = False, overwrite: bool = False,
          hostfile: Path | None = None) -> int:
    """Train a recipe through the DeepSpeed launcher:
    `deepspeed --num_accelerators RANKS --module unified.train --recipe RECIPE [--resume] key=value ...`.

    `--resume` continues the run in run_dir, `--overwrite` deletes it and starts again; with `--hostfile` the
    launcher starts ranks on every machine listed (RANKS per machine). Ctrl-C stops every rank."""
    if ranks < 1:
        raise UnifiedError(f"--ranks must be at least 1, got {ranks}")
    if not Path(recipe).is_file():
        raise UnifiedError(f"--recipe {recipe}: no such file")
    if hostfile is not None:
        check_hostfile(hostfile)
    from unified.train_config import load_recipe, run_inputs

    config = load_recipe(recipe, list(overrides))  # refuse a bad key here, before starting any rank
    run_dir = Path(config.run_dir)
    if check_run_dir(run_dir, resume, overwrite, run_inputs(config)) == "resume" and config.ema_decay:
        from unified import checkpoint

        found = checkpoint.latest(run_dir)
        if found is not None:  # the ranks check it too; here it costs no start-up
            checkpoint.check_moving_average(found, config.ema_decay)
    lock = RunLock(run_dir).acquire("is being trained")
    try:
        ranks_lock = RunLock(run_dir, ".ranks.lock").acquire("has training ranks of an earlier run still stopping")
        ranks_lock.release()
        command = _command(recipe, ranks, resume, overwrite, hostfile, overrides)
        print("$ " + " ".join(command), flush=True)
        code = _run_owned(command)
    finally:
        lock.release()
    if code:
        raise UnifiedError(f"training stopped with exit status {code} (the lines above say why)")
    return code


def _command(recipe, ranks, resume, overwrite, hostfile, overrides) -> list[str]:
    launcher = Path(sys.executable).parent / "deepspeed"
    command = [str(launcher if launcher.exists() else "deepspeed")]
    if hostfile is not None:
        command += ["--hostfile", str(hostfile)]
    else:
        # A free port, so that several runs (or a test beside a demo) on one machine do not collide.
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            command += ["--master_port", str(probe.getsockname()[1])]
    command += ["--num_accelerators", str(ranks), "--module", "unified.train", "--recipe", str(recipe)]
    return command + (["--resume"] if resume else []) + (["--overwrite"] if overwrite else []) + list(overrides)


def _die_with_parent() -> None:
    """In the guard, before it starts: the kernel sends it SIGTERM when `unified train` dies, however it dies."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def _run_owned(command: list[str]) -> int:
    """Run `command` behind the guard, in a process group of its own, forwarding Ctrl-C and SIGTERM to that group
    and waiting for it to end."""
    env = os.environ | {OWNER_ENV: str(os.getpid())}
    guard = subprocess.Popen([sys.executable, "-m", "unified.launcher", *command], env=env, start_new_session=True,
                             preexec_fn=_die_with_parent)
    stopping = []

    def stop(signum, frame):
        stopping.append(signum)
        _signal_group(guard.pid, signal.SIGTERM)

    previous = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        while True:
            try:
                code = guard.wait(timeout=STOP_GRACE_S if stopping else None)
                break
            except subprocess.TimeoutExpired:
                _signal_group(guard.pid, signal.SIGKILL)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    if stopping:
        raise KeyboardInterrupt if stopping[0] == signal.SIGINT else SystemExit(128 + stopping[0])
    return code


def _signal_group(pgid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signum)


def shared_buffers(command: list[str], root: Path = Path("/dev/shm")) -> list[Path]:
    """The shared-memory all-reduce buffers DeepSpeed's CPU ranks create for the run of `command` (one of about 69 MB
    per rank, named after the master port) and never remove: left behind, every run on a CPU would keep about 140 MB
    of RAM until the machine restarts. None where the command names no port (a hostfile's runs)."""
    if "--master_port" not in command:
        return []
    port = command[command.index("--master_port") + 1]
    return sorted(root.glob(f"deepspeed_allreduce_buffer_*_{port}_*"))


def _remove_shared_buffers(command: list[str]) -> None:
    for path in shared_buffers(command):  # unlinking a buffer a rank still maps frees it when that rank exits
        with contextlib.suppress(OSError):
            path.unlink()


def guard(command: list[str]) -> int:
    """The process between `unified train` and the launcher, leader of the training's process group: it starts the
    launcher, and on SIGTERM (from `unified train`, or from the kernel when `unified train` died) it signals the
    whole group, waits, and kills what is left. However the run ends, it removes the run's shared-memory buffers."""
    child = subprocess.Popen(command)

    def stop(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        _signal_group(os.getpgid(0), signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            child.wait(timeout=STOP_GRACE_S)
        _remove_shared_buffers(command)  # before the SIGKILL below, which reaches this process too
        _signal_group(os.getpgid(0), signal.SIGKILL)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    if os.getppid() == 1:  # `unified train` died before the parent-death signal was armed
        stop(signal.SIGTERM, None)
    code = child.wait()
    _remove_shared_buffers(command)
    return code


if __name__ == "__main__":
    sys.exit(guard(sys.argv[1:]))
