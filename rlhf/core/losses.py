"""PPO losses over action tokens: clipped policy surrogate, (clipped) value loss, entropy, and how a
(B, A) matrix of per-token losses becomes one number (``aggregate_loss``).

Schulman et al. 2017, "Proximal Policy Optimization Algorithms", with the variants LLM recipes sweep:
asymmetric clipping (Yu et al. 2025, "DAPO"), dual clipping (Ye et al. 2020, "Mastering Complex
Control in MOBA Games with Deep Reinforcement Learning") and length-unbiased aggregation (Liu et al.
2025, "Understanding R1-Zero-Like Training", Dr. GRPO). All tensors are (B, A) over response positions.
"""

from __future__ import annotations

import torch

from rlhf.core.masked import masked_mean, masked_sum

# ppo.loss_agg: how per-token losses are averaged. rlhf.config.options keeps the same names (the core
# never imports the config); tests/test_ppo_knobs.py checks that the two agree.
LOSS_AGGREGATIONS = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum")


def aggregate_loss(
    losses: torch.Tensor, action_mask: torch.Tensor, mode: str, *, max_length: int | None = None
) -> torch.Tensor:
    """One number from (B, A) per-token ``losses`` over the True positions of ``action_mask``.

    - ``token_mean``: sum over every action token of the mini-batch / their count (PPO's usual
      form): each token weighs the same, so a long response weighs more than a short one.
    - ``seq_mean_token_mean``: each response's token mean, then the mean over responses (GRPO,
      Shao et al. 2024): each response weighs the same, so a token of a short one weighs more.
    - ``seq_mean_token_sum``: each response's token sum divided by the constant ``max_length``
      (rollout.max_new_tokens), then the mean over responses (Dr. GRPO, Liu et al. 2025): each
      token weighs the same whatever its response's length, with a scale that does not depend on
      the batch.

    A row with no action (a sample dropped for a non-finite score) counts in no mean; with none
    left the loss is 0.
    """
    if mode == "token_mean":
        return masked_mean(losses, action_mask)
    lengths = action_mask.sum(dim=1)  # (B,)
    sums = masked_sum(losses, action_mask, dim=1)  # (B,)
    if mode == "seq_mean_token_mean":
        per_sequence = sums / lengths.clamp(min=1)
    elif mode == "seq_mean_token_sum":
        if max_length is None or max_length < 1:
            raise ValueError(f"loss_agg=seq_mean_token_sum needs max_length >= 1, got {max_length!r}")
        per_sequence = sums / max_length
    else:
        raise ValueError(f"unknown loss aggregation {mode!r}: expected one of {LOSS_AGGREGATIONS}")
    return masked_mean(per_sequence, lengths > 0)


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    action_mask: torch.Tensor,
    clip_eps: float,
    *,
    clip_eps_low: float | None = None,
    clip_eps_high: float | None = None,
    dual_clip_c: float | None = None,
    loss_agg: str = "token_mean",
    max_length: int | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped surrogate: -agg(min(r * A, clip(r, 1 - low, 1 + high) * A)), r = exp(logprob - old).

    ``low``/``high`` are ``clip_eps_low``/``clip_eps_high``, each ``clip_eps`` when None (DAPO's
    clip-higher raises ``high`` alone, so unlikely tokens can gain probability). ``dual_clip_c``: see
    ``dual_clip``. ``agg`` is ``aggregate_loss(.., loss_agg, max_length=max_length)``.

    Returns the loss and detached stats: ``clipfrac`` (share of tokens where the clipped term is the
    one taken), ``approx_kl`` (k3 estimate of KL(old || new)), ``ratio`` (mean) and ``ratio_max_dev``
    (max |r - 1|, exactly 0 on the first mini-batch of a step); with ``dual_clip_c``, ``dual_clipfrac``
    (share of tokens where the bound -c * A is the loss). Statistics are token means whatever
    ``loss_agg``.

    The tokens were sampled from the old policy, so the unbiased k3 estimator of KL(old || new) takes
    r = new / old: (r - 1) - log r (Schulman 2020, "Approximating KL Divergence").
    """
    low = clip_eps if clip_eps_low is None else clip_eps_low
    high = clip_eps if clip_eps_high is None else clip_eps_high
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - low, 1.0 + high)
    losses = torch.maximum(unclipped, clipped)
    stats = {}
    if dual_clip_c is not None:
        losses, bounded = dual_clip(losses, advantages, dual_clip_c)
        stats["dual_clipfrac"] = masked_mean(bounded.to(ratio.dtype), action_mask)
    loss = aggregate_loss(losses, action_mask, loss_agg, max_length=max_length)
    with torch.no_grad():
        stats.update(
            {
                "clipfrac": masked_mean((clipped > unclipped).to(ratio.dtype), action_mask),
                "approx_kl": masked_mean(torch.expm1(log_ratio) - log_ratio, action_mask),
                "ratio": masked_mean(ratio, action_mask),
                "ratio_max_dev": torch.where(action_mask, (ratio - 1).abs(), torch.zeros_like(ratio)).max(),
            }
        )
    return loss, stats


def dual_clip(losses: torch.Tensor, advantages: torch.Tensor, c: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, A) clipped PPO ``losses`` with those of negative ``advantages`` bounded by -c * A (Ye et al.
    2020: max(min(r A, clip(r) A), c A) for A < 0), and the (B, A) bool of where the bound is taken."""
    bound = -c * advantages  # > 0 where A < 0
    bounded = (advantages < 0) & (losses > bound)
    return torch.where(bounded, bound, losses), bounded


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    action_mask: torch.Tensor,
    clip_eps: float | None,
    *,
    loss_agg: str = "token_mean",
    max_length: int | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """0.5 * agg((V - R)^2), or 0.5 * agg(max((V - R)^2, (V_clip - R)^2)) when ``clip_eps`` is set,
    ``agg`` being ``aggregate_loss(.., loss_agg, max_length=max_length)``.

    V_clip = old_V + clip(V - old_V, -eps, eps). Stats: ``clipfrac`` (share of tokens where the
    clipped error is the larger one; 0 when clipping is off).
    """
    unclipped = (values - returns) ** 2
    if clip_eps is None:
        loss = 0.5 * aggregate_loss(unclipped, action_mask, loss_agg, max_length=max_length)
        clipfrac = torch.zeros((), dtype=values.dtype, device=values.device)
    else:
        values_clipped = old_values + torch.clamp(values - old_values, -clip_eps, clip_eps)
        clipped = (values_clipped - returns) ** 2
        loss = 0.5 * aggregate_loss(torch.maximum(unclipped, clipped), action_mask, loss_agg, max_length=max_length)
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
