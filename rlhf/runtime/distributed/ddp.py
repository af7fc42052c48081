"""``hardware.distributed=ddp``: the trained models replicated on every rank and wrapped in
DistributedDataParallel, which averages their gradients over the ranks in the backward pass."""

from __future__ import annotations

import torch
from torch import nn

from rlhf.runtime.distributed.base import Distributed


class DDP(Distributed):
    """Replicated models; the rest (clipping, step, state dicts) is the one-process way on each rank."""

    kind = "ddp"

    def wrap(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> nn.Module:
        """``model`` in DistributedDataParallel (the optimizer stays on ``model``'s parameters)."""
        return self.accelerator.prepare_model(model)
