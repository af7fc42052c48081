"""Generalised Advantage Estimation over response tokens.

Schulman et al. 2016, "High-Dimensional Continuous Control Using Generalized Advantage
Estimation": delta_t = r_t + gamma * V(s_{t+1}) - V(s_t), A_t = sum_l (gamma * lam)^l delta_{t+l}.
"""

from __future__ import annotations

import torch


def compute_gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    action_mask: torch.Tensor,
    *,
    gamma: float,
    lam: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Advantages and returns for each action token.

    Args:
        rewards: (B, A) per-token rewards (KL penalty on every action, score on the last one).
        values: (B, A) V(s_t), the critic's estimate before action t.
        action_mask: (B, A) bool, True for real response tokens (up to and including EOS).
        gamma: discount factor in [0, 1].
        lam: GAE lambda in [0, 1].

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
    # Walk backwards. A masked-out position (padding after EOS) has value 0 and resets the
    # running sum, so the value "after" the last real action is 0.
    for t in reversed(range(num_actions)):
        next_value = values[:, t + 1] if t + 1 < num_actions else torch.zeros_like(last_gae)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last_gae = (delta + gamma * lam * last_gae) * mask[:, t]
        advantages[:, t] = last_gae
    returns = (advantages + values) * mask
    return advantages, returns
