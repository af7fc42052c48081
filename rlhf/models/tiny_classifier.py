"""A tiny reward model of the seed's architecture: a DeBERTa-v2 sequence classifier (``num_labels=1``) with
its own sentencepiece tokenizer, trained on a task's texts, saved as an ordinary Hugging Face folder.

It has another vocabulary than the tiny actor, as reward-model-deberta-v3-large-v2 has another than
Qwen2.5: the PPO run scores decoded text, as with the real pair. The weights are random; the proxy
reward model of the reviews task (``rlhf.app.proxy``) trains them with the reward-model stage.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import sentencepiece
import torch
from transformers import DebertaV2Config, DebertaV2ForSequenceClassification, DebertaV2Tokenizer

SPECIAL_PIECES = {"pad": "[PAD]", "bos": "[CLS]", "eos": "[SEP]", "unk": "[UNK]"}


def train_sentencepiece(texts: list[str], folder: Path, *, vocab_size: int) -> DebertaV2Tokenizer:
    """A unigram sentencepiece model of ``texts`` as a DeBERTa-v2 tokenizer (ids: [PAD] 0, [CLS] 1, [SEP] 2,
    [UNK] 3, [MASK] 4). ``vocab_size`` is an upper bound: a small corpus may have fewer pieces."""
    with tempfile.TemporaryDirectory() as work:
        corpus = Path(work) / "corpus.txt"
        corpus.write_text("\n".join(texts))
        sentencepiece.SentencePieceTrainer.train(
            input=str(corpus),
            model_prefix=str(folder / "spm"),
            vocab_size=vocab_size,
            hard_vocab_limit=False,
            pad_id=0,
            bos_id=1,
            eos_id=2,
            unk_id=3,
            **{f"{name}_piece": piece for name, piece in SPECIAL_PIECES.items()},
            user_defined_symbols=["[MASK]"],
            character_coverage=1.0,
            model_type="bpe",
            minloglevel=2,
        )
    return DebertaV2Tokenizer.from_pretrained(folder)  # reads folder/spm.model (the constructor alone does not)


def save_tiny_classifier(
    folder: Path, *, texts: list[str], hidden_size: int, num_layers: int, vocab_size: int, seed: int
) -> Path:
    """A randomly initialised DeBERTa-v2 1-label classifier and its tokenizer (trained on ``texts``) in
    ``folder``: ``AutoModelForSequenceClassification`` and ``AutoTokenizer`` load it back."""
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as work:
        tokenizer = train_sentencepiece(texts, Path(work), vocab_size=vocab_size)
        tokenizer.save_pretrained(folder)
    heads = hidden_size // 16  # 16 dimensions per head
    config = DebertaV2Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=heads,
        intermediate_size=2 * hidden_size,
        max_position_embeddings=256,
        relative_attention=True,
        position_biased_input=False,
        pos_att_type=["p2c", "c2p"],
        num_labels=1,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    DebertaV2ForSequenceClassification(config).save_pretrained(folder)
    return folder
