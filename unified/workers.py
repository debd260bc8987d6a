"""Worker pools whose workers leave Ctrl-C to the parent."""

from __future__ import annotations

import multiprocessing as mp
import signal


def spawn_pool(workers: int, initializer=None, initargs: tuple = ()):
    """A `spawn` pool (fork would copy pygame and torch state into the workers) whose workers start with SIGINT
    ignored: Python keeps an inherited SIG_IGN, so a Ctrl-C that reaches the process group while a worker is
    still importing cannot print that worker's traceback. The parent handles Ctrl-C and stops the pool."""
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        return mp.get_context("spawn").Pool(workers, initializer=initializer, initargs=initargs)
    finally:
        signal.signal(signal.SIGINT, previous)
