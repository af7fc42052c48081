"""Per-action outputs of a causal LM: position ids and the logits that predict the response tokens."""

from __future__ import annotations

import inspect

import torch
from torch import nn
from transformers import (
    PreTrainedModel,
)


def position_ids_from(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, T) positions counting only real tokens, so left padding does not shift them."""
    return (attention_mask.long().cumsum(dim=1) - 1).clamp(min=0)


def action_logits(
    model: PreTrainedModel, sequences: torch.Tensor, attention_mask: torch.Tensor, num_actions: int, temperature: float
) -> torch.Tensor:
    """Temperature-scaled logits that predict the response tokens: (B, A, V), float32.

    Position t of the sequence predicts token t + 1, so the A response tokens at T - A .. T - 1
    are predicted by positions T - A - 1 .. T - 2. Models that take ``logits_to_keep`` (transformers'
    causal LMs) compute the LM head on those last A + 1 positions only, not on the prompt.
    """
    keep = {"logits_to_keep": num_actions + 1} if _takes_logits_to_keep(model) else {}
    logits = model(
        input_ids=sequences, attention_mask=attention_mask, position_ids=position_ids_from(attention_mask), **keep
    ).logits  # (B, A + 1, V), or (B, T, V)
    logits = logits[:, -num_actions - 1 : -1]  # (B, A, V): position t predicts token t + 1
    return logits.to(torch.float32) / temperature


def _takes_logits_to_keep(model: nn.Module) -> bool:
    model = getattr(model, "module", model)  # through DistributedDataParallel
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # through a peft wrapper
    return "logits_to_keep" in inspect.signature(base.forward).parameters
