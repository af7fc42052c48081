"""The interface of the distributed strategies, and what they share.

A strategy is chosen once, from ``hardware.distributed``, by ``rlhf.runtime.distributed.launch``;
the run loop and the trainer then call its methods and never compare the option's string. This
module holds what every strategy has: the rank and world size, the collectives the loop needs (over
accelerate's process group: gloo on CPU, NCCL on GPUs), and the trained models handled as plain
torch modules (backward, clipping, step, state dicts), which the backends override where they differ.

Data parallelism here: each rank samples its own share of the rollout with its own seed and runs its
own forwards; the rollouts are then gathered, so that every rank holds the global batch and computes
the same experience (reward normalisation, KL, GAE, whitening: exactly the one-process math on the
global batch). Each PPO mini-batch is the same global one on every rank, and each rank runs forward
and backward on its share of its rows.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import torch
from torch import nn

Items = TypeVar("Items", list, torch.Tensor)
Groups = dict[str, list[nn.Parameter]]  # parameter groups by name, each clipped to its own gradient norm

# What DeepSpeed logs (on its "DeepSpeed" logger, to stdout) when it is imported on a machine without GPUs.
DEEPSPEED_DETECTION = "Setting accelerator to"


class _NoAcceleratorDetection(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(DEEPSPEED_DETECTION)


def quiet_deepspeed_detection() -> None:
    """Drop DeepSpeed's accelerator-detection line, for runs that do not use DeepSpeed.

    Installed DeepSpeed is imported by transformers' ``save_pretrained`` (through accelerate's
    ``extract_model_from_parallel``, which checks for DeepSpeed engines) and then logs "Setting
    accelerator to CPU..." although nothing uses it. Only that message of that logger is dropped; the
    filter set on the logger before DeepSpeed creates it stays on it."""
    logger = logging.getLogger("DeepSpeed")
    if not any(isinstance(f, _NoAcceleratorDetection) for f in logger.filters):
        logger.addFilter(_NoAcceleratorDetection())


@dataclass(frozen=True, kw_only=True)
class LaunchSettings:
    """What the strategies read from the run's config when they launch (read once by the
    composition root, ``rlhf.app.build``)."""

    device: str  # hardware.device: "cpu" (gloo) or "cuda" (NCCL)
    # The DeepSpeed engines' config (see ``rlhf.runtime.distributed.deepspeed.deepspeed_config``):
    zero_stage: int  # hardware.zero_stage
    zero3_persistence_threshold: int  # hardware.zero3_persistence_threshold
    minibatch_size: int  # ppo.minibatch_size (per rank)
    max_grad_norm: float  # ppo.max_grad_norm
    dtype: str  # model.dtype


def join_processes(device: str) -> Any:
    """accelerate's ``Accelerator``, which joins the process group of the processes that torchrun or
    accelerate launch started."""
    from accelerate import Accelerator

    # cpu=True is what makes accelerate use gloo on CPU processes; without it, launched CPU ranks
    # would each run alone (seen with accelerate 1.15). DeepSpeed joins the process group
    # accelerate made.
    return Accelerator(cpu=device == "cpu")


def replicated(tensor: torch.Tensor) -> torch.Tensor:
    """A plain tensor: the value of a DTensor that is the same on every rank (e.g. the gradient norm
    of sharded parameters), or ``tensor`` itself."""
    from torch.distributed.tensor import DTensor

    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def whole_optimizer_state(state: dict | None) -> dict:
    """``state`` from a checkpoint's state.pt, which holds None when DeepSpeed engines saved it."""
    if state is None:
        raise ValueError(
            "the checkpoint's optimizer state is in its DeepSpeed engines' folder: resume with "
            "hardware.distributed=deepspeed"
        )
    return state


