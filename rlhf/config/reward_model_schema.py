"""Typed schema of a reward-model training run (``python -m rlhf.reward_model``, ``conf/reward_model.yaml``),
registered in Hydra's ConfigStore as ``reward_model_schema``, and its validators (each raises
``ConfigError`` naming the key). It reuses the PPO run's ``logging`` group; its ``model`` and ``data``
groups are its own (a sequence classifier and preference pairs, not an actor and prompts)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf

from rlhf.config.checks import check, non_negative, one_of, positive
from rlhf.config.options import DType, InputFormat, WandbMode
from rlhf.config.schema import LoggingConfig


@dataclass
class RewardModelModelConfig:
    """The sequence classifier to train (``num_labels=1``) and its tokenizer."""

    # Hub id or local folder of an AutoModelForSequenceClassification checkpoint (or any base model:
    # a new 1-label score head is added).
    path: str = MISSING
    # Tokenizer folder or hub id; null = model.path.
    tokenizer_path: str | None = None
    # Weights dtype while training: float32, bfloat16 or float16.
    dtype: str = "float32"


@dataclass
class PairDataConfig:
    """Preference pairs: prompt/chosen/rejected columns, or Anthropic-HH chosen/rejected conversations."""

    # A local .jsonl/.json/.parquet/.csv file or a hub dataset name.
    path: str = MISSING
    # Split of a hub dataset.
    split: str = "train"
    # Share of the pairs held out for evaluation (seeded by `seed`).
    eval_fraction: float = 0.1
    # Cache folder of `datasets`; null = its default.
    cache_dir: str | None = None


@dataclass
class RewardModelTrainConfig:
    """A Bradley-Terry reward-model run; its saved folder loads with ``reward=classifier reward.path=...``."""

    model: RewardModelModelConfig = field(default_factory=RewardModelModelConfig)
    data: PairDataConfig = field(default_factory=PairDataConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    # Seed of the held-out split, the shuffles and the score head's initialisation.
    seed: int = 0
    # Model input, as the PPO run's reward.input_format reads it: "pair" or "chat" (the tokenizer's template).
    input_format: str = "pair"
    # Maximum input length in the reward model's tokens (longer inputs are truncated).
    max_length: int = 512
    # Pairs per optimizer step.
    batch_size: int = 8
    # Passes over the training pairs.
    epochs: int = 1
    # AdamW learning rate.
    lr: float = 1e-5
    # AdamW weight decay.
    weight_decay: float = 0.0
    # Held-out evaluation every this many optimizer steps (and after the last one).
    eval_every: int = 50
    # Shift the score head's bias so the saved model's scores have mean 0 on the training pairs.
    center: bool = False
    # Run directory; null = Hydra's output dir. The model is saved to <run dir>/model.
    output_dir: str | None = None


def register_reward_model_configs() -> None:
    """Register the schema so ``conf/reward_model.yaml`` can list ``reward_model_schema`` first."""
    ConfigStore.instance().store(name="reward_model_schema", node=RewardModelTrainConfig)


def validate_reward_model_run(cfg: Any) -> None:
    one_of("model.dtype", cfg.model.dtype, DType)
    one_of("input_format", cfg.input_format, InputFormat)
    check(0 <= cfg.seed <= 2**32 - 1, "seed", cfg.seed, "must be in [0, 2**32 - 1]")
    for key in ("max_length", "batch_size", "epochs", "lr", "eval_every"):
        positive(key, cfg[key])
    non_negative("weight_decay", cfg.weight_decay)
    check(0 <= cfg.data.eval_fraction < 1, "data.eval_fraction", cfg.data.eval_fraction, "must be in [0, 1)")
    # A missing path is MISSING (???): reading it would raise OmegaConf's error, which names no remedy.
    for key, what in (("data.path", "a preference-pair file or a hub dataset name"), ("model.path", "a classifier")):
        value = OmegaConf.select(cfg, key, default=None, throw_on_missing=False)
        check(not OmegaConf.is_missing(cfg, key) and bool(value), key, value, f"give {what} (folder or hub id)")
    one_of("logging.wandb.mode", cfg.logging.wandb.mode, (None, *WandbMode))
