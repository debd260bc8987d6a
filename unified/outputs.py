"""Where commands write: one rule for every output path, so that no typo in `--out` can destroy a user's data.

- A command never writes into, over or around one of its own inputs.
- A directory output is written under a temporary name beside its destination and renamed when complete; it
  replaces an existing directory only if that directory is of its own kind (it carries the kind's marker file and
  nothing the kind does not write) and the user asked for it (`--overwrite`). A directory holding anything else
  (a user's `thesis.txt`, an episode store where tokenizers were expected) is never touched.
- Resumable outputs (an episode store, a training run, a study) are continued only if they are of their own kind.
- A file output (a JSON report, a PNG plot) is written to a temporary file and renamed; it replaces an existing
  file only if that file is of its own kind (a report of the same command, a PNG), and is checked for
  writability before the work starts, so a finished evaluation is never lost to a bad path.
- Temporary leftovers of an interrupted command are removed by the next one; an interrupted replacement is
  rolled back, so the last complete output stays.
"""

from __future__ import annotations

import errno
import fnmatch
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from unified.errors import UnifiedError

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@dataclass(frozen=True)
class Kind:
    name: str  # in the user's words, e.g. "tokenizer directory"
    marker: str  # relative path of the file that identifies a directory of this kind
    format: str | None  # the marker's "format" field (JSON), or None when its existence is enough
    entries: tuple[str, ...]  # glob patterns of the top-level names a directory of this kind holds


KINDS = {
    "episodes": Kind("episode store", "meta/info.json", "unified-episodes", ("meta", "episodes")),
    "operators": Kind("operator data set", "meta/info.json", "unified-operators", ("meta", "hops_*.jsonl")),
    "tokenizers": Kind("tokenizer directory", "fit.json", "unified-tokenizers",
                       ("image", "text", "action", "action_fast", "state", "layout.json", "fit.json", "logs")),
    "shards": Kind("token shard directory", "meta.json", "unified-token-shards", ("*.npy", "meta.json", "layout.json")),
    "run": Kind("training run", "config.yaml", None,
                ("config.yaml", "checkpoints", "tokenizers", "losses.jsonl", "validation.jsonl", "tensorboard",
                 "shards", "loss.png")),
    "model": Kind("exported model", "unified.json", "unified-model",
                  ("config.json", "generation_config.json", "model.safetensors", "action_head.safetensors",
                   "unified.json", "layout.json", "tokenizers", "stats.json", "manifest.json", "cache")),
    "state_mlp": Kind("state-MLP directory", "state_mlp.json", "unified-state-mlp",
                      ("state_mlp.json", "model.safetensors")),
    "ablation": Kind("ablation directory", "ablation_dir.json", "unified-ablation",
                     ("ablation_dir.json", "ablation.json", "ablation.md", "rows")),
    "study": Kind("study directory", "study.json", "unified-study",
                  ("study.json", "runs", "models", "eval", "student_action_only", "report.md", "report.json",
                   "success.png", "latency.png", "videos")),
    "lerobot": Kind("LeRobot dataset exported by unified", "meta/unified_export.json", "unified-lerobot-export",
                    ("meta", "data", "videos")),
}
HIDDEN_OK = (".*.tmp*", ".*.partial*", ".lock", ".ranks.lock")  # our own locks and temporary files


def _within(a: Path, b: Path) -> bool:
    return a == b or b in a.parents


def check_not_input(out: Path, inputs, what: str = "--out") -> None:
    """Refuse an output that is one of the inputs, holds one, or lies inside one."""
    target = Path(out).resolve()
    for source in inputs:
        if source is None:
            continue
        source = Path(source).resolve()
        if _within(target, source) or _within(source, target):
            relation = "is" if target == source else ("lies inside" if _within(target, source) else "holds")
            raise UnifiedError(f"{what} {out} {relation} the input {source}: writing there would change or destroy "
                               "it; choose another path (nothing was changed)")


def kind_of(directory: Path) -> str | None:
    """The kind of an existing directory, read from its marker, or None."""
    for key, kind in KINDS.items():
        marker = directory / kind.marker
        if not marker.is_file():
            continue
        if kind.format is None:
            return key
        try:
            if json.loads(marker.read_text()).get("format") == kind.format:
                return key
        except (ValueError, UnicodeDecodeError, AttributeError):
            continue
    return None


def foreign_entries(directory: Path, kind: str) -> list[str]:
    """Top-level names in `directory` that a directory of `kind` does not write."""
    patterns = KINDS[kind].entries + HIDDEN_OK
    return sorted(p.name for p in directory.iterdir() if not any(fnmatch.fnmatch(p.name, g) for g in patterns))


def check_dir(out: Path, kind: str, inputs=(), what: str = "--out") -> str:
    """Check a directory output before any work: 'new' (missing or empty) or 'same' (a directory of its own kind,
    nothing else in it). Anything else is an error that says what is there and changes nothing."""
    out = Path(out)
    check_not_input(out, inputs, what)
    name = KINDS[kind].name
    if not out.exists():
        return "new"
    if not out.is_dir():
        raise UnifiedError(f"{what} {out}: exists and is a file, not {article(name)}; choose another path")
    if all(any(fnmatch.fnmatch(p.name, g) for g in HIDDEN_OK) for p in out.iterdir()):
        return "new"  # empty, or only our own locks and temporary files
    found = kind_of(out)
    if found is not None and found != kind:
        raise UnifiedError(f"{what} {out}: is {article(KINDS[found].name)}, not {article(name)}; choose another path "
                           "(nothing was changed)")
    extra = foreign_entries(out, kind)
    if found is None or extra:
        listed = ", ".join(extra[:3]) + (f" and {len(extra) - 3} more" if len(extra) > 3 else "")
        raise UnifiedError(f"{what} {out}: holds {listed}, which {article(name)} does not; choose another path or "
                           "move them (nothing was changed)")
    return "same"