class Distributed:
    """A run's processes: rank, world size, collectives, and how the trained models are wrapped,
    stepped and checkpointed. Subclasses: ``Single`` (one process), ``DDP``, ``FSDP``, ``DeepSpeed``."""

    kind: ClassVar[str]  # the hardware.distributed option
    # The trained models' parameters are sharded over the ranks: each forward is a collective.
    sharded: bool = False
    # The trained models are engines that checkpoint themselves (``save_engine``/``load_engine``:
    # weights and each rank's shard of the optimizer state) instead of through state dicts.
    saves_engines: ClassVar[bool] = False

    def __init__(self, accelerator: Any = None):
        self.accelerator = accelerator
        self.rank: int = accelerator.process_index if accelerator else 0
        self.world_size: int = accelerator.num_processes if accelerator else 1

    @classmethod
    def launch(cls, settings: LaunchSettings) -> Distributed:
        """Join the processes launched by torchrun or accelerate launch."""
        quiet_deepspeed_detection()  # nothing here uses DeepSpeed
        return cls(join_processes(settings.device))

    @property
    def is_main(self) -> bool:
        """Rank 0 owns the run dir: metrics, W&B, checkpoints and the saved model."""
        return self.rank == 0

    # The trained models, as plain torch modules.

    def shard_parameters(self, model: nn.Module) -> None:
        """Shard ``model`` in place over the ranks (before its optimizer is built on its parameters)
        with a strategy that shards; nothing otherwise."""

    def wrap(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> nn.Module:
        """The module that training forwards go through (``model`` itself here)."""
        return model

    def backward_and_step(
        self, module: nn.Module, optimizer: torch.optim.Optimizer, loss: torch.Tensor, clip: Groups, max_norm: float
    ) -> tuple[dict[str, torch.Tensor], bool]:
        """Backward of ``loss``, the gradient norm of each group in ``clip`` clipped to ``max_norm``,
        and the optimizer step unless the loss or a norm is not finite on some rank (then the step
        is skipped on every rank, the parameters and the optimizer state left as they were).
        Returns the norms before clipping and whether the step was taken. ``module`` is the one
        from ``wrap``."""
        loss.backward()
        norms = {group: replicated(nn.utils.clip_grad_norm_(params, max_norm)) for group, params in clip.items()}
        finite = all(torch.isfinite(value) for value in (loss, *norms.values()))
        stepped = self.all(finite)  # one decision for every rank
        if stepped:
            optimizer.step()
        else:
            optimizer.zero_grad(set_to_none=True)
        return norms, stepped

    def state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The model's full weights on rank 0 (a collective with sharded parameters, whose other
        ranks get ``{}``)."""
        return model.state_dict()

    def load_state_dict(self, model: nn.Module, weights: dict[str, torch.Tensor]) -> None:
        """Load full weights (every rank passes all of them)."""
        model.load_state_dict(weights)

    def optimizer_state_dict(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict | None:
        """The optimizer's state on rank 0, whole; None when the engines save it (``save_engine``)."""
        return optimizer.state_dict()

    def load_optimizer_state_dict(
        self, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict | None
    ) -> None:
        """Load a state from ``optimizer_state_dict`` (every rank passes all of it)."""
        optimizer.load_state_dict(whole_optimizer_state(state))

    def save_engine(self, engine: nn.Module, folder: Path) -> None:
        """An engine's own checkpoint in ``folder`` (with ``saves_engines`` only)."""
        raise RuntimeError(f"hardware.distributed={self.kind}: the trained models are not engines")

    def load_engine(self, engine: nn.Module, folder: Path) -> None:
        """Load what ``save_engine`` wrote (with ``saves_engines`` only)."""
        raise RuntimeError(f"hardware.distributed={self.kind}: the trained models are not engines")

    # Collectives: every rank calls each of them, in the same order.

    def shard(self, items: Items) -> Items:
        """This rank's contiguous share of a global list or tensor (even when the length does not
        divide): concatenated in rank order, the shares are the whole."""
        n, world = len(items), self.world_size
        return items[n * self.rank // world : n * (self.rank + 1) // world]

    def gather(
        self, tensor: torch.Tensor, dim: int = 1, pad_value: float = 0, pad_first: bool = False
    ) -> torch.Tensor:
        """Every rank's ``tensor`` concatenated along dim 0 in rank order, padded along ``dim`` to the
        longest (on the left with ``pad_first``)."""
        if tensor.dtype == torch.bool:  # padding adds an int to it: gather bytes, so every rank sends one dtype
            return self.gather(tensor.to(torch.uint8), dim, int(pad_value), pad_first).bool()
        if tensor.dim() > dim:
            tensor = self.accelerator.pad_across_processes(tensor, dim=dim, pad_index=pad_value, pad_first=pad_first)
        return self.accelerator.gather(tensor.contiguous())

    def gather_objects(self, items: list) -> list:
        """Every rank's list concatenated in rank order."""
        from accelerate.utils import gather_object

        return gather_object(list(items))

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum over ranks."""
        return self.accelerator.reduce(tensor.to(self.accelerator.device, copy=True), reduction="sum").cpu()

    def mean(self, values: dict[str, float]) -> dict[str, float]:
        """Each value averaged over the ranks (the same keys on every rank)."""
        keys = sorted(values)
        stacked = self.sum(torch.tensor([float(values[k]) for k in keys], dtype=torch.float64))
        return {k: float(v) / self.world_size for k, v in zip(keys, stacked.tolist(), strict=True)}

    def all(self, flag: bool) -> bool:
        """True on every rank when it is True on every rank: one decision for all."""
        return bool(self.sum(torch.tensor([int(not flag)])).item() == 0)

    def max(self, value: float) -> float:
        """The largest of the ranks' values, on every rank."""
        tensor = torch.tensor([float(value)], dtype=torch.float64, device=self.accelerator.device)
        torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.MAX)
        return tensor.item()

    def main_first(self) -> contextlib.AbstractContextManager:
        """Rank 0 runs the block first, the other ranks after it (a cache that rank 0 fills)."""
        return self.accelerator.main_process_first()

    def barrier(self) -> None:
        """Wait until every rank is here."""
        self.accelerator.wait_for_everyone()
