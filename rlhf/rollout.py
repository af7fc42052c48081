"""Rollout: chat-template the prompts, sample responses with the actor, cut them after EOS."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase


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


def format_prompts(tokenizer: PreTrainedTokenizerBase, prompts: list[str]) -> list[str]:
    """Each prompt as one user turn of the tokenizer's chat template (or bos + prompt without one)."""
    if tokenizer.chat_template is None:
        bos = tokenizer.bos_token or ""
        return [bos + p for p in prompts]
    return [
        tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
        for p in prompts
    ]


def encode_prompts(
    tokenizer: PreTrainedTokenizerBase, prompts: list[str], max_prompt_length: int
) -> dict[str, torch.Tensor]:
    """Left-padded input ids and attention mask; empty or overlong prompts raise naming the index."""
    for i, prompt in enumerate(prompts):
        if not prompt.strip():
            raise ValueError(f"prompt {i} is empty")
    texts = format_prompts(tokenizer, prompts)
    encoded = tokenizer(
        texts, add_special_tokens=False, padding=True, return_tensors="pt", return_token_type_ids=False
    )
    lengths = encoded["attention_mask"].sum(dim=1)
    too_long = (lengths > max_prompt_length).nonzero().flatten().tolist()
    if too_long:
        first = too_long[0]
        raise ValueError(
            f"{len(too_long)} prompt(s) exceed data.max_prompt_length={max_prompt_length} tokens after the chat "
            f"template; the first is prompt {first} ({int(lengths[first])} tokens): {prompts[first]!r}"
        )
    return encoded


def action_mask_after_eos(responses: torch.Tensor, eos_token_id: int) -> torch.Tensor:
    """(B, A) bool: True up to and including the first EOS of each row (every position if none)."""
    is_eos = responses == eos_token_id
    # Number of EOS strictly before each position: a position is an action while it is 0.
    eos_before = torch.cumsum(is_eos.long(), dim=1) - is_eos.long()
    return eos_before == 0


@torch.no_grad()
def generate(
    actor: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    max_new_tokens: int,
    temperature: float,
    max_prompt_length: int,
    do_sample: bool = True,
    synced: bool = False,
) -> Samples:
    """Sample one response per prompt from the actor's exact distribution (no top-k / top-p).

    ``synced``: the actor is sharded over the ranks (FSDP, ZeRO-3), so each of its forwards is a collective;
    every rank keeps stepping until all have finished their responses."""
    encoded = encode_prompts(tokenizer, prompts, max_prompt_length).to(actor.device)
    config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=do_sample,
        temperature=temperature if do_sample else None,
        top_k=0 if do_sample else None,
        top_p=1.0 if do_sample else None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        use_cache=True,
    )
    was_training = actor.training
    actor.eval()
    # (B, P + A') with A' <= max_new_tokens
    output = actor.generate(**encoded, generation_config=config, synced_gpus=synced)
    actor.train(was_training)
    num_prompt = encoded["input_ids"].shape[1]
    responses = output[:, num_prompt:]  # (B, A)
    action_mask = action_mask_after_eos(responses, tokenizer.eos_token_id)
    responses = responses.masked_fill(~action_mask, tokenizer.pad_token_id)
    has_eos = ((responses == tokenizer.eos_token_id) & action_mask).any(dim=1)
    sequences = torch.cat([encoded["input_ids"], responses], dim=1)
    attention_mask = torch.cat([encoded["attention_mask"], action_mask.long()], dim=1)
    return Samples(
        sequences=sequences,
        attention_mask=attention_mask,
        action_mask=action_mask,
        num_actions=responses.shape[1],
        response_length=action_mask.sum(dim=1).float(),
        total_length=attention_mask.sum(dim=1).float(),
        truncated=~has_eos,
        prompts=list(prompts),
        responses=tokenizer.batch_decode(responses, skip_special_tokens=True),
    )
