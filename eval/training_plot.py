"""`unified eval plot-training`: loss curves per task from a run's TensorBoard event files, as a PNG; and the two
matplotlib helpers every plot of `unified.eval` uses."""

from __future__ import annotations

from pathlib import Path

from unified.errors import UnifiedError


def subplots(*args, **kwargs):
    """matplotlib's `subplots` on the file-only Agg backend (no display is needed or used)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(*args, **kwargs)


def save_figure(fig, path: Path) -> Path:
    """Save as PNG, whole or not at all (a temporary file renamed into place)."""
    import os

    import matplotlib.pyplot as plt

    path = Path(path)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp{os.getpid()}.png")
    try:
        fig.savefig(temporary, dpi=110)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
        plt.close(fig)
    return path


def read_scalars(run: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar series of a run's TensorBoard logs: tag -> [(step, value)]."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    directory = Path(run) / "tensorboard"
    if not list(directory.glob("events.out.tfevents.*")):
        raise UnifiedError(f"{run}: no TensorBoard event files in {directory}")
    series: dict[str, dict[int, float]] = {}
    for events in sorted(directory.glob("events.out.tfevents.*")):  # a resumed run adds a file
        accumulator = EventAccumulator(str(events), size_guidance={"scalars": 0})
        accumulator.Reload()
        for tag in accumulator.Tags()["scalars"]:
            for e in accumulator.Scalars(tag):
                series.setdefault(tag, {})[e.step] = e.value
    return {tag: sorted(points.items()) for tag, points in series.items()}


def plot_training(runs: list[Path], *, out: Path) -> Path:
    """Loss per task (and the total) against the step for each run, one panel per run."""
    from unified.outputs import check_file

    check_file(out, None, [r / "tensorboard" for r in map(Path, runs)], what="--out")
    fig, axes = subplots(1, len(runs), figsize=(6 * len(runs), 4), squeeze=False)
    for ax, run in zip(axes[0], runs):
        scalars = read_scalars(run)
        for tag in ["train/loss"] + sorted(t for t in scalars if t.startswith("loss/")):
            if tag in scalars:
                steps, values = zip(*scalars[tag])
                ax.plot(steps, values, label=tag.replace("loss/", "").replace("train/loss", "total (weighted)"),
                        linewidth=2 if tag == "train/loss" else 1)
        ax.set_title(Path(run).name)
        ax.set_xlabel("step")
        ax.set_ylabel("cross-entropy (nats/token)")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    save_figure(fig, out)
    print(f"wrote {out}")
    return Path(out)
