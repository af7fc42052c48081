"""Critic-free advantage estimators over response tokens (``advantage.estimator``; ``gae`` is
``rlhf.core.gae``). Pure functions of (B,) scores, (B, A) KL-shaped rewards (``rlhf.core.kl.shape_rewards``),
(B, A) action masks and (B,) group ids (the samples of one prompt share an id).

- grpo: (score - group mean) / (group std + eps) (Shao et al. 2024, DeepSeekMath), or without the std
  (Liu et al. 2025, Dr. GRPO).
- rloo: score minus the mean of the other n - 1 scores of its group (Ahmadian et al. 2024).
- reinforce_pp: returns of the KL-shaped rewards whitened over the global batch (Hu 2025, REINFORCE++).
- remax: returns minus the score of the greedy response to the same prompt (Li et al. 2023, ReMax).
"""

from __future__ import annotations

import torch

from rlhf.core.masked import masked_whiten

# The names ``advantage.estimator`` takes (rlhf.config.options.AdvantageEstimator; tests/test_advantages.py
# checks that the two agree). Every one but gae trains without a critic.
ADVANTAGE_ESTIMATORS = ("gae", "grpo", "rloo", "reinforce_pp", "remax")
CRITIC_FREE = ("grpo", "rloo", "reinforce_pp", "remax")


def group_sums(values: torch.Tensor, group_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of the values of each sample's group, size of its group), both (B,), for (B,) ``values``."""
    _, index = torch.unique(group_ids, return_inverse=True)
    num_groups = int(index.max()) + 1 if index.numel() else 0
    sums = torch.zeros(num_groups, dtype=values.dtype, device=values.device).index_add_(0, index, values)
    counts = torch.zeros(num_groups, dtype=values.dtype, device=values.device).index_add_(
        0, index, torch.ones_like(values)
    )
    return sums[index], counts[index]


def grpo_advantages(
    scores: torch.Tensor, group_ids: torch.Tensor, *, std_normalize: bool = True, eps: float = 1e-6
) -> torch.Tensor:
    """(B,) GRPO outcome advantages: (score - group mean) / (group std + eps), the std unbiased as in
    DeepSeekMath's and verl's ``torch.std``; ``std_normalize=False`` keeps score - group mean (Dr. GRPO).
    A group of one sample (no spread to measure) gets 0; a group of equal scores gets 0, not NaN."""
    sums, counts = group_sums(scores, group_ids)
    mean = sums / counts
    centred = scores - mean
    if not std_normalize:
        return centred
    squares, _ = group_sums(centred**2, group_ids)
    std = (squares / (counts - 1).clamp(min=1)).sqrt()
    return torch.where(counts > 1, centred / (std + eps), torch.zeros_like(centred))


def rloo_advantages(scores: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
    """(B,) RLOO advantages: score_i - mean of the other n - 1 scores of its group (0 for a group of one)."""
    sums, counts = group_sums(scores, group_ids)
    others = (sums - scores) / (counts - 1).clamp(min=1)
    return torch.where(counts > 1, scores - others, torch.zeros_like(scores))


def returns_to_go(rewards: torch.Tensor, action_mask: torch.Tensor, *, gamma: float) -> torch.Tensor:
    """(B, A) discounted returns G_t = sum_{t' >= t} gamma^(t' - t) r_t' of each response, 0 where masked."""
    mask = action_mask.to(rewards.dtype)
    returns = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        running = (rewards[:, t] + gamma * running) * mask[:, t]
        returns[:, t] = running
    return returns


def reinforce_pp_advantages(
    rewards: torch.Tensor, action_mask: torch.Tensor, *, gamma: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """REINFORCE++: (advantages, returns), both (B, A): the returns of the per-token KL-shaped rewards,
    whitened (zero mean, unit variance) over every action token of the global batch."""
    returns = returns_to_go(rewards, action_mask, gamma=gamma)
    return masked_whiten(returns, action_mask), returns


def outcome_advantages(
    estimator: str,
    *,
    rewards: torch.Tensor,
    scores: torch.Tensor,
    action_mask: torch.Tensor,
    group_ids: torch.Tensor,
    baseline_scores: torch.Tensor | None = None,
    gamma: float = 1.0,
    std_normalize: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages, returns), both (B, A), of a critic-free ``estimator`` from the (B, A) KL-shaped
    ``rewards`` (-beta * kl on every action, the (B,) ``scores`` added on the last one).

    Where the KL penalty goes: rloo subtracts the leave-one-out baseline from the KL-penalised sequence
    reward (score - beta * sum kl, as the paper and verl); remax subtracts the greedy response's score
    (``baseline_scores``) from the returns of the KL-shaped rewards (verl); grpo normalises the scores
    within groups and adds the KL penalty still to come (OpenRLHF's group_norm with KL in the reward);
    reinforce_pp whitens the discounted returns. grpo, rloo and remax sum rewards undiscounted (gamma 1,
    as their peers); ``gamma`` is reinforce_pp's."""
    mask = action_mask.to(rewards.dtype)
    if estimator == "reinforce_pp":
        return reinforce_pp_advantages(rewards, action_mask, gamma=gamma)
    returns = returns_to_go(rewards, action_mask, gamma=1.0)
    if estimator == "rloo":
        advantages = rloo_advantages(rewards.sum(dim=1), group_ids)[:, None] * mask
    elif estimator == "remax":
        advantages = (returns - baseline_scores.to(rewards.dtype)[:, None]) * mask
    elif estimator == "grpo":
        normalised = grpo_advantages(scores.to(rewards.dtype), group_ids, std_normalize=std_normalize)
        advantages = returns + (normalised - scores.to(rewards.dtype))[:, None] * mask
    else:
        raise ValueError(f"advantage.estimator={estimator!r}: not one of {CRITIC_FREE} (gae is rlhf.core.gae's)")
    return advantages, returns
