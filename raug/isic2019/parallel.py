"""Order-preserving map over worker processes, with a progress bar.

On Linux workers are forked: ``spawn`` re-runs the caller's main script in each
worker, which breaks any script or notebook without an ``if __name__ ==
"__main__"`` guard. The worker functions only use numpy and PIL, so the usual
hazard of forking a threaded parent (torch, BLAS pools) does not reach them.
Elsewhere (macOS, Windows) ``spawn`` is used. Results come back in input
order, so whatever the main process writes does not depend on the number of
workers.
"""

from __future__ import annotations

import multiprocessing
import sys
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from typing import TypeVar

from tqdm import tqdm

T = TypeVar("T")
R = TypeVar("R")


def ordered_map(
    fn: Callable[[T], R],
    items: Sequence[T],
    workers: int,
    desc: str,
    progress: bool = True,
) -> Iterator[R]:
    """Yield ``fn(item)`` for each item, in order, using up to ``workers`` processes.

    Args:
        fn: a picklable module-level function.
        items: the inputs.
        workers: process count; 1 (or a handful of items) runs in this process.
        desc: progress-bar label.
        progress: show a tqdm progress bar on stderr.
    """
    bar = tqdm(total=len(items), desc=desc, unit="img", disable=not progress, leave=False)
    try:
        if workers <= 1 or len(items) < 4 * workers:
            for item in items:
                yield fn(item)
                bar.update()
            return
        chunk = max(1, min(32, len(items) // (8 * workers)))
        ctx = multiprocessing.get_context("fork" if sys.platform.startswith("linux") else "spawn")
        pool = ProcessPoolExecutor(max_workers=workers, mp_context=ctx)
        try:
            for result in pool.map(fn, items, chunksize=chunk):
                yield result
                bar.update()
        finally:
            # On an error in the consumer, drop queued work instead of finishing it.
            pool.shutdown(wait=True, cancel_futures=True)
    finally:
        bar.close()


def default_workers() -> int:
    """``min(4, cpu count)``: image work is I/O- and decode-bound, more rarely helps."""
    return max(1, min(4, multiprocessing.cpu_count()))
