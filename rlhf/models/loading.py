"""The four models: actor and reference (causal LMs), critic (backbone + value head), and the
forwards the loop needs from them (log-probs over response tokens, values).

Sequences are (B, T) with T = P + A: left-padded prompts of length P followed by A response
positions. Position ids come from the attention mask so left padding does not shift positions.
"""

from __future__ import annotations

import contextlib
import copy
import logging

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from rlhf.config.errors import InputError
from rlhf.config.options import DType

log = logging.getLogger(__name__)


# model.dtype / reward.dtype names (rlhf.config.options.DType) -> torch dtypes.
DTYPES = {dtype.value: getattr(torch, dtype.value) for dtype in DType}


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
    path: str, *, trust_remote_code: bool = False, add_pad_token: bool = True, key: str = "model.tokenizer_path"
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


def check_context_length(path: str, *, max_prompt_length: int, max_new_tokens: int, trust_remote_code: bool) -> None:
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
    path: str,
    *,
    dtype: str,
    trust_remote_code: bool = False,
    vocab_size: int | None = None,
    attn_implementation: str | None = None,
) -> PreTrainedModel:
    """A causal LM from a hub id or local folder (safetensors preferred), dropout off, its input
    embeddings grown to ``vocab_size`` when the tokenizer gained a token (a new pad); its attention kernel
    ``attn_implementation`` (None: transformers' default)."""
    with loading("model.path", path):
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=DTYPES[dtype], trust_remote_code=trust_remote_code, attn_implementation=attn_implementation
        )
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


def add_lora(model: PreTrainedModel, *, r: int, alpha: float, dropout: float, target_modules: list[str]) -> nn.Module:
    """The model with LoRA adapters (peft); only adapter weights require grad."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(target_modules), task_type="CAUSAL_LM"
    )
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
