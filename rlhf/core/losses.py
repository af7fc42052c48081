"""PPO losses over action tokens: clipped policy surrogate, (clipped) value loss, entropy.

Schulman et al. 2017, "Proximal Policy Optimization Algorithms". All tensors are (B, A) over
response positions; means are taken over all action tokens of the mini-batch (token-level mean).
"""

from __future__ import annotations

import torch

from rlhf.core.masked import masked_mean


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    action_mask: torch.Tensor,
    clip_eps: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped surrogate: -mean(min(r * A, clip(r, 1 - eps, 1 + eps) * A)), r = exp(logprob - old).

    Returns the loss and detached stats: ``clipfrac`` (share of tokens where the clipped term is the
    one taken), ``approx_kl`` (k3 estimate of KL(old || new)), ``ratio`` (mean) and ``ratio_max_dev``
    (max |r - 1|, exactly 0 on the first mini-batch of a step).

    The tokens were sampled from the old policy, so the unbiased k3 estimator of KL(old || new) takes
    r = new / old: (r - 1) - log r (Schulman 2020, "Approximating KL Divergence").
    """
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
    loss = masked_mean(torch.maximum(unclipped, clipped), action_mask)
    with torch.no_grad():
        stats = {
            "clipfrac": masked_mean((clipped > unclipped).to(ratio.dtype), action_mask),
            "approx_kl": masked_mean(torch.expm1(log_ratio) - log_ratio, action_mask),
            "ratio": masked_mean(ratio, action_mask),
            "ratio_max_dev": torch.where(action_mask, (ratio - 1).abs(), torch.zeros_like(ratio)).max(),
        }
    return loss, stats


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    action_mask: torch.Tensor,
    clip_eps: float | None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """0.5 * mean((V - R)^2), or 0.5 * mean(max((V - R)^2, (V_clip - R)^2)) when ``clip_eps`` is set.

    V_clip = old_V + clip(V - old_V, -eps, eps). Stats: ``clipfrac`` (share of tokens where the
    clipped error is the larger one; 0 when clipping is off).
    """
    unclipped = (values - returns) ** 2
    if clip_eps is None:
        loss = 0.5 * masked_mean(unclipped, action_mask)
        clipfrac = torch.zeros((), dtype=values.dtype, device=values.device)
    else:
        values_clipped = old_values + torch.clamp(values - old_values, -clip_eps, clip_eps)
        clipped = (values_clipped - returns) ** 2
        loss = 0.5 * masked_mean(torch.maximum(unclipped, clipped), action_mask)
        clipfrac = masked_mean((clipped > unclipped).to(values.dtype), action_mask).detach()
    return loss, {"clipfrac": clipfrac}


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the categorical distribution at each position: (..., V) -> (...)."""
    logp = torch.log_softmax(logits, dim=-1)
    return -(logp.exp() * logp).sum(dim=-1)


def logprobs_from_logits(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log p(token) under ``logits``: (B, A, V) and (B, A) -> (B, A)."""
    logp = torch.log_softmax(logits, dim=-1)
    return torch.gather(logp, -1, tokens.unsqueeze(-1)).squeeze(-1)


def bradley_terry_loss(chosen_scores: torch.Tensor, rejected_scores: torch.Tensor) -> torch.Tensor:
    """Reward-model loss on preference pairs: -mean(log sigmoid(r_chosen - r_rejected)), scores (B,).

    Bradley and Terry 1952; the pairwise loss of Ouyang et al. 2022 ("Training language models to
    follow instructions with human feedback", eq. 1) with one comparison per prompt. ``logsigmoid``
    keeps it finite for large margins, where ``log(sigmoid(x))`` would give -inf.
    """
    return -torch.nn.functional.logsigmoid(chosen_scores - rejected_scores).mean()
