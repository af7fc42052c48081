"""The processes of a run, one strategy class per ``hardware.distributed`` option.

One process (``none``: ``Single``) has nothing to communicate. Several processes are launched by
``torchrun`` or ``accelerate launch``; accelerate's ``Accelerator`` joins the process group (gloo on
CPU, NCCL on GPUs). Then the trained models are either

- ``ddp`` (``DDP``): replicated, and wrapped in DistributedDataParallel;
- ``fsdp`` (``FSDP``): sharded with torch's FSDP2; or
- ``deepspeed`` (``DeepSpeed``): each in a DeepSpeed ZeRO engine.

``launch`` picks the class once; callers use its methods and attributes (``sharded``,
``saves_engines``) and never compare the option's string. A new backend is one module with a
``Distributed`` subclass and one entry in ``STRATEGIES``.
"""

from __future__ import annotations

from rlhf.runtime.distributed.base import Distributed, LaunchSettings, quiet_deepspeed_detection, replicated
from rlhf.runtime.distributed.ddp import DDP
from rlhf.runtime.distributed.deepspeed import DeepSpeed, deepspeed_config
from rlhf.runtime.distributed.fsdp import FSDP, fsdp_blocks
from rlhf.runtime.distributed.single import Single

__all__ = [
    "DDP",
    "FSDP",
    "STRATEGIES",
    "DeepSpeed",
    "Distributed",
    "LaunchSettings",
    "Single",
    "deepspeed_config",
    "fsdp_blocks",
    "launch",
    "quiet_deepspeed_detection",
    "replicated",
]

# hardware.distributed -> its strategy (the option's allowed values are rlhf.config.schema.DISTRIBUTED_KINDS)
STRATEGIES: dict[str, type[Distributed]] = {"none": Single, "ddp": DDP, "fsdp": FSDP, "deepspeed": DeepSpeed}


def launch(kind: str, settings: LaunchSettings) -> Distributed:
    """The run's processes for ``hardware.distributed=kind``: launched by torchrun or accelerate launch
    unless ``none``."""
    strategy = STRATEGIES.get(kind)
    if strategy is None:
        raise ValueError(f"hardware.distributed={kind!r}: expected one of {', '.join(STRATEGIES)}")
    dist = strategy.launch(settings)
    # One process has nothing to distribute, whatever hardware.distributed says.
    return dist if dist.world_size > 1 or isinstance(dist, Single) else Single(dist.accelerator)