def article(name: str) -> str:
    return f"{'an' if name[0] in 'aeiou' else 'a'} {name}"


def begin_dir(out: Path, kind: str, inputs=(), overwrite: bool = False, what: str = "--out") -> Path:
    """Check `out` (see `check_dir`; an existing one of its kind needs `overwrite`) and return a fresh staging
    directory beside it to write into; `commit_dir` puts it in place."""
    out = Path(out)
    recover(out)
    state = check_dir(out, kind, inputs, what)
    if state == "same" and not overwrite:
        raise UnifiedError(f"{what} {out}: already holds {article(KINDS[kind].name)}; pass --overwrite to replace "
                           "it, or choose another path")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.with_name(f".{out.name}.partial-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    return staging


def commit_dir(staging: Path, out: Path) -> Path:
    """Put a complete staging directory in place of `out`; an old `out` is moved aside first and removed last,
    so an interruption leaves either the old or the new one (see `recover`)."""
    out = Path(out)
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    if out.exists():
        os.replace(out, old)
    os.replace(staging, out)
    shutil.rmtree(old, ignore_errors=True)
    return out


def abandon_dir(staging: Path) -> None:
    shutil.rmtree(staging, ignore_errors=True)


def recover(out: Path) -> None:
    """Undo what an interrupted command left beside `out`: staging directories go; an old output moved aside
    whose replacement never arrived comes back."""
    out = Path(out)
    if not out.parent.is_dir():
        return
    for leftover in out.parent.glob(f".{out.name}.partial-*"):
        shutil.rmtree(leftover, ignore_errors=True)
    for old in sorted(out.parent.glob(f".{out.name}.old-*")):
        if not out.exists():
            os.replace(old, out)
        else:
            shutil.rmtree(old, ignore_errors=True)


# -- files -------------------------------------------------------------------------------------------------

def check_file(path: Path, report: str | None, inputs=(), what: str = "--json") -> None:
    """Check a file output before any work: not an input, not a directory, an existing file only if it is of the
    same kind (a JSON report with the same "report" field, a PNG when `report` is None, a GIF for "gif"), and its
    directory writable (a temporary file is made and removed)."""
    path = Path(path)
    check_not_input(path, inputs, what)
    if path.is_dir():
        raise UnifiedError(f"{what} {path}: is a directory; give a file path")
    if path.exists() and not _same_file_kind(path, report):
        kind = "a GIF" if report == "gif" else f"a `{report}` report" if report else "a PNG image"
        raise UnifiedError(f"{what} {path}: exists and is not {kind} written by unified; choose another path "
                           "(nothing was changed)")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        probe = path.with_name(f".{path.name}.tmp{os.getpid()}")
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise UnifiedError(f"{what} {path}: cannot be written ({e.strerror}); choose another path before the work "
                           "starts") from None


def _same_file_kind(path: Path, report: str | None) -> bool:
    try:
        if report in (None, "gif"):  # an image: known by its signature
            with open(path, "rb") as f:
                head = f.read(8)
            return head == PNG_SIGNATURE if report is None else head[:6] in (b"GIF87a", b"GIF89a")
        data = json.loads(path.read_text())
        return isinstance(data, dict) and data.get("report") == report
    except (OSError, ValueError, UnicodeDecodeError):
        return False


def write_text_atomic(path: Path, text: str) -> Path:
    """Write a whole file or nothing: a temporary file renamed into place (its leftovers removed on failure)."""
    return write_bytes_atomic(path, text.encode())


def write_bytes_atomic(path: Path, data: bytes) -> Path:
    path = Path(path)
    temporary = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary.write_bytes(data)
        os.replace(temporary, path)
    except OSError as e:
        temporary.unlink(missing_ok=True)
        raise disk_error(e, path) from None
    return path


def write_report(path: Path, report: dict, kind: str) -> Path:
    """A JSON report of command `kind` (recorded in its "report" field, which lets a rerun replace it)."""
    return write_text_atomic(path, json.dumps({"report": kind, **report}, indent=2) + "\n")


def disk_error(e: OSError, path: Path | str | None = None) -> UnifiedError:
    """An OSError while writing, as a user's error naming the file and the cause."""
    where = path or e.filename or "?"
    hint = {errno.ENOSPC: "the disk is full; free space and rerun (finished work is kept)",
            errno.EDQUOT: "the disk quota is exceeded; free space and rerun (finished work is kept)",
            errno.EACCES: "permission denied; choose a path you can write",
            errno.EROFS: "the file system is read-only; choose another path"}.get(e.errno, e.strerror or str(e))
    return UnifiedError(f"{where}: {hint}")


class staged_dir:
    """`with staged_dir(out, kind, inputs, overwrite) as staging:` write into `staging`; on success it replaces
    `out` (see `begin_dir`, `commit_dir`), on any error or Ctrl-C it is removed and `out` is left as it was."""

    def __init__(self, out: Path, kind: str, inputs=(), overwrite: bool = False, what: str = "--out"):
        self.out = Path(out)
        self.staging = begin_dir(self.out, kind, inputs, overwrite, what)

    def __enter__(self) -> Path:
        return self.staging

    def __exit__(self, kind, error, traceback) -> bool:
        if kind is not None:
            abandon_dir(self.staging)
            if isinstance(error, OSError):
                raise disk_error(error) from None
            return False
        commit_dir(self.staging, self.out)
        return False
