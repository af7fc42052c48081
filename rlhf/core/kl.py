"""KL penalty: per-token estimators, reward shaping and the KL coefficient controllers.

Estimators follow John Schulman, "Approximating KL Divergence" (2020), with
log r = ref_logprob - logprob for tokens sampled from the policy:
k1 = -log r (unbiased, can be negative), k2 = (log r)^2 / 2, k3 = (r - 1) - log r (unbiased, >= 0).
The adaptive controller is Ziegler et al. 2019, "Fine-Tuning Language Models from Human
Preferences" (lm-human-preferences). The KL either shapes the reward (``shape_rewards``, kl.mode=reward)
or is a term of the policy loss (``kl_loss``, kl.mode=loss, as GRPO: Shao et al. 2024, "DeepSeekMath").
"""

from __future__ import annotations

import torch

from rlhf.core.losses import aggregate_loss

KL_ESTIMATORS = ("k1", "k2", "k3")


def kl_estimate(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str) -> torch.Tensor:
    """Per-token KL(policy || reference) estimate, same shape as the inputs (B, A)."""
    log_ratio = ref_logprobs - logprobs
    if estimator == "k1":
        return -log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio**2
    if estimator == "k3":
        return torch.expm1(log_ratio) - log_ratio
    raise ValueError(f"unknown KL estimator {estimator!r}: expected one of {KL_ESTIMATORS}")


def shape_rewards(scores: torch.Tensor, kl: torch.Tensor, beta: float, action_mask: torch.Tensor) -> torch.Tensor:
    """Per-token rewards: -beta * kl on every action token, plus the score on the last one.

    Args:
        scores: (B,) reward-model (or reward-function) score of each response.
        kl: (B, A) per-token KL estimate.
        beta: KL coefficient.
        action_mask: (B, A) bool prefix mask; a row with no action gets no score.

    Returns:
        rewards (B, A), 0 where masked out.
    """
    mask = action_mask.to(kl.dtype)
    rewards = -beta * kl * mask
    num_actions = action_mask.long().sum(dim=1)  # (B,)
    has_action = num_actions > 0
    last = (num_actions - 1).clamp(min=0)  # (B,) index of the last action token (the EOS if any)
    rows = torch.arange(rewards.shape[0], device=rewards.device)
    rewards[rows, last] += torch.where(
        has_action,
        scores.to(rewards.dtype),
        torch.zeros_like(scores, dtype=rewards.dtype),
    )
    return rewards


def kl_loss(
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    action_mask: torch.Tensor,
    estimator: str,
    *,
    loss_agg: str = "token_mean",
    max_length: int | None = None,
) -> torch.Tensor:
    """The KL term of a GRPO-style policy loss (Shao et al. 2024, eq. 3, which uses k3): the per-token
    ``estimator`` between the CURRENT policy's (B, A) ``logprobs`` (with gradient) and the reference's,
    aggregated like the policy loss (``aggregate_loss``: a token mean by default). The caller weights
    it by beta."""
    kl = kl_estimate(logprobs, ref_logprobs, estimator)
    return aggregate_loss(kl, action_mask, loss_agg, max_length=max_length)


class FixedKLController:
    """A constant KL coefficient."""

    def __init__(self, beta: float):
        self.value = beta

    def update(self, current_kl: float, n_steps: int) -> None:
        """A fixed coefficient does not move."""


class AdaptiveKLController:
    """Proportional controller that steers the observed KL towards ``target``.

    error = clip(KL / target - 1, -0.2, 0.2); beta <- beta * (1 + error * n_steps / horizon)
    (Ziegler et al. 2019, section 2.2).
    """

    def __init__(self, *, beta: float, target: float, horizon: int) -> None:
        self.value = beta
        self.target = target
        self.horizon = horizon

    def update(self, current_kl: float, n_steps: int) -> None:
        """Move the coefficient after a PPO step that saw ``n_steps`` samples with mean KL ``current_kl``."""
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon


def make_kl_controller(
    controller: str, *, beta: float, target: float | None, horizon: int | None
) -> FixedKLController | AdaptiveKLController:
    """``FixedKLController`` or ``AdaptiveKLController`` by name (config group ``kl``)."""
    if controller == "fixed":
        return FixedKLController(beta)
    if controller == "adaptive":
        return AdaptiveKLController(beta=beta, target=target, horizon=horizon)
    raise ValueError(f"unknown KL controller {controller!r}: expected 'fixed' or 'adaptive'")
