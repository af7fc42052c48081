"""Experience: everything PPO needs about a rollout, computed once without gradients.

Numbers come from the pure math modules (``rlhf.kl``, ``rlhf.gae``, ``rlhf.masked``); this module
only runs the models and puts the results in place.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from rlhf.gae import compute_gae
from rlhf.kl import kl_estimate, shape_rewards
from rlhf.losses import logprobs_from_logits
from rlhf.masked import masked_whiten
from rlhf.models import action_logits, action_values
from rlhf.rollout import Samples


@dataclass
class Experience:
    """What PPO needs. B samples, T = P + A sequence positions, A response positions."""

    sequences: torch.Tensor  # (B, T) prompt (left-padded) then response (right-padded)
    attention_mask: torch.Tensor  # (B, T) 1 for real tokens
    action_mask: torch.Tensor  # (B, A) bool, True for response tokens up to and including EOS
    old_logprobs: torch.Tensor  # (B, A) log pi_old(a_t | s_t) of the actor that sampled
    ref_logprobs: torch.Tensor  # (B, A) log pi_ref(a_t | s_t) of the frozen reference
    old_values: torch.Tensor  # (B, A) V(s_t) of the critic before the update
    kl: torch.Tensor  # (B, A) per-token KL estimate (kl.estimator) to the reference
    scores: torch.Tensor  # (B,) reward of each response (after any missing-EOS penalty)
    rewards: torch.Tensor  # (B, A) -beta * kl on every action, plus the score on the last one
    advantages: torch.Tensor  # (B, A) GAE advantages (whitened if configured), 0 where masked
    returns: torch.Tensor  # (B, A) advantages + values before whitening: the critic's targets

    def select(self, index: torch.Tensor) -> Experience:
        """The rows ``index`` (a mini-batch), every field sliced the same way."""
        return Experience(**{f.name: getattr(self, f.name)[index] for f in fields(self)})

    def trim_padding(self) -> Experience:
        """Without the leading columns that are padding in every row. Prompts are left-padded to
        the longest of the whole rollout; a mini-batch needs only its own longest. Positions come
        from the attention mask, so what the models compute is unchanged."""
        first = int(self.attention_mask.any(dim=0).int().argmax())  # the first column with a real token
        if first == 0:
            return self
        trimmed = {"sequences": self.sequences[:, first:], "attention_mask": self.attention_mask[:, first:]}
        return Experience(**{f.name: trimmed.get(f.name, getattr(self, f.name)) for f in fields(self)})


@torch.no_grad()
def compute_logprobs(model, samples: Samples, temperature: float) -> torch.Tensor:
    """(B, A) log-probs of the sampled response tokens under ``model``."""
    logits = action_logits(model, samples.sequences, samples.attention_mask, samples.num_actions, temperature)
    return logprobs_from_logits(logits, samples.sequences[:, -samples.num_actions :])


@torch.no_grad()
def compute_values(critic, samples: Samples) -> torch.Tensor:
    """(B, A) values V(s_t) of the states before each response token under ``critic``."""
    return action_values(critic, samples.sequences, samples.attention_mask, samples.num_actions)


@torch.no_grad()
def make_experience(
    samples: Samples,
    scores: torch.Tensor,
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    values: torch.Tensor,
    kl_coef: float,
    kl_estimator: str,
    gamma: float,
    lam: float,
    whiten_rewards: bool,
    whiten_advantages: bool,
    advantage_clip: float | None = None,
) -> Experience:
    """KL, shaped rewards, advantages and returns from the rollout's forwards (``compute_logprobs``
    of the actor and the reference, ``compute_values`` of the critic); padding zeroed everywhere."""
    mask = samples.action_mask
    old_logprobs, ref_logprobs, old_values = logprobs * mask, ref_logprobs * mask, values * mask
    kl = kl_estimate(old_logprobs, ref_logprobs, kl_estimator) * mask
    rewards = shape_rewards(scores.to(kl.device), kl, kl_coef, mask)
    if whiten_rewards:
        rewards = masked_whiten(rewards, mask, keep_mean=True)
    advantages, returns = compute_gae(rewards, old_values, mask, gamma, lam)
    if whiten_advantages:
        advantages = masked_whiten(advantages, mask)
    if advantage_clip is not None:
        advantages = advantages.clamp(-advantage_clip, advantage_clip)
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
