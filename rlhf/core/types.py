"""The containers passed between stages: what the rollout knows (``Samples``) and what PPO
needs (``Experience``). Torch only, so every stage can import them."""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch


@dataclass
class Samples:
    """What the rollout knows. B samples, P prompt positions (left-padded), A response positions."""

    sequences: torch.Tensor  # (B, T) prompt (left-padded) then response (right-padded), T = P + A
    attention_mask: torch.Tensor  # (B, T) 1 for real prompt tokens and actions, 0 for padding
    action_mask: torch.Tensor  # (B, A) bool, True for response tokens up to and including the first EOS
    num_actions: int  # A
    response_length: torch.Tensor  # (B,) float, number of actions per row
    total_length: torch.Tensor  # (B,) float, real prompt tokens + actions per row
    truncated: torch.Tensor  # (B,) bool, True when the response hit max_new_tokens without EOS
    prompts: list[str]  # the B raw prompts (before the chat template)
    responses: list[str]  # the B decoded responses, special tokens removed
    group_ids: torch.Tensor | None = None  # (B,) long: samples of one prompt (rollout.n of them) share an id
    baseline_scores: torch.Tensor | None = None  # (B,) remax: greedy response's score (raw, then trained-on)


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
    rewards: torch.Tensor  # (B, A) -beta * kl on every action (kl.mode=reward), plus the score on the last one
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
