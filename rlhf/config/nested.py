"""Settings nested in the config groups: ``model.tiny`` (the built-in tiny actor), ``model.lora``,
``reward.proxy`` (the reviews task's proxy reward model) and ``logging.wandb``. Their groups, with every
other key, are in ``rlhf.config.schema``."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class TinyModelConfig:
    """Architecture and supervised warm-up of the built-in tiny actor (used when ``model.path`` is null)."""

    # Qwen2 architecture of the tiny actor.
    hidden_size: int = 64
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    intermediate_size: int = 128
    # Supervised warm-up: it stops at the first check where held-out accuracy reaches this share (arithmetic:
    # greedy answers that are right; reviews: sampled continuations that are well-formed).
    warmup_target_accuracy: float = 0.9
    # Label smoothing of the warm-up; null = the task's: 0.3 on arithmetic (the model learns the answers
    # as its mode but samples diffusely, so the reference is partly right when sampled, about
    # (1 - smoothing) per token), 0 on reviews (a plain language model of the corpus).
    warmup_label_smoothing: float | None = None
    # Upper bound on warm-up optimizer steps.
    warmup_max_steps: int = 2000
    # Warm-up batch size and learning rate.
    warmup_batch_size: int = 64
    warmup_lr: float = 3e-3
    # Held-out accuracy is checked every this many warm-up steps.
    warmup_eval_every: int = 25
    # Seed of the model's initialisation and warm-up.
    seed: int = 0


@dataclass
class LoraConfig:
    """LoRA adapters on the actor (peft): only adapters and the value head train."""

    # Train LoRA adapters instead of all weights; the reference is the actor with adapters disabled.
    enabled: bool = False
    # Adapter rank.
    r: int = 8
    # Adapter scaling numerator (scale = alpha / r).
    alpha: float = 16.0
    # Dropout on the adapter input (keep 0: PPO needs the same forward at sampling and update time).
    dropout: float = 0.0
    # Module names that get adapters.
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )


@dataclass
class ProxyConfig:
    """The proxy reward model of the reviews task (reward.kind=proxy): a DeBERTa-v2 classifier trained with
    the reward-model stage on preference pairs of the tiny actor's samples, labelled by the task's gold
    reward with Bradley-Terry noise. Built once and cached beside the tiny actor."""

    # Preference pairs sampled and labelled (N); a tenth of them is held out.
    num_pairs: int = 2000
    # Label noise: chosen = a with probability sigmoid((gold(a) - gold(b)) / label_noise); 0 = always the better.
    label_noise: float = 0.25
    # Width of the classifier (16 dimensions per attention head).
    hidden_size: int = 64
    # Transformer layers of the classifier.
    num_layers: int = 2
    # Passes over the training pairs.
    epochs: int = 3
    # AdamW learning rate.
    lr: float = 1e-3
    # Pairs per optimizer step.
    batch_size: int = 32
    # Seed of the pairs' samples, their labels' noise, the split and the classifier's initialisation.
    seed: int = 0


@dataclass
class WandbConfig:
    """Weights & Biases."""

    # online, offline or disabled; null = online if an API key is configured, else offline.
    mode: str | None = None
    # W&B project.
    project: str = "rlhf"
    # W&B entity (team or user); null = your default.
    entity: str | None = None
    # Run group; null = the Hydra sweep dir for multirun jobs, none for single runs.
    group: str | None = None
    # Run name; null = the command-line overrides (or "default").
    name: str | None = None
    # Run tags.
    tags: list[str] = field(default_factory=list)
