"""The pieces the PPO update's loop (``PPOTrainer.train_epochs``) is made of: the objective of each
model on a mini-batch (forward, loss term, statistics), the learner that bundles a model with its
optimizer, and the counter of optimizer steps skipped in a row."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from rlhf.core.losses import entropy_from_logits, logprobs_from_logits, policy_loss, value_loss
from rlhf.core.masked import masked_mean
from rlhf.core.types import Experience
from rlhf.models.actions import action_logits
from rlhf.models.critic import action_values
from rlhf.ppo.rollout import autocast
from rlhf.ppo.settings import PPOSettings

Objective = Callable[[Experience], dict[str, torch.Tensor]]  # a mini-batch's forward: "loss" and statistics


@dataclass(frozen=True)
class Learner:
    """One optimizer's side of the update: the module its forwards go through (DDP, a DeepSpeed
    engine, or the model), its objective, and the parameter groups whose gradient norms are clipped."""

    name: str  # "actor" or "critic": the optimizer's name in metrics and skip counters
    module: nn.Module
    optimizer: torch.optim.Optimizer
    objective: Objective
    clip: dict[str, list[nn.Parameter]]


def policy_objective(actor: nn.Module, mb: Experience, *, settings: PPOSettings) -> dict[str, torch.Tensor]:
    """The actor's forward on a mini-batch: its loss term (clipped policy loss minus the entropy
    bonus) and the policy's statistics."""
    num_actions = mb.action_mask.shape[1]
    with autocast(device=settings.device, dtype=settings.autocast_dtype):
        logits = action_logits(actor, mb.sequences, mb.attention_mask, num_actions, settings.temperature)
    logprobs = logprobs_from_logits(logits, mb.sequences[:, -num_actions:])  # logits: (b, A, V), float32
    entropy = masked_mean(entropy_from_logits(logits), mb.action_mask)
    pg_loss, stats = policy_loss(logprobs, mb.old_logprobs, mb.advantages, mb.action_mask, settings.clip_eps)
    return {
        "loss": pg_loss - settings.entropy_coef * entropy,
        "loss/policy": pg_loss,
        "policy/entropy": entropy,
        "policy/clipfrac": stats["clipfrac"],
        "policy/approx_kl": stats["approx_kl"],
        "policy/ratio_mean": stats["ratio"],
        "ratio_max_dev": stats["ratio_max_dev"],
    }


def value_objective(critic: nn.Module, mb: Experience, *, settings: PPOSettings) -> dict[str, torch.Tensor]:
    """The critic's forward on a mini-batch: its loss term (vf_coef times the clipped value loss)."""
    num_actions = mb.action_mask.shape[1]
    with autocast(device=settings.device, dtype=settings.autocast_dtype):
        values = action_values(critic, mb.sequences, mb.attention_mask, num_actions)
    vf_loss, stats = value_loss(values, mb.old_values, mb.returns, mb.action_mask, settings.value_clip_eps)
    return {"loss": settings.vf_coef * vf_loss, "loss/value": vf_loss, "val/clipfrac": stats["clipfrac"]}


def shared_objective(
    actor: nn.Module, critic: nn.Module, mb: Experience, *, settings: PPOSettings
) -> dict[str, torch.Tensor]:
    """Actor and value head on one trunk: both objectives, one loss (their sum)."""
    policy = policy_objective(actor, mb, settings=settings)
    value = value_objective(critic, mb, settings=settings)
    return {**policy, **value, "loss": policy["loss"] + value["loss"]}


def parameters_of(optimizer: torch.optim.Optimizer) -> list[nn.Parameter]:
    """The parameters ``optimizer`` steps."""
    return [param for group in optimizer.param_groups for param in group["params"]]


class SkipCounter:
    """Optimizer steps skipped in a row for a non-finite loss or gradient, per optimizer;
    ``ppo.max_consecutive_skips`` in a row stop the run."""

    def __init__(self, names: list[str], *, limit: int):
        self.in_a_row = {name: 0 for name in names}
        self.limit = limit

    def count(self, name: str, *, stepped: bool, step: int) -> int:
        """1 if the ``name`` optimizer skipped its step of PPO iteration ``step``, else 0."""
        if stepped:
            self.in_a_row[name] = 0
            return 0
        self.in_a_row[name] += 1
        if self.in_a_row[name] >= self.limit:
            raise FloatingPointError(
                f"step {step} ({name}): {self.in_a_row[name]} optimizer steps in a row were skipped for a "
                f"non-finite loss or gradient (ppo.max_consecutive_skips={self.limit})"
            )
        return 1
