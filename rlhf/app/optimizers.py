"""The actor's and the critic's optimizers (``optimizer.actor`` / ``optimizer.critic``, on float32 masters
with ``optimizer.master_weights``) and their LR schedulers (``optimizer.scheduler``)."""

from __future__ import annotations

import logging
import warnings

import hydra
import torch
from omegaconf import DictConfig

from rlhf.models.critic import Critic
from rlhf.models.master_weights import with_master_weights
from rlhf.runtime.distributed import Distributed

log = logging.getLogger(__name__)


def build_optimizers(
    cfg: DictConfig, actor: torch.nn.Module, critic: Critic | None, dist: Distributed, *, shared_critic: bool
) -> tuple[torch.optim.Optimizer, torch.optim.Optimizer | None]:
    """(actor's, critic's) optimizers, on float32 masters if ``uses_master_weights``; with a shared critic
    trunk one for the actor and the value head, and None; without a critic the actor's and None."""

    def trainable(*modules: torch.nn.Module) -> list[torch.nn.Parameter]:
        return [p for module in modules for p in module.parameters() if p.requires_grad]

    low_precision = any(p.dtype != torch.float32 for p in trainable(actor))  # model.dtype bfloat16 or float16
    masters = uses_master_weights(cfg, dist, low_precision=low_precision)

    def optimizer(name: str, *modules: torch.nn.Module) -> torch.optim.Optimizer:
        factory = hydra.utils.instantiate(cfg.optimizer[name])
        return (with_master_weights(factory) if masters else factory)(trainable(*modules))

    if shared_critic:
        return optimizer("actor", actor, critic.value_head), None
    actor_optimizer = optimizer("actor", actor)
    if critic is None:
        return actor_optimizer, None
    return actor_optimizer, optimizer("critic", critic)


def uses_master_weights(cfg: DictConfig, dist: Distributed, *, low_precision: bool) -> bool:
    """Whether the optimizers step float32 masters of bfloat16/float16 weights (``optimizer.master_weights``):
    not with float32 weights, nor with DeepSpeed (its engines keep their own masters), nor with FSDP (left as
    it was: its optimizer state dicts are keyed by the sharded parameters; AdamW steps the low-precision shards)."""
    wanted = cfg.optimizer.master_weights and low_precision and not dist.saves_engines
    if wanted and dist.sharded:
        log.warning("optimizer.master_weights: not supported with hardware.distributed=fsdp (AdamW steps the shards)")
    return wanted and not dist.sharded


def make_schedulers(
    cfg: DictConfig, optimizers: list[torch.optim.Optimizer], steps_done: int = 0
) -> list[torch.optim.lr_scheduler.LRScheduler]:
    """One ``optimizer.scheduler`` per optimizer, stepped ``steps_done`` times from the start of its
    schedule: the same float operations as an uninterrupted run, so the learning rates match it."""
    schedulers = []
    for optimizer in optimizers:
        for group in optimizer.param_groups:  # a resumed optimizer's rate has decayed: start over
            group["lr"] = group.get("initial_lr", group["lr"])
        scheduler = hydra.utils.instantiate(cfg.optimizer.scheduler)(optimizer)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # torch warns of scheduler steps without optimizer steps
            for _ in range(steps_done):
                scheduler.step()
        schedulers.append(scheduler)
    return schedulers
