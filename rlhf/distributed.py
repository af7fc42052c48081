"""The processes of a run: rank, world size, and the few collectives the loop needs.

One process (``hardware.distributed=none``) is the same object with nothing to communicate. With
``ddp`` the run is launched by ``torchrun`` or ``accelerate launch``; accelerate's ``Accelerator``
joins the process group (gloo on CPU, NCCL on GPUs) and wraps the trained models in
DistributedDataParallel, so their gradients are averaged over the ranks in the backward pass.

Data parallelism here: each rank samples its own share of the rollout with its own seed and runs its
own forwards; the rollouts are then gathered, so that every rank holds the global batch and computes
the same experience (reward normalisation, KL, GAE, whitening: exactly the one-process math on the
global batch). Each PPO mini-batch is the same global one on every rank, and each rank runs forward
and backward on its share of its rows.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn


class Distributed:
    """Rank, world size and collectives; ``Distributed()`` is the single process."""

    def __init__(self, accelerator=None):
        self.accelerator = accelerator
        self.rank = accelerator.process_index if accelerator else 0
        self.world_size = accelerator.num_processes if accelerator else 1

    @classmethod
    def launch(cls, kind: str, device: str) -> Distributed:
        """The run's processes for ``hardware.distributed``: ``none`` or ``ddp`` (torchrun / accelerate launch)."""
        if kind == "none":
            return cls()
        if kind != "ddp":
            raise ValueError(f"hardware.distributed={kind!r}: expected none or ddp")
        from accelerate import Accelerator

        # cpu=True is what makes accelerate use gloo on CPU processes; without it, launched CPU ranks
        # would each run alone (seen with accelerate 1.15).
        return cls(Accelerator(cpu=device == "cpu"))

    @property
    def is_main(self) -> bool:
        """Rank 0 owns the run dir: metrics, W&B, checkpoints and the saved model."""
        return self.rank == 0

    def wrap(self, model: nn.Module) -> nn.Module:
        """The module that training forwards go through: DistributedDataParallel with several ranks."""
        if self.world_size == 1:
            return model
        return self.accelerator.prepare_model(model)

    def shard(self, items):
        """This rank's contiguous share of a global list or tensor (even when the length does not
        divide): concatenated in rank order, the shares are the whole."""
        n, world = len(items), self.world_size
        return items[n * self.rank // world : n * (self.rank + 1) // world]

    def gather(
        self, tensor: torch.Tensor, dim: int = 1, pad_value: float = 0, pad_first: bool = False
    ) -> torch.Tensor:
        """Every rank's ``tensor`` concatenated along dim 0 in rank order, padded along ``dim`` to the
        longest (on the left with ``pad_first``)."""
        if self.world_size == 1:
            return tensor
        if tensor.dtype == torch.bool:  # padding adds an int to it: gather bytes, so every rank sends one dtype
            return self.gather(tensor.to(torch.uint8), dim, int(pad_value), pad_first).bool()
        if tensor.dim() > dim:
            tensor = self.accelerator.pad_across_processes(tensor, dim=dim, pad_index=pad_value, pad_first=pad_first)
        return self.accelerator.gather(tensor.contiguous())

    def gather_objects(self, items: list) -> list:
        """Every rank's list concatenated in rank order."""
        if self.world_size == 1:
            return list(items)
        from accelerate.utils import gather_object

        return gather_object(list(items))

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum over ranks."""
        if self.world_size == 1:
            return tensor
        return self.accelerator.reduce(tensor.to(self.accelerator.device, copy=True), reduction="sum").cpu()

    def mean(self, values: dict[str, float]) -> dict[str, float]:
        """Each value averaged over the ranks (the same keys on every rank)."""
        if self.world_size == 1:
            return values
        keys = sorted(values)
        stacked = self.sum(torch.tensor([float(values[k]) for k in keys], dtype=torch.float64))
        return {k: float(v) / self.world_size for k, v in zip(keys, stacked.tolist(), strict=True)}

    def all(self, flag: bool) -> bool:
        """True on every rank when it is True on every rank: one decision for all."""
        return bool(self.sum(torch.tensor([int(not flag)])).item() == 0)

    def max(self, value: float) -> float:
        """The largest of the ranks' values, on every rank."""
        if self.world_size == 1:
            return value
        tensor = torch.tensor([float(value)], dtype=torch.float64, device=self.accelerator.device)
        torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.MAX)
        return tensor.item()

    def main_first(self) -> contextlib.AbstractContextManager:
        """Rank 0 runs the block first, the other ranks after it (a cache that rank 0 fills)."""
        return self.accelerator.main_process_first() if self.world_size > 1 else contextlib.nullcontext()

    def barrier(self) -> None:
        if self.world_size > 1:
            self.accelerator.wait_for_everyone()
