"""One process (``hardware.distributed=none``, or any option launched as one process): nothing to
communicate, so every collective is the identity."""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from rlhf.runtime.distributed.base import Distributed, LaunchSettings, quiet_deepspeed_detection


class Single(Distributed):
    """The single process; ``Single()`` when nothing was launched, ``Single(accelerator)`` when a
    launcher started one process (whose device the accelerator then names)."""

    kind = "none"

    def __init__(self, accelerator: Any = None):
        super().__init__(accelerator)
        if self.world_size != 1:
            raise ValueError(f"Single is one process, not {self.world_size}")

    @classmethod
    def launch(cls, settings: LaunchSettings) -> Single:
        quiet_deepspeed_detection()  # nothing here uses DeepSpeed
        return cls()

    def gather(
        self, tensor: torch.Tensor, dim: int = 1, pad_value: float = 0, pad_first: bool = False
    ) -> torch.Tensor:
        return tensor

    def gather_objects(self, items: list) -> list:
        return list(items)

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    def mean(self, values: dict[str, float]) -> dict[str, float]:
        return values

    def all(self, flag: bool) -> bool:
        return bool(flag)

    def max(self, value: float) -> float:
        return value

    def main_first(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def barrier(self) -> None:
        pass
