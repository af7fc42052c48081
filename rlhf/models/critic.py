"""The critic: a backbone with a scalar value head, how it is built from the config's choice, and
its values at the response positions."""

from __future__ import annotations

import copy

import torch
from torch import nn
from transformers import (
    AutoModel,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from rlhf.models.actions import position_ids_from
from rlhf.models.loading import disable_dropout, loading, trunk_of


class Critic(nn.Module):
    """V(s): a transformer backbone plus a ``Linear(hidden, 1)`` value head on every position."""

    def __init__(self, backbone: nn.Module, hidden_size: int, value_head_std: float | None = None):
        super().__init__()
        self.backbone = backbone
        self.value_head = nn.Linear(hidden_size, 1)
        # Small init (std 1/(H+1) by default, 0 = all zeros) so the first values are near 0 and the
        # first value loss is on the returns' scale.
        std = 1.0 / (hidden_size + 1) if value_head_std is None else value_head_std
        nn.init.normal_(self.value_head.weight, std=std) if std > 0 else nn.init.zeros_(self.value_head.weight)
        nn.init.zeros_(self.value_head.bias)

    def forward(self, sequences: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, T) token ids -> (B, T) values; values[:, t] estimates the return after token t."""
        hidden = self.backbone(
            input_ids=sequences, attention_mask=attention_mask, position_ids=position_ids_from(attention_mask)
        ).last_hidden_state  # (B, T, H)
        # A new tensor rather than a view of the head's output: FSDP2 cannot track in-place changes to views.
        return self.value_head(hidden).squeeze(-1).to(torch.float32, copy=True)


def shares_vocabulary(
    tokenizer: PreTrainedTokenizerBase, path: str, trust_remote_code: bool = False, key: str = "reward.path"
) -> bool:
    """Whether the tokenizer at ``path`` maps each of its tokens to the id the actor's tokenizer gives it
    (the actor's may have more: an added pad token). Loads the tokenizer only, not the model."""
    with loading(key, path):
        other_vocab = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code).get_vocab()
    actor_vocab = tokenizer.get_vocab()
    return all(actor_vocab.get(token) == index for token, index in other_vocab.items())


def build_critic(
    actor: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    *,
    init: str = "actor",
    shared: bool = False,
    path: str | None = None,
    value_head_std: float | None = None,
    trust_remote_code: bool = False,
) -> Critic:
    """The critic: a trunk plus a value head. The trunk is the actor's own (``shared``), a copy of it
    (``init="actor"``), or loaded from ``path`` (the reward model's, or any checkpoint). A loaded
    trunk reads the actor's token ids, so its tokenizer must have the actor's vocabulary
    (``shares_vocabulary``, checked before any model is loaded)."""
    if shared:
        backbone = trunk_of(actor)
    elif init == "actor":
        backbone = copy.deepcopy(trunk_of(actor))
    elif init in ("reward_model", "path"):
        key = "reward.path" if init == "reward_model" else "model.critic_path"
        with loading(key, path):
            backbone = AutoModel.from_pretrained(
                path,
                dtype=actor.dtype,
                trust_remote_code=trust_remote_code,
                # the actor's attention kernel (model.attn_implementation)
                attn_implementation=actor.config._attn_implementation,
            )
        if backbone.get_input_embeddings().num_embeddings < len(tokenizer):
            backbone.resize_token_embeddings(len(tokenizer))
        disable_dropout(backbone)
    else:
        raise ValueError(f"model.critic_init={init!r}: expected actor, reward_model or path")
    critic = Critic(backbone, backbone.config.hidden_size, value_head_std)
    return critic.to(device=actor.device, dtype=actor.dtype)


def action_values(
    critic: Critic, sequences: torch.Tensor, attention_mask: torch.Tensor, num_actions: int
) -> torch.Tensor:
    """V(s_t) before each response token: (B, A), read at the position that precedes it."""
    values = critic(sequences, attention_mask)  # (B, T)
    return values[:, -num_actions - 1 : -1]  # (B, A): the state before action t ends at t - 1
