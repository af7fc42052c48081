"""Experience: everything PPO needs about a rollout, computed once without gradients.

Numbers come from the pure math modules (``rlhf.core.kl``, ``rlhf.core.gae``, ``rlhf.core.masked``); this module
only runs the models and puts the results in place.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from rlhf.core.gae import compute_gae
from rlhf.core.kl import kl_estimate, shape_rewards
from rlhf.core.losses import logprobs_from_logits
from rlhf.core.masked import masked_whiten
from rlhf.core.types import Experience, Samples
from rlhf.models.actions import action_logits
from rlhf.models.critic import action_values
from rlhf.ppo.settings import ExperienceSettings


@torch.no_grad()
def compute_logprobs(model, samples: Samples, temperature: float) -> torch.Tensor:
    """(B, A) log-probs of the sampled response tokens under ``model``."""
    logits = action_logits(model, samples.sequences, samples.attention_mask, samples.num_actions, temperature)
    return logprobs_from_logits(logits, samples.sequences[:, -samples.num_actions :])


@torch.no_grad()
def compute_values(critic, samples: Samples) -> torch.Tensor:
    """(B, A) values V(s_t) of the states before each response token under ``critic``."""
    return action_values(critic, samples.sequences, samples.attention_mask, samples.num_actions)


def training_scores(
    samples: Samples, raw_scores: torch.Tensor, *, normalize: Callable[[torch.Tensor], torch.Tensor]
) -> torch.Tensor:
    """(B,) scores PPO trains on: the finite (B,) ``raw_scores`` after ``normalize``. A sample with a
    non-finite score (``reward.on_nonfinite=mask``) loses its actions in ``samples.action_mask``:
    advantage 0, out of every statistic; its training score is 0."""
    finite = torch.isfinite(raw_scores)
    samples.action_mask &= finite[:, None].to(samples.action_mask.device)
    scores = torch.zeros_like(raw_scores)
    scores[finite] = normalize(raw_scores[finite])
    return scores


@torch.no_grad()
def make_experience(
    samples: Samples,
    *,
    scores: torch.Tensor,
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    values: torch.Tensor,
    kl_coef: float,
    settings: ExperienceSettings,
) -> Experience:
    """KL, shaped rewards, advantages and returns from the rollout's forwards: (B,) ``scores``, (B, A)
    ``logprobs`` of the actor and ``ref_logprobs`` of the reference (``compute_logprobs``), (B, A)
    ``values`` of the critic (``compute_values``); padding zeroed everywhere."""
    mask = samples.action_mask
    old_logprobs, ref_logprobs, old_values = logprobs * mask, ref_logprobs * mask, values * mask
    kl = kl_estimate(old_logprobs, ref_logprobs, settings.kl_estimator) * mask
    # kl.mode=loss (GRPO style): the KL is a term of the policy loss instead, the rewards carry none
    reward_kl_coef = kl_coef if settings.kl_mode == "reward" else 0.0
    rewards = shape_rewards(scores.to(kl.device), kl, reward_kl_coef, mask)
    if settings.whiten_rewards:
        rewards = masked_whiten(rewards, mask, keep_mean=True)
    advantages, returns = compute_gae(rewards, old_values, mask, gamma=settings.gamma, lam=settings.lam)
    if settings.whiten_advantages:
        advantages = masked_whiten(advantages, mask)
    if settings.advantage_clip is not None:
        advantages = advantages.clamp(-settings.advantage_clip, settings.advantage_clip)
    return Experience(
        sequences=samples.sequences,
        attention_mask=samples.attention_mask,
        action_mask=mask,
        old_logprobs=old_logprobs,
        ref_logprobs=ref_logprobs,
        old_values=old_values,
        kl=kl,
        scores=scores.to(kl.device),
        rewards=rewards,
        advantages=advantages,
        returns=returns,
    )
