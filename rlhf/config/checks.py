"""The checks every validator is made of, and the checks of the config's shape (unknown keys, non-finite
floats, sizes): each raises ``ConfigError`` naming the full key, the value and what is allowed. Imports
neither torch nor transformers."""

from __future__ import annotations

import difflib
import math
from collections.abc import Iterable
from dataclasses import is_dataclass
from pathlib import Path
from typing import Any, get_type_hints

from omegaconf import OmegaConf

from rlhf.config.errors import ConfigError
from rlhf.config.schema import TrainConfig


def check(ok: bool, key: str, value: object, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={value!r} is not allowed: {allowed}")


def one_of(key: str, value: object, options: Iterable) -> None:
    """``value`` is one of ``options`` (an ``rlhf.config.options`` enum or a tuple)."""
    options = tuple(options)
    check(value in options, key, value, "one of " + ", ".join(map(str, options)))


def positive(key: str, value: float) -> None:
    check(value > 0, key, value, "must be > 0")


def positive_or_none(key: str, value: float | None) -> None:
    """An optional size or clip range: null turns it off, else it must be > 0."""
    if value is not None:
        positive(key, value)


def non_negative(key: str, value: float) -> None:
    check(value >= 0, key, value, "must be >= 0")


def unit_interval(key: str, value: float) -> None:
    check(0.0 <= value <= 1.0, key, value, "must be in [0, 1]")


def number(key: str, value: object) -> None:
    check(isinstance(value, int | float) and not isinstance(value, bool), key, value, "must be a number")


# Hydra's own node (in a config composed with return_hydra_config): its keys are Hydra's to check.
HYDRA_NODE = "hydra"


def _schema_keys(schema: type, prefix: str = "") -> list[str]:
    """Every key of a dataclass schema, nested ones as dotted paths."""
    keys = []
    for name, hint in get_type_hints(schema).items():
        keys.append(f"{prefix}{name}")
        if is_dataclass(hint):
            keys += _schema_keys(hint, f"{prefix}{name}.")
    return keys


def _check_known(node: dict, schema: type, prefix: str) -> None:
    """Refuse a key of ``node`` that ``schema`` lacks; recurse into nested dataclasses only, so the
    open maps (``Any`` and dict fields: reward.fn, reward.headers, optimizer.*) take any key."""
    fields = get_type_hints(schema)
    for key, value in node.items():
        if not prefix and key == HYDRA_NODE:
            continue
        if key not in fields:
            # A sibling with a close name, else any key of the schema (a key put under the wrong group).
            close = difflib.get_close_matches(key, list(fields), n=1)
            close = [f"{prefix}{c}" for c in close] or difflib.get_close_matches(
                f"{prefix}{key}", _schema_keys(TrainConfig), n=1
            )
            hint = f"; did you mean {close[0]}?" if close else ""
            check(False, f"{prefix}{key}", value, f"unknown key (the schema is rlhf.config.schema.TrainConfig){hint}")
        if is_dataclass(fields[key]) and isinstance(value, dict):
            _check_known(value, fields[key], f"{prefix}{key}.")


def check_override_key(key: str, value: Any, conf_dir: Path | None = None) -> None:
    """Refuse a command-line override of a key the schema lacks, or a config group option that
    ``conf_dir`` lacks, with the closest known name ("did you mean kl.beta?"). Hydra's own message for
    ``kl.betta=0.1`` suggests ``+kl.betta=0.1``, which would add a key that nothing reads."""
    group = conf_dir / key if conf_dir is not None and "." not in key else None
    if group is not None and group.is_dir():
        options = sorted(path.stem for path in group.glob("*.yaml"))
        for choice in value if isinstance(value, list) else [value]:
            if isinstance(choice, str) and choice not in options:
                close = difflib.get_close_matches(choice, options, n=1)
                hint = f"did you mean {key}={close[0]}? " if close else ""
                check(False, key, choice, f"no such option of the config group {key}: {hint}options: {options}")
        return
    node: Any = value
    for part in reversed(key.split(".")):
        node = {part: node}
    _check_known(node, TrainConfig, "")


def validate_known_keys(cfg: Any) -> None:
    # OmegaConf's struct mode refuses `kl.betta=1`, but `+kl.betta=1` and `++kl.betta=1` add the key:
    # walk the unresolved config (a value from ${oc.env:...} shows as its interpolation, never its text).
    _check_known(OmegaConf.to_container(cfg, resolve=False), TrainConfig, "")


def _check_finite(node: Any, key: str) -> None:
    if isinstance(node, dict):
        for name, value in node.items():
            if key or name != HYDRA_NODE:
                _check_finite(value, f"{key}.{name}" if key else str(name))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            _check_finite(value, f"{key}[{i}]")
    elif isinstance(node, float):
        check(math.isfinite(node), key, node, "must be a finite number")


def validate_finite(cfg: Any) -> None:
    # inf passes a range check such as `>= 0` (and kl.beta=inf makes every step non-finite, so skipped),
    # nan fails it with a message that does not say why: every float of the config is checked here once.
    _check_finite(OmegaConf.to_container(cfg, resolve=True), "")


# Upper bounds of sizes, far above real use: a slip of the keyboard (three zeros too many) must fail at
# once, naming the key, instead of exhausting memory or running for days once the models are loaded.
SIZE_LIMITS: dict[str, tuple[int, str]] = {
    # 10^6 prompts are built and shuffled in ~1 s and ~0.1 GB before anything else runs.
    "data.max_operand": (999, "the arithmetic task enumerates all (max_operand + 1)^2 prompts"),
    # Every held-out prompt is sampled and decoded greedily at each evaluation.
    "data.num_eval": (100_000, "each evaluation generates for every held-out prompt twice"),
    # Beyond the context of any model (check_context_length checks the actual one, after reading it).
    "data.max_prompt_length": (131_072, "longer than any model's context"),
    "rollout.max_new_tokens": (131_072, "longer than any model's context"),
    "reward.max_length": (131_072, "longer than any model's context"),
    # Whole batches of sequences are held (with their logits, per mini-batch) in memory at once.
    "rollout.batch_size": (65_536, "a rollout batch is generated and held in memory at once, per process"),
    "rollout.n": (4_096, "every prompt's samples are generated and held in memory at once"),
    "reward.batch_size": (65_536, "a reward batch is scored (or sent) at once"),
    # The built-in tiny actor is built and warmed up on the CPU at start: a "tiny" model is small.
    "model.tiny.hidden_size": (4096, "the tiny actor is built and trained on the CPU at start"),
    "model.tiny.intermediate_size": (16_384, "the tiny actor is built and trained on the CPU at start"),
    "model.tiny.num_hidden_layers": (64, "the tiny actor is built and trained on the CPU at start"),
    "model.tiny.num_attention_heads": (256, "the tiny actor is built and trained on the CPU at start"),
    "model.tiny.num_key_value_heads": (256, "the tiny actor is built and trained on the CPU at start"),
    "model.tiny.warmup_batch_size": (65_536, "the tiny actor is built and trained on the CPU at start"),
    "model.tiny.warmup_max_steps": (1_000_000, "the tiny actor is built and trained on the CPU at start"),
    # Rows of W&B tables logged every logging.samples_every steps.
    "logging.num_samples": (65_536, "rows of a table logged every logging.samples_every steps"),
    "logging.debug_samples": (1024, "each sample adds one row per response token to a logged table"),
}


def validate_sizes(cfg: Any) -> None:
    for key, (limit, why) in SIZE_LIMITS.items():
        value = OmegaConf.select(cfg, key)
        check(value is None or value <= limit, key, value, f"must be <= {limit} ({why})")
