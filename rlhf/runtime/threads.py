"""The two-thread executor that runs the actor's and the critic's work side by side."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import torch


def model_threads(num_threads: int | None) -> ThreadPoolExecutor:
    """Two worker threads, each running its torch ops on half of ``num_threads`` intra-op threads
    (at least one): two models side by side on a CPU's cores."""
    per_thread = max(1, (num_threads or torch.get_num_threads()) // 2)
    return ThreadPoolExecutor(
        2, thread_name_prefix="rlhf-model", initializer=torch.set_num_threads, initargs=(per_thread,)
    )
