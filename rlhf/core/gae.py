"""Generalised Advantage Estimation over response tokens.

Schulman et al. 2016, "High-Dimensional Continuous Control Using Generalized Advantage
Estimation": delta_t = r_t + gamma * V(s_{t+1}) - V(s_t), A_t = sum_l (gamma * lam)^l delta_{t+l}.
Decoupled GAE (Yuan et al. 2025, VC-PPO): the critic's targets with their own lambda. Length-adaptive
lambda (Yue et al. 2025, VAPO): the policy's lambda per sequence, 1 - 1 / (alpha * length).
"""

from __future__ import annotations

import torch


def compute_gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    action_mask: torch.Tensor,
    *,
    gamma: float,
    lam: float | torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Advantages and returns for each action token.

    Args:
        rewards: (B, A) per-token rewards (KL penalty on every action, score on the last one).
        values: (B, A) V(s_t), the critic's estimate before action t.
        action_mask: (B, A) bool, True for real response tokens (up to and including EOS).
        gamma: discount factor in [0, 1].
        lam: GAE lambda in [0, 1], or a (B,) tensor of one lambda per sequence.

    Returns:
        advantages (B, A) and returns (B, A) = advantages + values, both 0 where masked out.
        The value after the last action of a row is 0 (the episode ends there).
    """
    mask = action_mask.to(values.dtype)
    rewards = rewards * mask
    values = values * mask
    num_actions = rewards.shape[1]
    advantages = torch.zeros_like(values)
    last_gae = torch.zeros_like(values[:, 0])
    coef = gamma * lam  # a float, or (B,) with one lambda per sequence
    # Walk backwards. A masked-out position (padding after EOS) has value 0 and resets the
    # running sum, so the value "after" the last real action is 0.
    for t in reversed(range(num_actions)):
        next_value = values[:, t + 1] if t + 1 < num_actions else torch.zeros_like(last_gae)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last_gae = (delta + coef * last_gae) * mask[:, t]
        advantages[:, t] = last_gae
    returns = (advantages + values) * mask
    return advantages, returns


def adaptive_lambda(response_length: torch.Tensor, *, alpha: float) -> torch.Tensor:
    """(B,) VAPO's length-adaptive lambda 1 - 1 / (alpha * length) of (B,) response lengths, clamped to
    [0, 1]: long responses get a lambda near 1 (low bias), short ones near 0; an empty response gets 0."""
    return (1.0 - 1.0 / (alpha * response_length.double()).clamp(min=1e-12)).clamp(0.0, 1.0).float()


def decoupled_gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    action_mask: torch.Tensor,
    *,
    gamma: float,
    lam_policy: float | torch.Tensor,
    lam_critic: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages with ``lam_policy`` (a float or (B,) per sequence), returns with ``lam_critic``), both
    (B, A): VC-PPO's decoupled GAE. With one lambda for both it is ``compute_gae``, computed once."""
    advantages, returns = compute_gae(rewards, values, action_mask, gamma=gamma, lam=lam_policy)
    if isinstance(lam_policy, float) and lam_policy == lam_critic:
        return advantages, returns
    _, returns = compute_gae(rewards, values, action_mask, gamma=gamma, lam=lam_critic)
    return advantages, returns
