"""Worker pools whose workers leave Ctrl-C to the parent."""

from __future__ import annotations

import multiprocessing as mp
import signal
from contextlib import contextmanager


def spawn_pool(workers: int, initializer=None, initargs: tuple = ()):
    """A `spawn` pool (fork would copy pygame and torch state into the workers) whose workers start with SIGINT
    ignored: Python keeps an inherited SIG_IGN, so a Ctrl-C that reaches the process group while a worker is
    still importing cannot print that worker's traceback. The parent handles Ctrl-C and stops the pool."""
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        return mp.get_context("spawn").Pool(workers, initializer=initializer, initargs=initargs)
    finally:
        signal.signal(signal.SIGINT, previous)


@contextmanager
def pool_results(workers: int, initializer, initargs: tuple, func, items, ordered: bool = False):
    """`func` over `items` in a `spawn_pool`, as an iterator of results (in order with `ordered`, else as they
    finish). Leaving the block normally closes the pool and waits for it; an exception or Ctrl-C in the block or a
    worker terminates the workers first, so nothing keeps running behind the error."""
    pool = spawn_pool(workers, initializer, initargs)
    try:
        yield (pool.imap if ordered else pool.imap_unordered)(func, items)
        pool.close()
    except BaseException:
        pool.terminate()
        raise
    finally:
        pool.join()
