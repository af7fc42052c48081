"""Prompt sets of a run (config group ``data``): the built-in task, or prompts from files or a hub
dataset through ``datasets``; checked for empty and overlong prompts before anything trains."""

from __future__ import annotations

import random
from pathlib import Path
from typing import TYPE_CHECKING

from rlhf.config.errors import InputError
from rlhf.tasks import arithmetic, reviews

if TYPE_CHECKING:  # reading prompts needs neither torch nor transformers: it runs before they are imported
    from transformers import PreTrainedTokenizerBase


# File suffix -> the `datasets` builder that reads it.
BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


def read_prompt_column(
    path: str, *, prompt_key: str, split: str, cache_dir: str | None = None, key: str = "data.path"
) -> list[str]:
    """The ``prompt_key`` column of a local file/folder (JSONL, JSON, Parquet, CSV) or hub dataset;
    errors name ``key`` (``data.path`` or ``data.eval_path``) and the split key that goes with it."""
    from datasets import load_dataset

    local = Path(path).expanduser()
    try:
        if local.is_file():
            if local.suffix not in BUILDERS:
                raise InputError(f"unsupported file type {local.suffix!r}: use one of {sorted(BUILDERS)}")
            # A single file is one split, which `datasets` calls "train".
            dataset = load_dataset(BUILDERS[local.suffix], data_files=str(local), split="train", cache_dir=cache_dir)
        else:
            dataset = load_dataset(str(local) if local.is_dir() else path, split=split, cache_dir=cache_dir)
    except Exception as error:
        split_key = "data.eval_split" if key == "data.eval_path" else "data.split"
        raise InputError(
            f"{key}={path!r} (split {split!r}) could not be read: {error} (a folder or hub dataset is read by "
            f"split: check {split_key})"
        ) from error
    if prompt_key not in dataset.column_names:
        raise InputError(
            f"data.prompt_key={prompt_key!r} is not a column of {path!r}: its columns are {dataset.column_names}"
        )
    prompts = dataset[prompt_key]
    for i, prompt in enumerate(prompts):
        if not isinstance(prompt, str) or not prompt.strip():
            raise InputError(f"prompt {i} of {path!r} (column {prompt_key!r}) is empty or not text: {prompt!r}")
    return prompts


def local_prompt_files(data) -> bool:
    """Whether the ``data`` config reads only local files or folders (so they can be checked before
    anything else loads; a hub dataset name may need a download)."""
    paths = [data.path, data.eval_path] if data.task == "dataset" else []
    return bool(paths) and all(path is None or Path(path).expanduser().exists() for path in paths)


def load_prompts(data) -> tuple[list[str], list[str]]:
    """(train prompts, held-out prompts) as the ``data`` config says; ``InputError`` names what is wrong."""
    if data.task == "arithmetic":
        return arithmetic.split_prompts(max_operand=data.max_operand, num_eval=data.num_eval, seed=data.seed)
    if data.task == "reviews":
        return reviews.split_prompts(num_eval=data.num_eval, seed=data.seed)
    if data.task != "dataset":
        raise ValueError(f"data.task={data.task!r}: expected 'arithmetic', 'reviews' or 'dataset'")
    prompts = read_prompt_column(data.path, prompt_key=data.prompt_key, split=data.split, cache_dir=data.cache_dir)
    if data.eval_path:
        return prompts, read_prompt_column(
            data.eval_path,
            prompt_key=data.prompt_key,
            split=data.eval_split,
            cache_dir=data.cache_dir,
            key="data.eval_path",
        )
    if not 0 < data.num_eval < len(prompts):
        raise InputError(
            f"data.num_eval={data.num_eval} must be between 1 and {len(prompts) - 1}, "
            f"the number of prompts in {data.path!r} less one"
        )
    shuffled = list(prompts)
    random.Random(data.seed).shuffle(shuffled)
    return shuffled[data.num_eval :], shuffled[: data.num_eval]


def templated_lengths(tokenizer: PreTrainedTokenizerBase, prompts: list[str]) -> list[int]:
    """Length in tokens of each prompt after the chat template."""
    from rlhf.models.generation import format_prompts  # torch and transformers: imported by then

    return [len(ids) for ids in tokenizer(format_prompts(tokenizer, prompts), add_special_tokens=False)["input_ids"]]


def fit_prompt_lengths(
    tokenizer: PreTrainedTokenizerBase, prompts: list[str], *, max_length: int, policy: str, name: str
) -> list[str]:
    """Prompts whose chat-templated length fits ``max_length``: ``error`` (default) lists the
    overlong ones, ``filter`` drops them, ``truncate`` keeps the end of each (the question)."""
    lengths = templated_lengths(tokenizer, prompts)
    overlong = [i for i, n in enumerate(lengths) if n > max_length]
    if not overlong:
        return prompts
    (template_length,) = templated_lengths(tokenizer, [""])
    if template_length >= max_length:
        raise InputError(
            f"data.max_prompt_length={max_length} leaves no room for a prompt: the chat template alone takes "
            f"{template_length} tokens; raise data.max_prompt_length"
        )
    if policy == "error":
        first = overlong[0]
        raise InputError(
            f"{len(overlong)} {name} prompt(s) exceed data.max_prompt_length={max_length} tokens after the chat "
            f"template; the first is prompt {first} ({lengths[first]} tokens). Set data.overlong=filter or "
            f"data.overlong=truncate, or raise data.max_prompt_length"
        )
    if policy == "filter":
        kept = [p for i, p in enumerate(prompts) if i not in set(overlong)]
        if not kept:
            raise InputError(f"every {name} prompt exceeds data.max_prompt_length={max_length}")
        return kept
    fitted = list(prompts)
    for i in overlong:
        fitted[i] = keep_end(tokenizer, prompts[i], max_length=max_length, room=max_length - template_length)
    return fitted


def keep_end(tokenizer: PreTrainedTokenizerBase, prompt: str, *, max_length: int, room: int) -> str:
    """The longest end of ``prompt`` (at most ``room`` of its tokens) whose chat-templated length is
    within ``max_length``.

    The text is decoded from the kept ids, so the length is checked again: with byte-level BPE a cut
    through a multi-byte character decodes to U+FFFD, which re-encodes to more tokens than it came from
    (dropped here, with the cut moved on until the result fits)."""
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    for keep in range(min(room, len(ids)), 0, -1):
        text = tokenizer.decode(ids[len(ids) - keep :]).lstrip("\ufffd")
        if text.strip() and templated_lengths(tokenizer, [text])[0] <= max_length:
            return text
    raise InputError(f"no end of the prompt {prompt!r} fits data.max_prompt_length={max_length}")


class PromptSampler:
    """Endless shuffled passes over the training prompts, one batch at a time."""

    def __init__(self, prompts: list[str], *, batch_size: int, seed: int) -> None:
        self.prompts = list(prompts)
        self.batch_size = batch_size
        self.rng = random.Random(seed)
        self.order: list[int] = []

    def state_dict(self) -> dict:
        """Position in the current pass and the shuffling RNG."""
        return {"order": list(self.order), "rng": self.rng.getstate()}

    def load_state_dict(self, state: dict) -> None:
        self.order = list(state["order"])
        version, internal, gauss = state["rng"]
        self.rng.setstate((version, tuple(internal), gauss))

    def next_batch(self) -> list[str]:
        """The next ``batch_size`` prompts; a new shuffle starts when a pass runs out."""
        batch = []
        while len(batch) < self.batch_size:
            if not self.order:
                self.order = list(range(len(self.prompts)))
                self.rng.shuffle(self.order)
            batch.append(self.prompts[self.order.pop()])
        return batch
