"""``hardware.distributed=deepspeed``: the actor and the critic each in a DeepSpeed ZeRO engine.

The engine shards the gradients and optimizer state (stage 2) and the parameters too (stage 3), and
runs backward, clipping and the step; a step with a non-finite gradient is skipped by the engine on
every rank. Under ZeRO-3 every forward is a collective (generation with ``synced_gpus``) and
checkpoints gather the full weights on rank 0. The engines save and load their own checkpoints
(each rank its shard of the optimizer state and float32 master weights).
"""

from __future__ import annotations

import importlib.util
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rlhf.runtime.distributed.base import Distributed, Groups, LaunchSettings, join_processes

ENGINE_TAG = "zero"  # the sub-folder of a DeepSpeed engine's checkpoint


def deepspeed_config(settings: LaunchSettings) -> dict:
    """The DeepSpeed config of the actor's and the critic's engines: ZeRO ``zero_stage``, gradients
    clipped to ``max_grad_norm`` (ppo.max_grad_norm), bf16/fp16 mixed precision (float32 master
    weights and optimizer state) when the models are in that ``dtype``. ``minibatch_size`` is
    ppo.minibatch_size (DeepSpeed's micro-batch; the loop feeds the engines itself)."""
    zero: dict = {"stage": settings.zero_stage}
    if settings.zero_stage == 3:
        zero["stage3_param_persistence_threshold"] = settings.zero3_persistence_threshold
    return {
        "train_micro_batch_size_per_gpu": settings.minibatch_size,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": settings.max_grad_norm,
        "bf16": {"enabled": settings.dtype == "bfloat16"},
        "fp16": {"enabled": settings.dtype == "float16"},
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,  # optimizer.actor / optimizer.critic: a torch optimizer
        "steps_per_print": 2**31 - 1,  # the loop logs its own metrics
    }


class DeepSpeed(Distributed):
    """ZeRO engines, configured by ``config`` (``deepspeed_config``)."""

    kind = "deepspeed"
    saves_engines = True

    def __init__(self, accelerator: Any, config: dict):
        super().__init__(accelerator)
        self.config = config
        self.sharded = config["zero_optimization"]["stage"] == 3

    @classmethod
    def launch(cls, settings: LaunchSettings) -> DeepSpeed:
        if importlib.util.find_spec("deepspeed") is None:
            raise ValueError(
                "hardware.distributed=deepspeed needs DeepSpeed, which is not installed: pip install 'rlhf[deepspeed]'"
            )
        return cls(join_processes(settings.device), deepspeed_config(settings))

    def wrap(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> nn.Module:
        """A DeepSpeed engine around ``model``, which then owns ``optimizer``."""
        import deepspeed

        # DeepSpeed 0.19 calls torch collectives that torch deprecates, at every step.
        for collective in ("all_gather_into_tensor", "reduce_scatter_tensor"):
            warnings.filterwarnings("ignore", f".*{collective}.* is deprecated", FutureWarning)
        engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=self.config)
        return engine

    def backward_and_step(
        self, module: nn.Module, optimizer: torch.optim.Optimizer, loss: torch.Tensor, clip: Groups, max_norm: float
    ) -> tuple[dict[str, torch.Tensor], bool]:
        """The engine ``module`` runs backward, clipping (``gradient_clipping`` in its config, over its
        one group of ``clip``) and the step, which it skips on every rank when a gradient is not finite."""
        module.backward(loss)
        module.step()
        (group,) = clip
        return {group: torch.tensor(float(module.get_global_grad_norm()))}, module.was_step_applied()

    def state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The model's full weights on rank 0; under ZeRO-3 gathered from the ranks (a collective),
        and the other ranks get ``{}``."""
        if not self.sharded:
            return super().state_dict(model)
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None):
            return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()} if self.is_main else {}

    def load_state_dict(self, model: nn.Module, weights: dict[str, torch.Tensor]) -> None:
        raise RuntimeError("a DeepSpeed engine's weights are loaded by load_engine")

    def optimizer_state_dict(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict | None:
        """None: the engines save their shards of it themselves (``save_engine``)."""
        return None

    def load_optimizer_state_dict(
        self, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict | None
    ) -> None:
        """Nothing: the engines load their shards of it themselves (``load_engine``)."""

    def save_engine(self, engine: nn.Module, folder: Path) -> None:
        """A DeepSpeed engine's checkpoint in ``folder``: weights, and each rank's shard of the
        optimizer state (with its float32 master weights), written by every rank (a collective)."""
        engine.save_checkpoint(str(folder), tag=ENGINE_TAG, save_latest=False)
        self.barrier()

    def load_engine(self, engine: nn.Module, folder: Path) -> None:
        """Load what ``save_engine`` wrote (every rank its own shard)."""
        engine.load_checkpoint(str(folder), tag=ENGINE_TAG, load_lr_scheduler_states=False)
