"""The two model threads that run the actor's and the critic's work side by side
(``hardware.parallel_models``), and the event that stops one side when the other fails."""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from typing import TypeVar

import torch

FirstResult = TypeVar("FirstResult")
SecondResult = TypeVar("SecondResult")


def model_threads(num_threads: int | None) -> ThreadPoolExecutor:
    """Two worker threads, each running its torch ops on half of ``num_threads`` intra-op threads
    (at least one): two models side by side on a CPU's cores."""
    per_thread = max(1, (num_threads or torch.get_num_threads()) // 2)
    return ThreadPoolExecutor(
        2, thread_name_prefix="rlhf-model", initializer=torch.set_num_threads, initargs=(per_thread,)
    )


class ModelThreads:
    """``run(first, second)``: both at once on two worker threads when ``parallel``, else one after
    the other on the calling thread. ``cancelled`` is set when one of two parallel calls fails: a
    loop on the other side checks it to stop early."""

    def __init__(self, *, parallel: bool, num_threads: int | None):
        self.pool = model_threads(num_threads) if parallel else None
        self.cancelled = threading.Event()

    @property
    def parallel(self) -> bool:
        return self.pool is not None

    def run(
        self, first: Callable[[], FirstResult], second: Callable[[], SecondResult]
    ) -> tuple[FirstResult, SecondResult]:
        """``(first(), second())``. Grad mode and autocast are per thread: each callable sets its own."""
        if self.pool is None:
            return first(), second()
        futures = self.pool.submit(first), self.pool.submit(second)
        try:
            _, pending = wait(futures, return_when=FIRST_EXCEPTION)
            if pending:  # one failed: tell the other to stop at its next mini-batch
                self.cancelled.set()
        except BaseException:  # a stop signal's exception in this thread
            self.cancelled.set()
            raise
        finally:
            wait(futures)
        return futures[0].result(), futures[1].result()
