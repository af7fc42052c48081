"""The four models: actor and reference (causal LMs), critic (backbone + value head), and the
forwards the loop needs from them (log-probs over response tokens, values).

Sequences are (B, T) with T = P + A: left-padded prompts of length P followed by A response
positions. Position ids come from the attention mask so left padding does not shift positions.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import logging

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from rlhf.config import InputError

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@contextlib.contextmanager
def loading(key: str, path: str):
    """Re-raise a failed checkpoint load naming the config key and path."""
    try:
        yield
    except OSError as error:
        hint = "a local folder needs config.json and the weights; a hub id needs the network (or the HF cache)"
        raise InputError(f"{key}={path!r} could not be loaded ({hint}): {error}") from error


PAD_TOKEN = "<|pad|>"


def load_tokenizer(
    path: str, trust_remote_code: bool = False, add_pad_token: bool = True, key: str = "model.tokenizer_path"
) -> PreTrainedTokenizerBase:
    """The actor's tokenizer, left-padding for generation.

    A tokenizer without a pad token gets a new ``<|pad|>`` when ``add_pad_token``; otherwise it is
    an error. (A pad equal to EOS is harmless here: the action mask comes from the first EOS, never
    from pad ids, so the EOS always stays an action.)
    """
    with loading(key, path):
        tokenizer = AutoTokenizer.from_pretrained(path, padding_side="left", trust_remote_code=trust_remote_code)
    if tokenizer.eos_token_id is None:
        raise ValueError(f"the tokenizer at {path!r} has no EOS token, so responses could never end")
    if tokenizer.pad_token_id is None:
        if not add_pad_token:
            raise InputError(
                f"the tokenizer at {path!r} has no pad token: give it one (distinct from EOS) or set "
                "model.add_pad_token=true"
            )
        tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
    return tokenizer


def check_context_length(path: str, max_prompt_length: int, max_new_tokens: int, trust_remote_code: bool) -> None:
    """Prompt plus response must fit the model's positions (read from its config, not its weights)."""
    with loading("model.path", path):
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    context = getattr(config, "max_position_embeddings", None)
    if context is not None and max_prompt_length + max_new_tokens > context:
        raise InputError(
            f"data.max_prompt_length={max_prompt_length} + rollout.max_new_tokens={max_new_tokens} = "
            f"{max_prompt_length + max_new_tokens} tokens exceeds the context of {path!r} ({context} positions)"
        )


def zero_dropout_config(config: PretrainedConfig) -> None:
    """Every dropout probability of a model config (and of the configs nested in it) set to 0.

    The rule: any attribute whose name contains "dropout" and holds a float (attention_dropout,
    hidden_dropout_prob, attention_probs_dropout_prob, classifier_dropout, pooler_dropout, ...)."""
    for name, value in list(vars(config).items()):
        if isinstance(value, PretrainedConfig):
            zero_dropout_config(value)
        elif "dropout" in name and isinstance(value, float):
            setattr(config, name, 0.0)


def disable_dropout(model: nn.Module) -> None:
    """PPO needs the same forward at sampling and at update time: no dropout anywhere.

    ``nn.Dropout`` modules are not the only dropout: Qwen2/Llama attention copies
    ``config.attention_dropout`` into a float attribute and passes it to the attention kernel in
    training mode (0.1 in a tiny Qwen2 checkpoint: max |ratio - 1| of the first mini-batch 0.013-0.022
    instead of < 1e-6). So every module's float attribute named like a dropout, and every config's, is
    zeroed too."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
        for name, value in list(vars(module).items()):
            if "dropout" in name and isinstance(value, float):
                setattr(module, name, 0.0)
        config = getattr(module, "config", None)
        if isinstance(config, PretrainedConfig):
            zero_dropout_config(config)


def load_actor(
    path: str, dtype: str, trust_remote_code: bool = False, vocab_size: int | None = None
) -> PreTrainedModel:
    """A causal LM from a hub id or local folder (safetensors preferred), dropout off, its input
    embeddings grown to ``vocab_size`` when the tokenizer gained a token (a new pad)."""
    with loading("model.path", path):
        model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[dtype], trust_remote_code=trust_remote_code)
    disable_dropout(model)
    if vocab_size is not None and vocab_size > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(vocab_size)
    # The checkpoint's generation_config (Qwen2.5's top_k, top_p, repetition_penalty, its EOS ids) stays
    # on the model and is saved with it; rollout.generate samples with neutral settings of its own.
    shipped = model.generation_config
    try:
        # save_pretrained refuses a changed config that fails this (the run changes its pad id): a
        # published one with, say, a temperature but do_sample=false would fail the final save.
        copy.deepcopy(shipped).validate(strict=True)
    except ValueError as error:
        log.warning("model.path=%r: its generation_config is not kept (it could not be saved back): %s", path, error)
        model.generation_config = GenerationConfig(
            bos_token_id=shipped.bos_token_id, eos_token_id=shipped.eos_token_id, pad_token_id=shipped.pad_token_id
        )
    return model


def add_lora(model: PreTrainedModel, r: int, alpha: float, dropout: float, target_modules: list[str]) -> nn.Module:
    """The model with LoRA adapters (peft); only adapter weights require grad."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(target_modules),
                        task_type="CAUSAL_LM")  # fmt: skip
    return get_peft_model(model, config)


class AdapterDisabledReference(nn.Module):
    """The reference policy of a LoRA actor: the same weights with the adapters switched off, so
    no second copy of the base model is held. The actor is not registered as a submodule."""

    def __init__(self, actor: nn.Module):
        super().__init__()
        object.__setattr__(self, "actor", actor)

    def forward(self, **inputs):
        with self.actor.disable_adapter():
            return self.actor(**inputs)


def trunk_of(actor: nn.Module) -> nn.Module:
    """The transformer trunk under the LM head (inside the peft wrapper for a LoRA actor)."""
    model = actor.get_base_model() if hasattr(actor, "get_base_model") else actor
    return model.base_model


def frozen_copy(model: nn.Module) -> nn.Module:
    """A deep copy with gradients off, in eval mode (the reference policy)."""
    ref = copy.deepcopy(model)
    ref.eval()
    ref.requires_grad_(False)
    return ref


def position_ids_from(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, T) positions counting only real tokens, so left padding does not shift them."""
    return (attention_mask.long().cumsum(dim=1) - 1).clamp(min=0)


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
            backbone = AutoModel.from_pretrained(path, dtype=actor.dtype, trust_remote_code=trust_remote_code)
        if backbone.get_input_embeddings().num_embeddings < len(tokenizer):
            backbone.resize_token_embeddings(len(tokenizer))
        disable_dropout(backbone)
    else:
        raise ValueError(f"model.critic_init={init!r}: expected actor, reward_model or path")
    critic = Critic(backbone, backbone.config.hidden_size, value_head_std)
    return critic.to(device=actor.device, dtype=actor.dtype)


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


def action_values(
    critic: Critic, sequences: torch.Tensor, attention_mask: torch.Tensor, num_actions: int
) -> torch.Tensor:
    """V(s_t) before each response token: (B, A), read at the position that precedes it."""
    values = critic(sequences, attention_mask)  # (B, T)
    return values[:, -num_actions - 1 : -1]  # (B, A): the state before action t ends at t - 1
