"""Experience: everything PPO needs about a rollout, computed once without gradients.

Numbers come from the pure math modules (``rlhf.core.kl``, ``rlhf.core.gae``, ``rlhf.core.masked``); this module
only runs the models and puts the results in place.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from rlhf.core.advantages import outcome_advantages
from rlhf.core.gae import adaptive_lambda, compute_gae, decoupled_gae
from rlhf.core.kl import kl_estimate, shape_rewards
from rlhf.core.masked import masked_whiten
from rlhf.core.types import Experience, Samples
from rlhf.models.actions import action_logprobs
from rlhf.models.critic import action_values
from rlhf.ppo.settings import ExperienceSettings


@torch.no_grad()
def compute_logprobs(
    model, samples: Samples, temperature: float, *, logits_chunk_tokens: str | None = None
) -> torch.Tensor:
    """(B, A) log-probs of the sampled response tokens under ``model``, on the path the update takes
    (``hardware.logits_chunk_tokens``), so the first mini-batch's ratio is 1."""
    chunk = {"temperature": temperature, "logits_chunk_tokens": logits_chunk_tokens}
    return action_logprobs(model, samples.sequences, samples.attention_mask, samples.num_actions, **chunk)[0]


@torch.no_grad()
def compute_values(critic, samples: Samples) -> torch.Tensor:
    """(B, A) values V(s_t) of the states before each response token under ``critic``."""
    return action_values(critic, samples.sequences, samples.attention_mask, samples.num_actions)


def training_scores(
    samples: Samples, raw_scores: torch.Tensor, *, normalize: Callable[[torch.Tensor], torch.Tensor]
) -> torch.Tensor:
    """(B,) scores PPO trains on: the finite (B,) ``raw_scores`` after ``normalize``. A sample with a
    non-finite score (``reward.on_nonfinite=mask``) loses its actions in ``samples.action_mask``:
    advantage 0, out of every statistic; its training score is 0. With remax's (B,)
    ``samples.baseline_scores`` those are normalised alongside (and replaced)."""
    finite = torch.isfinite(raw_scores)
    baseline = samples.baseline_scores
    if baseline is not None:  # remax: a sample whose greedy baseline is not finite is dropped too
        finite &= torch.isfinite(baseline)
    samples.action_mask &= finite[:, None].to(samples.action_mask.device)
    scores = torch.zeros_like(raw_scores)
    if baseline is None:
        scores[finite] = normalize(raw_scores[finite])
        return scores
    # remax: the greedy baselines normalised with the scores (one update of running statistics), so
    # both are in the training reward's units; samples.baseline_scores then holds those.
    both = normalize(torch.cat([raw_scores[finite], baseline[finite]]))
    scores[finite] = both[: int(finite.sum())]
    samples.baseline_scores = torch.zeros_like(baseline)
    samples.baseline_scores[finite] = both[int(finite.sum()) :]
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
    if settings.estimator != "gae":
        advantages, returns = critic_free_advantages(samples, rewards=rewards, scores=scores, settings=settings)
    elif settings.lam_critic is None and settings.lam_adaptive_alpha is None:
        advantages, returns = compute_gae(rewards, old_values, mask, gamma=settings.gamma, lam=settings.lam)
    else:
        advantages, returns = decoupled_advantages(samples, rewards=rewards, values=old_values, settings=settings)
    if settings.whiten_advantages and settings.estimator == "gae":
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


def critic_free_advantages(
    samples: Samples, *, rewards: torch.Tensor, scores: torch.Tensor, settings: ExperienceSettings
) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, A) advantages and returns of a critic-free estimator (``rlhf.core.advantages``) from the (B, A)
    KL-shaped rewards and (B,) training scores, grouped by the samples' prompts."""
    group_ids = samples.group_ids if samples.group_ids is not None else torch.arange(len(scores))
    baseline = samples.baseline_scores
    return outcome_advantages(
        settings.estimator,
        rewards=rewards,
        scores=scores.to(rewards.device),
        action_mask=samples.action_mask,
        group_ids=group_ids.to(rewards.device),
        baseline_scores=None if baseline is None else baseline.to(rewards.device),
        gamma=settings.gamma,
        std_normalize=settings.std_normalize,
    )


def decoupled_advantages(
    samples: Samples, *, rewards: torch.Tensor, values: torch.Tensor, settings: ExperienceSettings
) -> tuple[torch.Tensor, torch.Tensor]:
    """GAE with the policy's lambda (per sequence with ``lam_adaptive_alpha``) for the (B, A) advantages
    and ``lam_critic`` for the (B, A) returns."""
    lam_policy = settings.lam
    if settings.lam_adaptive_alpha is not None:
        lengths = samples.action_mask.sum(dim=1)
        lam_policy = adaptive_lambda(lengths, alpha=settings.lam_adaptive_alpha).to(values.device)
    lam_critic = settings.lam if settings.lam_critic is None else settings.lam_critic
    return decoupled_gae(
        rewards, values, samples.action_mask, gamma=settings.gamma, lam_policy=lam_policy, lam_critic=lam_critic
    )
