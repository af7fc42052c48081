"""The pieces the PPO update's loop (``PPOTrainer.train_epochs``) is made of: the objective of each
model on a mini-batch (forward, loss term, statistics), the learner that bundles a model with its
optimizer, and the counter of optimizer steps skipped in a row."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from rlhf.core.kl import kl_loss
from rlhf.core.losses import aggregate_loss, policy_loss, value_loss
from rlhf.core.masked import masked_mean
from rlhf.core.types import Experience
from rlhf.models.actions import action_logprobs
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
    frozen: bool = False  # forwards and statistics only, no backward or step (the actor in ppo.critic_warmup_steps)


def policy_objective(
    actor: nn.Module, mb: Experience, *, settings: PPOSettings, kl_coef: float = 0.0
) -> dict[str, torch.Tensor]:
    """The actor's forward on a mini-batch: its loss term (clipped policy loss minus the entropy
    bonus, plus ``kl_coef`` times the KL to the reference with kl.mode=loss) and the policy's statistics.
    Every term is averaged over tokens as ``ppo.loss_agg`` says; ``policy/entropy`` stays the token mean."""
    num_actions, mask = mb.action_mask.shape[1], mb.action_mask
    chunk = {"temperature": settings.temperature, "logits_chunk_tokens": settings.logits_chunk_tokens}
    with autocast(device=settings.device, dtype=settings.autocast_dtype):  # (b, A) each, float32
        logprobs, token_entropy = action_logprobs(
            actor, mb.sequences, mb.attention_mask, num_actions, **chunk, entropy=True
        )
    entropy = masked_mean(token_entropy, mask)
    agg = {"loss_agg": settings.loss_agg, "max_length": settings.max_new_tokens}  # Dr. GRPO's constant length
    clip = {key: getattr(settings, key) for key in ("clip_eps_low", "clip_eps_high", "dual_clip_c")}
    pg_loss, stats = policy_loss(logprobs, mb.old_logprobs, mb.advantages, mask, settings.clip_eps, **clip, **agg)
    loss = pg_loss
    if settings.entropy_coef != 0:  # else the entropy is a statistic only: no backward through it
        entropy_bonus = aggregate_loss(token_entropy, mask, settings.loss_agg, max_length=settings.max_new_tokens)
        loss = loss - settings.entropy_coef * entropy_bonus
    metrics = {"loss/policy": pg_loss}
    if settings.experience.kl_mode == "loss":  # GRPO style: the KL to the reference is a loss term
        metrics["policy/kl_loss"] = kl_loss(logprobs, mb.ref_logprobs, mask, settings.experience.kl_estimator, **agg)
        loss = loss + kl_coef * metrics["policy/kl_loss"]
    if "dual_clipfrac" in stats:
        metrics["policy/dual_clipfrac"] = stats["dual_clipfrac"]
    return {
        "loss": loss,
        **metrics,
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
    vf_loss, stats = value_loss(
        values,
        mb.old_values,
        mb.returns,
        mb.action_mask,
        settings.value_clip_eps,
        loss_agg=settings.loss_agg,
        max_length=settings.max_new_tokens,
    )
    return {"loss": settings.vf_coef * vf_loss, "loss/value": vf_loss, "val/clipfrac": stats["clipfrac"]}


def shared_objective(
    actor: nn.Module, critic: nn.Module, mb: Experience, *, settings: PPOSettings, kl_coef: float = 0.0
) -> dict[str, torch.Tensor]:
    """Actor and value head on one trunk: both objectives, one loss (their sum)."""
    policy = policy_objective(actor, mb, settings=settings, kl_coef=kl_coef)
    value = value_objective(critic, mb, settings=settings)
    return {**policy, **value, "loss": policy["loss"] + value["loss"]}


def parameters_of(optimizer: torch.optim.Optimizer) -> list[nn.Parameter]:
    """The parameters ``optimizer`` steps."""
    return [param for group in optimizer.param_groups for param in group["params"]]


def loss_units(action_mask: torch.Tensor, loss_agg: str) -> int:
    """What a mini-batch's loss is a mean over (``ppo.loss_agg``): its action tokens for token_mean, its
    responses with at least one action for the seq_mean modes."""
    if loss_agg == "token_mean":
        return int(action_mask.sum())
    return int(action_mask.any(dim=1).sum())


# The objectives' statistics that are averaged as ppo.loss_agg says; the others are means over action tokens.
AGGREGATED_STATS = frozenset({"loss", "loss/policy", "loss/value", "policy/kl_loss"})


def rank_weight(rank_mask: torch.Tensor, global_mask: torch.Tensor, *, world: int, loss_agg: str) -> float:
    """The weight of one rank's mean over its (b, A) ``rank_mask`` rows of a mini-batch whose (B, A) mask is
    ``global_mask``: ``world`` times its share of the mini-batch's ``loss_units``. The ranks' weighted means,
    averaged over the ranks (the gradient reduction, ``Distributed.mean``), are the mini-batch's mean."""
    if world == 1:
        return 1.0
    return world * loss_units(rank_mask, loss_agg) / max(loss_units(global_mask, loss_agg), 1)


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
