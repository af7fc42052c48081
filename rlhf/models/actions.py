"""Per-action outputs of a causal LM: position ids, the logits that predict the response tokens, and their
log-probs and entropy (over a large vocabulary a chunk of tokens at a time, ``hardware.logits_chunk_tokens``)."""

from __future__ import annotations

import inspect

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from transformers import (
    PreTrainedModel,
)

from rlhf.core.losses import entropy_from_logits, logprobs_from_logits
from rlhf.core.vocab_chunks import chunked_logprobs_entropy
from rlhf.models.loading import AdapterDisabledReference

# Causal LMs whose logits are exactly lm_head(last hidden state), with no soft-capping or scaling after the
# head (Gemma 2's final_logit_softcapping, Cohere's logit_scale, Granite's logits_scaling are), so the chunked
# path can stand in for the head. Any other class, and FSDP2-sharded ones (their class name gets an FSDP
# prefix), take the plain path.
PLAIN_HEAD_CLASSES = frozenset({"Qwen2ForCausalLM", "Qwen3ForCausalLM", "LlamaForCausalLM", "MistralForCausalLM"})
# hardware.logits_chunk_tokens=auto chunks models with a vocabulary at least this large (Qwen2.5: 151,936;
# the tiny models' ~40 tokens stay on the plain path, bitwise as before) ...
AUTO_MIN_VOCAB = 32_768
# ... by this many tokens: (256, 151,936) float32 logits are 156 MB per temporary (benchmarks/vocab_chunks.py:
# 64 to 1024 tokens ran equally fast there, peak RSS grew with the chunk).
AUTO_CHUNK_TOKENS = 256


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


def action_logprobs(
    model: nn.Module,
    sequences: torch.Tensor,
    attention_mask: torch.Tensor,
    num_actions: int,
    *,
    temperature: float,
    logits_chunk_tokens: str | None = None,
    entropy: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(B, A) float32 log-probs of the response tokens and, with ``entropy``, the (B, A) entropy of each
    position's distribution (else None), at ``temperature``. ``logits_chunk_tokens`` is
    ``hardware.logits_chunk_tokens`` (see ``chunk_tokens_for``): with chunks, the LM head and the
    log-softmax run a chunk of tokens at a time (``rlhf.core.vocab_chunks``) and no (B, A, V) logits exist."""
    tokens = sequences[:, -num_actions:]  # (B, A)
    chunk_tokens = chunk_tokens_for(model, logits_chunk_tokens)
    if chunk_tokens == 0:
        logits = action_logits(model, sequences, attention_mask, num_actions, temperature)  # (B, A, V)
        return logprobs_from_logits(logits, tokens), entropy_from_logits(logits) if entropy else None
    head = plain_head_model(model).get_output_embeddings()
    hidden = _action_hidden_states(model, sequences, attention_mask, num_actions)  # (B, A, H)
    logprobs, token_entropy = chunked_logprobs_entropy(
        hidden.reshape(-1, hidden.shape[-1]),
        head.weight,  # tied to the input embeddings in tied models: its gradient adds to theirs
        tokens.reshape(-1),
        temperature=temperature,
        chunk_tokens=chunk_tokens,
        bias=head.bias,
        # compiled element-wise kernels: ~6 s once, then 11x faster softmax work per chunk over a real vocabulary
        fused=head.weight.shape[0] >= AUTO_MIN_VOCAB,
    )
    logprobs, token_entropy = logprobs.float().view(tokens.shape), token_entropy.float().view(tokens.shape)
    return logprobs, token_entropy if entropy else None


def chunk_tokens_for(model: nn.Module, setting: str | None) -> int:
    """Tokens per chunk of logits for ``model`` under ``hardware.logits_chunk_tokens`` (``setting``), 0 for the
    plain path: None or "0" -> 0; "auto" -> ``AUTO_CHUNK_TOKENS`` when the vocabulary has at least
    ``AUTO_MIN_VOCAB`` tokens, else 0; a positive integer -> that many. A model the chunked path cannot
    stand in for (``plain_head_model`` is None) takes the plain path."""
    if setting is None or str(setting) == "0":
        return 0
    lm = plain_head_model(model)
    if lm is None:
        return 0
    if str(setting) == "auto":
        return AUTO_CHUNK_TOKENS if lm.get_output_embeddings().weight.shape[0] >= AUTO_MIN_VOCAB else 0
    return int(setting)


def plain_head_model(model: nn.Module) -> PreTrainedModel | None:
    """The causal LM under ``model`` (through DistributedDataParallel, a LoRA reference and a peft wrapper)
    when its logits are a plain ``nn.Linear`` of its last hidden states (``PLAIN_HEAD_CLASSES``), else None:
    other wrappers (a DeepSpeed engine), FSDP2-sharded models and a LoRA-adapted LM head."""
    if isinstance(model, DistributedDataParallel):  # its forward keeps the gradient sync: call through it
        model = model.module
    if isinstance(model, AdapterDisabledReference):
        model = model.actor
    if hasattr(model, "get_base_model"):  # peft
        model = model.get_base_model()
    if type(model).__name__ not in PLAIN_HEAD_CLASSES:
        return None
    return model if type(model.get_output_embeddings()) is nn.Linear else None


def _action_hidden_states(
    model: nn.Module, sequences: torch.Tensor, attention_mask: torch.Tensor, num_actions: int
) -> torch.Tensor:
    """(B, A, H) last hidden states of the positions that predict the response tokens: ``model``'s own
    forward (through its wrappers: DDP's gradient sync, peft's adapters) with the LM head swapped for an
    identity for the call, so its "logits" are the hidden states."""
    lm = plain_head_model(model)
    head = lm.get_output_embeddings()
    lm.set_output_embeddings(nn.Identity())
    try:
        hidden = model(
            input_ids=sequences,
            attention_mask=attention_mask,
            position_ids=position_ids_from(attention_mask),
            logits_to_keep=num_actions + 1,
        ).logits  # (B, A + 1, H)
    finally:
        lm.set_output_embeddings(head)
    return hidden[:, -num_actions - 1 : -1]  # (B, A, H): position t predicts token t + 1
