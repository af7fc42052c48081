"""Tiny models of the real presets' architectures, built locally and saved like hub checkpoints:
a Qwen2 causal LM with a byte-level Qwen2Tokenizer and ChatML template (Qwen2.5-Instruct), and a
DeBERTa-v2 sequence classifier with a sentencepiece tokenizer (reward-model-deberta-v3-large-v2)."""

from __future__ import annotations

import math
import string
from pathlib import Path
from typing import Any

import torch

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def save_tiny_qwen(
    path: Path,
    pad_token: str | None = "<|endoftext|>",
    generation: dict[str, Any] | None = None,
    uniform: bool = False,
    **config: Any,
) -> Path:
    """Qwen2ForCausalLM + Qwen2Tokenizer (256 byte tokens + ChatML specials) in one folder, as on the hub.

    ``config`` overrides Qwen2Config keys (``attention_dropout=0.1``); ``generation`` is saved as the
    checkpoint's generation_config (token names in its ``eos_token_id`` list become ids); ``uniform`` zeroes an untied
    LM head, so every token is sampled with probability 1/V."""
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM, Qwen2Tokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    vocab = {char: i for i, char in enumerate(bytes_to_unicode().values())}
    tokenizer = Qwen2Tokenizer(
        vocab=vocab, merges=[], unk_token=None, bos_token=None, eos_token="<|im_end|>", pad_token=pad_token,
        additional_special_tokens=["<|im_start|>", "<|im_end|>", "<|endoftext|>"],
    )  # fmt: skip
    tokenizer.chat_template = CHATML
    tokenizer.save_pretrained(path)
    config = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
        intermediate_size=64, tie_word_embeddings=not uniform, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, **config,
    )  # fmt: skip
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config)
    if uniform:
        torch.nn.init.zeros_(model.lm_head.weight)
    if generation is not None:
        names = generation.get("eos_token_id") or []
        eos = [tokenizer.convert_tokens_to_ids(t) if isinstance(t, str) else t for t in names]
        model.generation_config = GenerationConfig(**{**generation, "eos_token_id": eos or None})
    model.save_pretrained(path)
    return path


def qwen_token_ids(path: Path) -> dict[str, int]:
    """Ids of the ChatML specials of a ``save_tiny_qwen`` folder, as its tokenizer gives them."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    return {name: tokenizer.convert_tokens_to_ids(name) for name in ("<|im_start|>", "<|im_end|>", "<|endoftext|>")}


def save_tiny_deberta_reward_model(path: Path, work: Path) -> Path:
    """DebertaV2ForSequenceClassification (1 label) with a locally trained sentencepiece tokenizer."""
    import sentencepiece as spm
    from transformers import DebertaV2Config, DebertaV2ForSequenceClassification, DebertaV2Tokenizer

    work.mkdir(parents=True, exist_ok=True)
    corpus = work / "corpus.txt"
    lines = [f"What is {a}+{b}? The answer is {a + b}." for a in range(30) for b in range(30)]
    lines += [string.printable[:94]] * 20  # every printable ASCII character gets a piece: no [UNK] in prompts
    corpus.write_text("\n".join(lines))
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(work / "spm"), vocab_size=120, hard_vocab_limit=False,
        pad_id=0, unk_id=3, bos_id=1, eos_id=2, pad_piece="[PAD]", unk_piece="[UNK]", bos_piece="[CLS]",
        eos_piece="[SEP]", user_defined_symbols=["[MASK]"], character_coverage=1.0, minloglevel=2,
    )  # fmt: skip
    spm_dir = work / "spm-dir"
    spm_dir.mkdir(exist_ok=True)
    (spm_dir / "spm.model").write_bytes((work / "spm.model").read_bytes())
    tokenizer = DebertaV2Tokenizer.from_pretrained(spm_dir)
    tokenizer.save_pretrained(path)
    config = DebertaV2Config(
        vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=128, relative_attention=True, position_biased_input=False,
        pos_att_type=["p2c", "c2p"], num_labels=1, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    torch.manual_seed(0)
    DebertaV2ForSequenceClassification(config).save_pretrained(path)
    return path


def nan_reward(prompts: list[str], responses: list[str]) -> list[float]:
    """A broken reward: NaN for the second sample of every batch, the response length otherwise."""
    return [math.nan if i == 1 else float(len(r)) for i, r in enumerate(responses)]
