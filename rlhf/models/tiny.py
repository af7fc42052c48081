"""The built-in tiny actor: a character tokenizer and a small Qwen2 model, built from config,
warmed up on the task until it is partly right, and saved as ordinary Hugging Face folders.

The run then loads them with the same ``from_pretrained`` code path as a hub model. Builds are
cached under ``<cache_dir>/tiny-<hash of the config>/`` so a second run starts at once.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import string
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from tqdm import tqdm
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

from rlhf.config.schema import TinyModelConfig
from rlhf.models.actions import position_ids_from
from rlhf.models.generation import encode_prompts, generate
from rlhf.models.loading import load_tokenizer

log = logging.getLogger(__name__)


# Bump when the build itself changes, so old caches are not reused.
BUILD_VERSION = 2


# Prompt-length bound of the warm-up: the task's prompts are far shorter, so the build never depends
# on the run's data.max_prompt_length (and a changed setting never rebuilds the model).
WARMUP_MAX_PROMPT_LENGTH = 64


SPECIAL_TOKENS = ["<pad>", "<bos>", "<eos>", "<unk>", "<|user|>", "<|assistant|>"]


CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'user' %}<|user|>{{ message['content'] }}"
    "{% elif message['role'] == 'assistant' %}<|assistant|>{{ message['content'] }}{{ eos_token }}"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def build_tokenizer(words: Sequence[str] | None = None) -> PreTrainedTokenizerFast:
    """One token per printable ASCII character, plus distinct pad/bos/eos/unk and chat-role tokens,
    with a chat template. With ``words``: one token per word instead (text split at whitespace, decoded
    joined by spaces) and no chat template, for a task whose prompts are the beginnings of texts."""
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    for token in words if words is not None else string.printable[:95]:  # digits, letters, punctuation, space
        vocab.setdefault(token, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    if words is None:
        backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
        backend.decoder = decoders.Fuse()
    else:
        backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        bos_token="<bos>",
        eos_token="<eos>",
        unk_token="<unk>",
        additional_special_tokens=["<|user|>", "<|assistant|>"],
        padding_side="left",
    )
    if words is None:
        tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_model(cfg: TinyModelConfig, vocab_size: int, tokenizer: PreTrainedTokenizerFast) -> Qwen2ForCausalLM:
    """A freshly initialised Qwen2 causal LM of the configured size."""
    config = Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads,
        intermediate_size=cfg.intermediate_size,
        max_position_embeddings=128,
        tie_word_embeddings=True,
        attention_dropout=0.0,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(cfg.seed)
    return Qwen2ForCausalLM(config)


def sft_batch(
    tokenizer: PreTrainedTokenizerFast, prompts: list[str], answers: list[str], max_prompt_length: int
) -> dict[str, torch.Tensor]:
    """Prompt + answer + EOS, with labels only on the answer and EOS (-100 elsewhere)."""
    prompt_ids = encode_prompts(tokenizer, prompts, max_prompt_length)
    answer_ids = [tokenizer(a, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for a in answers]
    width = max(len(a) for a in answer_ids)
    answer = torch.full((len(prompts), width), tokenizer.pad_token_id)
    answer_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, ids in enumerate(answer_ids):
        answer[i, : len(ids)] = torch.tensor(ids)
        answer_mask[i, : len(ids)] = 1
    input_ids = torch.cat([prompt_ids["input_ids"], answer], dim=1)
    attention_mask = torch.cat([prompt_ids["attention_mask"], answer_mask], dim=1)
    labels = torch.cat([torch.full_like(prompt_ids["input_ids"], -100), answer.masked_fill(answer_mask == 0, -100)], 1)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def accuracy(
    model: Qwen2ForCausalLM,
    tokenizer: PreTrainedTokenizerFast,
    prompts: list[str],
    reward_fn: Callable[[list[str], list[str]], list[float]],
    *,
    max_new_tokens: int,
    max_prompt_length: int,
    do_sample: bool,
) -> float:
    """Mean reward of sampled (temperature 1) or greedy responses on ``prompts``."""
    samples = generate(
        model,
        tokenizer,
        prompts,
        max_new_tokens=max_new_tokens,
        temperature=1.0,
        max_prompt_length=max_prompt_length,
        do_sample=do_sample,
    )
    return float(sum(reward_fn(samples.prompts, samples.responses)) / len(prompts))


def sft_step(
    model: Qwen2ForCausalLM, optimizer: torch.optim.Optimizer, batch: dict[str, torch.Tensor], label_smoothing: float
) -> None:
    """One supervised step: cross-entropy of the labelled tokens (the answer and EOS), smoothed."""
    model.train()
    logits = model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        position_ids=position_ids_from(batch["attention_mask"]),
    ).logits[:, :-1]  # (B, T - 1, V): position t predicts token t + 1
    labels = batch["labels"][:, 1:].flatten()  # token t + 1
    loss = torch.nn.functional.cross_entropy(
        logits.flatten(0, 1), labels, ignore_index=-100, label_smoothing=label_smoothing
    )
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()


def warm_up(
    model: Qwen2ForCausalLM,
    tokenizer: PreTrainedTokenizerFast,
    cfg: TinyModelConfig,
    train_prompts: list[str],
    train_answers: list[str],
    eval_prompts: list[str],
    reward_fn: Callable[[list[str], list[str]], list[float]],
    max_prompt_length: int,
    *,
    judge_sampled: bool = False,
    progress_bar: bool = True,
) -> tuple[float, float]:
    """Supervised steps with label smoothing until held-out accuracy reaches the target: of greedy
    responses, or of sampled ones (temperature 1) with ``judge_sampled``.

    Returns (greedy, sampled) held-out accuracy at the end. Generation is sized by the longest answer,
    so the build does not depend on the run's rollout settings. Progress shows as one bar
    (``progress_bar``), the result as one log line.
    """
    max_new_tokens = max(len(tokenizer(a, add_special_tokens=False)["input_ids"]) for a in train_answers) + 1
    sizes = {"max_new_tokens": max_new_tokens, "max_prompt_length": max_prompt_length}
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.warmup_lr)
    generator = torch.Generator().manual_seed(cfg.seed)
    bar = tqdm(total=cfg.warmup_max_steps, desc="building the tiny actor", disable=not progress_bar, leave=False)
    for step in range(cfg.warmup_max_steps + 1):
        if step % cfg.warmup_eval_every == 0 or step == cfg.warmup_max_steps:
            judged = accuracy(model, tokenizer, eval_prompts, reward_fn, **sizes, do_sample=judge_sampled)
            bar.set_postfix(accuracy=f"{judged:.3f}", target=cfg.warmup_target_accuracy)
            if judged >= cfg.warmup_target_accuracy or step == cfg.warmup_max_steps:
                bar.close()
                other = accuracy(model, tokenizer, eval_prompts, reward_fn, **sizes, do_sample=not judge_sampled)
                greedy, sampled = (other, judged) if judge_sampled else (judged, other)
                log.info(
                    "tiny actor built in %d warm-up steps: held-out accuracy %.3f greedy, %.3f sampled",
                    *(step, greedy, sampled),
                )
                return greedy, sampled
        bar.update()
        idx = torch.randint(len(train_prompts), (cfg.warmup_batch_size,), generator=generator).tolist()
        batch = sft_batch(
            tokenizer, [train_prompts[i] for i in idx], [train_answers[i] for i in idx], max_prompt_length
        )
        sft_step(model, optimizer, batch, cfg.warmup_label_smoothing)
    raise AssertionError("unreachable: the last step always returns")


def cache_key(cfg: TinyModelConfig, **task: object) -> str:
    """A short hash of everything the build depends on."""
    blob = json.dumps({"version": BUILD_VERSION, "model": asdict(cfg), "task": task}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def default_cache_dir() -> Path:
    """$RLHF_CACHE, else ~/.cache/rlhf."""
    return Path(os.environ.get("RLHF_CACHE", "~/.cache/rlhf")).expanduser()


def ensure_tiny_actor(
    cfg: TinyModelConfig,
    cache_dir: str | None,
    train_prompts: list[str],
    train_answers: list[str],
    eval_prompts: list[str],
    reward_fn: Callable[[list[str], list[str]], list[float]],
    *,
    vocabulary: Sequence[str] | None = None,
    progress_bar: bool = True,
) -> tuple[Path, Path]:
    """Build (or find in the cache) the tiny actor; returns (model folder, tokenizer folder).
    ``vocabulary``: one token per word of it (see ``build_tokenizer``), a language model of the texts
    whose warm-up target is met by sampled responses; ``progress_bar``: show the warm-up's progress bar
    (``logging.progress_bar``).

    The tokenizer gets its own folder: next to a Qwen2 config.json, AutoTokenizer would load it as
    a Qwen2Tokenizer with different ids.
    """
    root = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    words = {} if vocabulary is None else {"vocabulary": list(vocabulary), "answers": train_answers}
    key = cache_key(cfg, train=train_prompts, eval=eval_prompts, **words)
    target = root / f"tiny-{key}"
    if (target / "done").exists():
        return target / "model", target / "tokenizer"
    staging = root / f".tiny-{key}.{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    tokenizer = build_tokenizer(vocabulary)
    tokenizer.save_pretrained(staging / "tokenizer")
    tokenizer = load_tokenizer(str(staging / "tokenizer"))  # size the model by the tokenizer as reloaded
    model = build_model(cfg, len(tokenizer), tokenizer)
    task = (train_prompts, train_answers, eval_prompts, reward_fn, WARMUP_MAX_PROMPT_LENGTH)
    greedy, sampled = warm_up(
        model, tokenizer, cfg, *task, judge_sampled=vocabulary is not None, progress_bar=progress_bar
    )
    model.save_pretrained(staging / "model")
    (staging / "done").write_text(
        json.dumps({"held_out_greedy_accuracy": greedy, "held_out_sampled_accuracy": sampled})
    )
    publish(staging, target)
    return target / "model", target / "tokenizer"


def publish(staging: Path, target: Path) -> None:
    """A finished build in ``staging`` becomes the cache entry ``target`` (at once, by a rename), unless
    another process finished the same build first."""
    if target.exists():
        shutil.rmtree(staging, ignore_errors=True)
    else:
        staging.rename(target)
