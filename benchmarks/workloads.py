"""The benchmark's workloads: their shapes, the model folders both systems load, and their FLOP counts.

Used by ``ppo_vs_trl.py`` (see its docstring for how the figures are measured). Everything is built
here from a fixed seed, nothing is downloaded.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

QWEN_VOCAB = 151_936  # Qwen2.5's vocabulary (the seed's model)


@dataclass(frozen=True)
class Workload:
    """One fixed PPO workload: model sizes and the iteration's shape."""

    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    vocab_size: int  # tokens of the tokenizer built here (special tokens included)
    prompts_per_step: int
    new_tokens: int
    ppo_epochs: int
    mini_batches: int
    num_prompts: int = 512
    # "bpe": byte-level BPE trained on the prompts; "words": one token per word, padded with filler words up
    # to vocab_size, so that any sampled id decodes to a word that re-tokenises to one token
    tokenizer: str = "bpe"


WORKLOADS = {
    "tiny": Workload(128, 2, 4, 2, 256, 320, prompts_per_step=64, new_tokens=8, ppo_epochs=4, mini_batches=4),
    # 24.4M-parameter actor (8 layers of hidden 512), 32 new tokens
    "small": Workload(512, 8, 8, 4, 1408, 320, prompts_per_step=32, new_tokens=32, ppo_epochs=4, mini_batches=4),
    # the seed's vocabulary on a small trunk: the 38.9M-weight embedding / LM head dominates (3.2M in the
    # layers); intermediate 704 = 2.75 x hidden as in "small". 16 prompts and 2 x 2 mini-batches of 8 keep one
    # iteration at seconds while every mini-batch forward still runs the LM head on ~700 tokens.
    "qwen-vocab": Workload(
        256,
        4,
        4,
        2,
        704,
        QWEN_VOCAB,
        prompts_per_step=16,
        new_tokens=64,
        ppo_epochs=2,
        mini_batches=2,
        tokenizer="words",
    ),
}

SPECIAL = ["<pad>", "<eos>", "<|user|>", "<|assistant|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
WORDS = "what is the sum of and plus minus times a number please tell me quickly answer question".split()


def prompt_texts(n: int) -> list[str]:
    """Deterministic arithmetic questions of varied length (so that left padding is real)."""
    rng = random.Random(0)
    out = []
    for _ in range(n):
        words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 6)))
        out.append(f"{words} {rng.randint(0, 999)} + {rng.randint(0, 999)} =")
    return out


def bpe_tokenizer(workload: Workload, texts: list[str]):
    """A byte-level BPE of ``workload.vocab_size`` tokens trained on the prompts."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=workload.vocab_size,
        special_tokens=SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts * 4, trainer)
    return backend


def word_tokenizer(workload: Workload):
    """A Qwen2 tokenizer (Qwen's pre-tokenizer, byte-level BPE) of exactly ``workload.vocab_size`` tokens whose
    entries are whole words: the special tokens, the 256 byte symbols, then " a".." zzz" and four-letter words
    " aaaa".. up to the size, each built by one merge from its prefix. A word with its leading space is one
    pre-token wherever it stands, so a decoded random response re-tokenises to as many tokens as were
    sampled (bar the 256 bare byte symbols): rlhf (which re-tokenises decoded text for the reward model) and
    TRL (which feeds ids) score responses of the same length. Built as a ``Qwen2Tokenizer`` because
    transformers reloads any tokenizer saved beside a Qwen2 config.json as one (the reward model's folder)."""
    from itertools import product
    from string import ascii_lowercase

    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import Qwen2Tokenizer

    symbols = sorted(ByteLevel.alphabet())
    vocab = {token: i for i, token in enumerate([*SPECIAL, *symbols])}
    merges = []
    for length in range(1, 5):
        for letters in product(ascii_lowercase, repeat=length):
            if len(vocab) == workload.vocab_size:
                break
            word = "\u0120" + "".join(letters)  # \u0120 (Ġ): the byte-level symbol of a space
            merges.append((word[:-1], word[-1]))
            vocab[word] = len(vocab)
    special = {"pad_token": "<pad>", "eos_token": "<eos>", "unk_token": "<eos>"}
    return Qwen2Tokenizer(vocab=vocab, merges=merges, extra_special_tokens=SPECIAL[2:], **special)


def build(workload: Workload, root: Path) -> None:
    """Tokenizer, policy and reward model (same size) and prompts.jsonl in ``root``."""
    import torch
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM, Qwen2ForSequenceClassification

    texts = prompt_texts(workload.num_prompts)
    if workload.tokenizer == "bpe":
        backend = bpe_tokenizer(workload, texts)
        tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>")
    else:
        tokenizer = word_tokenizer(workload)
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(root / "tokenizer")
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=workload.hidden_size,
        num_hidden_layers=workload.num_hidden_layers,
        num_attention_heads=workload.num_attention_heads,
        num_key_value_heads=workload.num_key_value_heads,
        intermediate_size=workload.intermediate_size,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.eos_token_id,
        num_labels=1,
    )
    torch.manual_seed(0)
    Qwen2ForCausalLM(config).save_pretrained(root / "policy")
    Qwen2ForSequenceClassification(config).save_pretrained(root / "reward")
    tokenizer.save_pretrained(root / "reward")  # the reward model reads text with its own tokenizer
    (root / "prompts.jsonl").write_text("".join(json.dumps({"prompt": t}) + "\n" for t in texts))


def step_tokens(root: Path, workload: Workload) -> int:
    """Real (unpadded) tokens of one iteration's sequences: chat-templated prompts plus the new tokens."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(root / "tokenizer")
    texts = prompt_texts(workload.num_prompts)[: workload.prompts_per_step]
    messages = [[{"role": "user", "content": t}] for t in texts]
    prompt_tokens = sum(
        len(tokenizer.apply_chat_template(m, add_generation_prompt=True, return_dict=False)) for m in messages
    )
    return prompt_tokens + workload.prompts_per_step * workload.new_tokens


def linear_shapes(root: Path) -> Counter:
    """(in_features, out_features) of every nn.Linear of the policy (LM head included) and of the critic
    (a trunk plus a scalar head, like the reward model), with how many times each occurs."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    shapes: Counter = Counter()
    for model in (
        AutoModelForCausalLM.from_pretrained(root / "policy"),
        AutoModelForSequenceClassification.from_pretrained(root / "reward"),
    ):
        shapes.update((m.in_features, m.out_features) for m in model.modules() if isinstance(m, torch.nn.Linear))
    return shapes


def workload_flops(root: Path, workload: Workload) -> dict[str, float]:
    """Model FLOPs of one iteration, by phase: 2 per weight per real token for a forward, 6 for a forward +
    backward, over every nn.Linear (the LM head included, on every token); attention scores left out."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    def linear_weights(model) -> int:
        import torch

        return sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))

    policy = linear_weights(AutoModelForCausalLM.from_pretrained(root / "policy"))
    scorer = linear_weights(AutoModelForSequenceClassification.from_pretrained(root / "reward"))
    critic = scorer  # a trunk plus a scalar head, like the reward model
    tokens = step_tokens(root, workload)
    return {
        "generation": 2 * policy * tokens,
        "experience": 2 * (policy + critic + scorer) * tokens,  # reference, value, reward forwards
        "update": workload.ppo_epochs * 6 * (policy + critic) * tokens,
    }
