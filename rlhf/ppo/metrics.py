"""Metrics of PPO: one iteration's scores, values and rollout statistics, its samples and token
debug tables, and the run's final summary."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from rlhf.core.masked import masked_mean, masked_var
from rlhf.core.types import Experience, Samples

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


def token_debug_rows(
    samples: Samples, exp: Experience, tokenizer: PreTrainedTokenizerBase, num_samples: int
) -> list[dict]:
    """One row per action token of the first ``num_samples`` samples: the view that exposes
    off-by-one and padding bugs (the score must sit on the EOS row, nothing after it)."""
    rows = []
    responses = samples.sequences[:, -samples.num_actions :]
    for i in range(min(num_samples, responses.shape[0])):
        for t in range(int(exp.action_mask[i].sum())):
            rows.append(
                {
                    "sample": i,
                    "position": t,
                    "token": tokenizer.decode([int(responses[i, t])]),
                    "logprob": exp.old_logprobs[i, t].item(),
                    "ref_logprob": exp.ref_logprobs[i, t].item(),
                    "kl": exp.kl[i, t].item(),
                    "value": exp.old_values[i, t].item(),
                    "reward": exp.rewards[i, t].item(),
                    "advantage": exp.advantages[i, t].item(),
                    "return": exp.returns[i, t].item(),
                }
            )
    return rows


def sample_rows(samples: Samples, *, raw_scores: torch.Tensor, scores: torch.Tensor, num: int) -> list[dict]:
    """(prompt, response, score, score_normalized) of the first ``num`` samples of a rollout: the
    score in the reward's own units (``raw_scores``, (B,)), and the training reward after
    ``reward.normalize``/``clip`` (``scores``, (B,))."""
    return [
        {
            "prompt": samples.prompts[i],
            "response": samples.responses[i],
            "score": raw_scores[i].item(),
            "score_normalized": scores[i].item(),
        }
        for i in range(min(num, len(samples.prompts)))
    ]


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> float:
    """1 - Var[returns - values] / Var[returns] over action tokens (1 is perfect, <= 0 is useless).

    One rollout's figure is ill-conditioned when its returns hardly vary (every answer right, only
    the KL penalty left): a critic right in expectation then scores far below 0. ``health/explained_var``
    pools the two variances over several rollouts (``rlhf.runtime.health``)."""
    var_returns = masked_var(returns, mask)
    return float(1.0 - masked_var(returns - values, mask) / var_returns.clamp(min=1e-8))


def score_metrics(*, raw_scores: torch.Tensor, scores: torch.Tensor, finite: torch.Tensor) -> dict[str, float]:
    """Mean and std of the rollout's scores over the samples with a finite score: ``objective/scores*``
    in the reward's own units (``raw_scores``, (B,)), ``objective/scores_normalized*`` as trained on
    (``scores``, (B,), after ``reward.normalize`` and ``reward.clip``)."""

    def mean_std(values: torch.Tensor) -> tuple[float, float]:
        return values.mean().item(), values.std().item() if len(values) > 1 else 0.0

    raw_mean, raw_std = mean_std(raw_scores[finite])
    normalized_mean, normalized_std = mean_std(scores[finite.to(scores.device)])
    return {
        "objective/scores": raw_mean,
        "objective/scores_std": raw_std,
        "objective/scores_normalized": normalized_mean,
        "objective/scores_normalized_std": normalized_std,
        "objective/nonfinite_scores": int((~finite).sum()),
    }


def gold_metrics(*, gold_scores: torch.Tensor, raw_scores: torch.Tensor) -> dict[str, float]:
    """The task's gold reward of a rollout ((B,) ``gold_scores``) beside the reward trained on ((B,)
    ``raw_scores``): the gold's mean and std, and the Pearson correlation of the two over the samples
    with a finite score (NaN when either is constant)."""
    finite = raw_scores.isfinite()
    gold, raw = gold_scores[finite].double(), raw_scores[finite].double()
    corr = torch.corrcoef(torch.stack([gold, raw]))[0, 1].item() if len(gold) > 1 else math.nan
    return {
        "objective/gold_scores": gold_scores.mean().item(),
        "objective/gold_scores_std": gold_scores.std().item() if len(gold_scores) > 1 else 0.0,
        "objective/proxy_gold_corr": corr,
    }


def value_metrics(*, values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> dict[str, float]:
    """The critic's (B, A) values against the (B, A) returns over action tokens: explained variance,
    the two variances it is made of (pooled over rollouts by ``health/explained_var``) and the means."""
    return {
        "val/explained_var": explained_variance(values, returns, mask),
        "val/returns_var": masked_var(returns, mask).item(),
        "val/residual_var": masked_var(returns - values, mask).item(),
        "val/values_mean": masked_mean(values, mask).item(),
        "val/returns_mean": masked_mean(returns, mask).item(),
    }


def rollout_metrics(samples: Samples, exp: Experience, kl_coef: float, *, critic: bool = True) -> dict[str, float]:
    """Objective, KL, advantage and rollout statistics of one batch (and the critic's, when there is one)."""
    mask = exp.action_mask
    k1 = (exp.old_logprobs - exp.ref_logprobs) * mask
    num_tokens = mask.sum().clamp(min=1)
    return {
        "objective/rlhf_reward": exp.rewards.sum(dim=1).mean().item(),
        "objective/kl": k1.sum(dim=1).mean().item(),
        "objective/kl_per_token": (k1.sum() / num_tokens).item(),
        "objective/kl_penalty": exp.kl.sum(dim=1).mean().item(),
        "objective/kl_coef": kl_coef,
        "objective/entropy": (-exp.old_logprobs * mask).sum(dim=1).mean().item(),
        "objective/neg_kl_frac": ((k1 < 0) & mask).sum().item() / num_tokens.item(),
        # the values before the update
        **(value_metrics(values=exp.old_values, returns=exp.returns, mask=mask) if critic else {}),
        "adv/mean": masked_mean(exp.advantages, mask).item(),
        "adv/std": masked_var(exp.advantages, mask).sqrt().item(),
        "rollout/response_length": samples.response_length.mean().item(),
        "rollout/eos_rate": 1.0 - samples.truncated.float().mean().item(),
    }


def summarize(
    initial: dict[str, float], history: list[dict[str, float]], *, seconds: float, kl_weight: float
) -> dict[str, float]:
    """Final figures of a run (the W&B summary and status.json), and the sweep objective:
    final held-out reward - kl_weight * final held-out KL (``final/eval_kl``: the same prompts and
    policy as the reward; ``final/kl`` is the last training batch's). ``initial`` holds step 0's
    evaluation, ``history`` each later step's metrics."""
    evals = [m for m in [initial, *history] if "eval/score" in m]
    last = history[-1] if history else {}
    summary = {
        "initial/eval_score": initial["eval/score"],
        "initial/eval_score_greedy": initial["eval/score_greedy"],
        "final/eval_score": evals[-1]["eval/score"],
        "final/eval_score_greedy": evals[-1]["eval/score_greedy"],
        # nan only for a run that had finished before eval/kl was logged and is resumed without new steps
        "final/eval_kl": evals[-1].get("eval/kl", math.nan),
        "best/eval_score": max(m["eval/score"] for m in evals),
        "final/kl": last.get("objective/kl", 0.0),
        "final/scores": last.get("objective/scores", math.nan),
        "final/value_loss": last.get("loss/value", math.nan),
        "mean/policy_clipfrac": sum(m["policy/clipfrac"] for m in history) / max(len(history), 1),
        "time/total": seconds,
    }
    if "eval/gold_score" in initial:  # a task with a hidden gold reward (data.task=reviews)
        summary["initial/eval_gold_score"] = initial["eval/gold_score"]
        summary["final/eval_gold_score"] = evals[-1]["eval/gold_score"]
        summary["best/eval_gold_score"] = max(m["eval/gold_score"] for m in evals)
    summary["objective"] = summary["final/eval_score"] - kl_weight * summary["final/eval_kl"]
    return summary
