"""Prompt sets of a run: read by nothing but ``load_prompts`` (config group ``data``)."""

from __future__ import annotations

import random

from rlhf.tasks import arithmetic


def load_prompts(task: str, max_operand: int, num_eval: int, seed: int) -> tuple[list[str], list[str]]:
    """(train prompts, held-out prompts) of the built-in task."""
    if task != "arithmetic":
        raise ValueError(f"data.task={task!r}: the built-in task is 'arithmetic'")
    return arithmetic.split_prompts(max_operand, num_eval, seed)


class PromptSampler:
    """Endless shuffled passes over the training prompts, one batch at a time."""

    def __init__(self, prompts: list[str], batch_size: int, seed: int):
        self.prompts = list(prompts)
        self.batch_size = batch_size
        self.rng = random.Random(seed)
        self.order: list[int] = []

    def next_batch(self) -> list[str]:
        """The next ``batch_size`` prompts; a new shuffle starts when a pass runs out."""
        batch = []
        while len(batch) < self.batch_size:
            if not self.order:
                self.order = list(range(len(self.prompts)))
                self.rng.shuffle(self.order)
            batch.append(self.prompts[self.order.pop()])
        return batch
