"""Preference pairs for reward-model training: (prompt, chosen, rejected) from a local file or a hub dataset.

Two forms are read (through ``datasets``): columns ``prompt``, ``chosen``, ``rejected``; or the
Anthropic-HH form, ``chosen`` and ``rejected`` alone, each a whole conversation
``"\\n\\nHuman: ... \\n\\nAssistant: ..."``, split here into the shared prompt (everything before the last
``"\\n\\nAssistant:"``) and the two final assistant responses. A missing column, an empty text or a pair
whose two responses are the same is an ``InputError`` naming the file and the row.
"""

from __future__ import annotations

import random
from pathlib import Path

from rlhf.config.errors import InputError

# The last assistant turn of an Anthropic-HH conversation starts after this marker.
HH_ASSISTANT = "\n\nAssistant:"

# Local data files by suffix -> the ``datasets`` builder that reads them.
BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}

Pair = tuple[str, str, str]  # (prompt, chosen response, rejected response)


def split_hh(conversation: str) -> tuple[str, str]:
    """(prompt, final assistant response) of an Anthropic-HH conversation; the prompt keeps the
    trailing ``"\\n\\nAssistant:"`` so that it reads as the turn the response answers."""
    head, marker, response = conversation.rpartition(HH_ASSISTANT)
    if not marker:
        raise ValueError(f"no {HH_ASSISTANT.strip()!r} turn")
    return head + marker, response.strip()


def hh_pair(chosen: str, rejected: str) -> Pair:
    """One Anthropic-HH row as (prompt, chosen, rejected); both conversations must share the prompt."""
    prompt, chosen_response = split_hh(chosen)
    rejected_prompt, rejected_response = split_hh(rejected)
    if prompt != rejected_prompt:
        raise ValueError("the chosen and rejected conversations differ before their last assistant turn")
    return prompt, chosen_response, rejected_response


def load_rows(source: str, *, split: str = "train", cache_dir: str | None = None) -> list[dict]:
    """The rows of a local jsonl/json/parquet/csv file or of a hub dataset's ``split``."""
    import datasets  # seconds to import: only when pairs are read

    path = Path(source)
    if path.suffix in BUILDERS:
        if not path.is_file():
            raise InputError(f"data.path={source!r}: no such file")
        if path.stat().st_size == 0:
            raise InputError(f"data.path={source!r}: the file is empty (expected preference pairs)")
        loaded = datasets.load_dataset(BUILDERS[path.suffix], data_files=str(path), split="train", cache_dir=cache_dir)
    else:
        try:
            loaded = datasets.load_dataset(source, split=split, cache_dir=cache_dir)
        except Exception as error:  # noqa: BLE001 - datasets raises many kinds for a missing or offline name
            raise InputError(f"data.path={source!r} could not be loaded as a hub dataset: {error}") from error
    return list(loaded)


def to_pairs(rows: list[dict], source: str) -> list[Pair]:
    """Checked (prompt, chosen, rejected) triples; the form is chosen by the columns of the first row."""
    if not rows:
        raise InputError(f"data.path={source!r} holds no rows (expected preference pairs)")
    columns = set(rows[0])
    if not {"chosen", "rejected"} <= columns:
        raise InputError(
            f"data.path={source!r} row 0: missing column(s) {sorted({'chosen', 'rejected'} - columns)}; expected "
            "prompt/chosen/rejected, or chosen/rejected as whole Anthropic-HH conversations"
        )
    pairs = []
    for index, row in enumerate(rows):
        where = f"data.path={source!r} row {index}"
        texts = [row.get(key) for key in ("prompt", "chosen", "rejected") if "prompt" in columns or key != "prompt"]
        if any(not isinstance(text, str) or not text.strip() for text in texts):
            raise InputError(f"{where}: prompt, chosen and rejected must be non-empty strings, got {texts!r}")
        try:
            pair = (row["prompt"], row["chosen"], row["rejected"]) if "prompt" in columns else hh_pair(*texts)
        except ValueError as error:
            raise InputError(f"{where}: not an Anthropic-HH conversation pair ({error})") from None
        if not pair[1].strip() or not pair[2].strip():
            raise InputError(f"{where}: an empty final assistant response")
        if pair[1] == pair[2]:
            raise InputError(f"{where}: chosen and rejected are identical, so the pair says nothing")
        pairs.append(pair)
    return pairs


def split_pairs(pairs: list[Pair], *, eval_fraction: float, seed: int) -> tuple[list[Pair], list[Pair]]:
    """(train, held-out): a seeded shuffle, then ``eval_fraction`` of the pairs (at least one) held out."""
    order = list(range(len(pairs)))
    random.Random(seed).shuffle(order)
    held = max(1, round(eval_fraction * len(pairs))) if eval_fraction > 0 else 0
    if held >= len(pairs):
        raise InputError(f"{len(pairs)} pair(s) leave none to train on after holding out {held}")
    return [pairs[i] for i in order[held:]], [pairs[i] for i in order[:held]]
