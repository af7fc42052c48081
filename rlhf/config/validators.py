"""One validator per config group: ranges, option names (the enums of ``rlhf.config.options``) and the
relations between keys. ``rlhf.config.validate.validate`` runs them in order; each takes the whole
composed config (a relation may name another group's key) and raises ``ConfigError`` naming the key."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from rlhf.config.checks import check, non_negative, number, one_of, positive, positive_or_none, unit_interval
from rlhf.config.options import (
    ZERO_STAGES,
    AttnImplementation,
    CriticInit,
    DataTask,
    Device,
    DistributedKind,
    DType,
    InputFormat,
    OnNonfinite,
    OverlongPolicy,
    ResumeMode,
    RewardKind,
    RewardNormalize,
    WandbMode,
)

DATA_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")

# The reviews task has at least this many distinct prompts (its first sentences; tests/test_reviews.py
# checks it): half of them may be held out.
REVIEW_PROMPTS = 1200
# Its shortest sentence is 5 words, and EOS ends a response (tests/test_reviews.py checks it against the
# grammar): a shorter rollout.max_new_tokens cuts every response that writes anything.
REVIEW_SENTENCE_TOKENS = 6
# The reviews task's gold reward (reward=gold): it scores reviews, so it needs that task's prompts.
GOLD_TARGET = "rlhf.tasks.reviews.gold_reward"


def validate_seed(cfg: Any) -> None:
    # NumPy's global seed (rlhf.app.build.seed_everything) takes only these.
    check(0 <= cfg.seed <= 2**32 - 1, "seed", cfg.seed, "must be in [0, 2**32 - 1]")


# Sizes and warm-up settings of the tiny actor that must be > 0.
TINY_POSITIVE = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads")


TINY_POSITIVE += ("intermediate_size", "warmup_batch_size", "warmup_eval_every", "warmup_lr")


def validate_tiny(cfg: Any) -> None:
    tiny = cfg.model.tiny
    for name in TINY_POSITIVE:
        positive(f"model.tiny.{name}", getattr(tiny, name))
    non_negative("model.tiny.warmup_max_steps", tiny.warmup_max_steps)
    unit_interval("model.tiny.warmup_target_accuracy", tiny.warmup_target_accuracy)
    smoothing = tiny.warmup_label_smoothing
    in_range = smoothing is None or 0 <= smoothing < 1
    check(in_range, "model.tiny.warmup_label_smoothing", smoothing, "must be null or in [0, 1)")
    heads, kv_heads = tiny.num_attention_heads, tiny.num_key_value_heads
    multiple = f"must be a multiple of model.tiny.num_attention_heads={heads}"
    check(tiny.hidden_size % heads == 0, "model.tiny.hidden_size", tiny.hidden_size, multiple)
    divide = f"must divide model.tiny.num_attention_heads={heads}"
    check(heads % kv_heads == 0, "model.tiny.num_key_value_heads", kv_heads, divide)


def validate_model(cfg: Any) -> None:
    model = cfg.model
    one_of("model.dtype", model.dtype, DType)
    if model.attn_implementation is not None:
        one_of("model.attn_implementation", model.attn_implementation, AttnImplementation)
    one_of("model.critic_init", model.critic_init, CriticInit)
    check(
        not (model.shared_critic and model.critic_init != CriticInit.actor),
        "model.critic_init",
        model.critic_init,
        "a shared critic (model.shared_critic=true) uses the actor's own trunk: model.critic_init=actor",
    )
    if model.critic_init == CriticInit.path:
        check(bool(model.critic_path), "model.critic_path", model.critic_path, "model.critic_init=path needs a path")
    if model.critic_init == CriticInit.reward_model:
        check(
            cfg.reward.kind == RewardKind.model,
            "model.critic_init",
            model.critic_init,
            "critic_init=reward_model needs reward.kind=model (a reward model to start from)",
        )
    if model.value_head_std is not None:
        non_negative("model.value_head_std", model.value_head_std)


def validate_lora(cfg: Any) -> None:
    model, lora = cfg.model, cfg.model.lora
    if lora.enabled:
        check(
            model.shared_critic,
            "model.shared_critic",
            model.shared_critic,
            "model.lora.enabled=true keeps one copy of the base model, so the critic must share it: "
            "set model.shared_critic=true",
        )
        positive("model.lora.r", lora.r)
        positive("model.lora.alpha", lora.alpha)
        check(
            lora.dropout == 0,
            "model.lora.dropout",
            lora.dropout,
            "must be 0: PPO needs the same forward at sampling and update time (dropout moves the first ratio)",
        )


def validate_reward_source(cfg: Any) -> None:
    """Where scores come from: a callable, a reward model or an HTTP endpoint."""
    reward = cfg.reward
    one_of("reward.kind", reward.kind, RewardKind)
    if reward.kind == RewardKind.function:
        needs = "reward.kind=function needs a node like {_target_: pkg.module.fn, _partial_: true}"
        check(reward.fn is not None, "reward.fn", reward.fn, needs)
        target = reward.fn.get("_target_") if OmegaConf.is_dict(reward.fn) else None
        gold = "reward=gold is the reviews task's gold reward: needs data.task=reviews (data=reviews)"
        check(target != GOLD_TARGET or cfg.data.task == DataTask.reviews, "reward.fn._target_", target, gold)
    elif reward.kind == RewardKind.model:
        check(bool(reward.path), "reward.path", reward.path, "reward.kind=model needs a hub id or folder")
    elif reward.kind == RewardKind.proxy:
        needs = "reward.kind=proxy is the reviews task's learned reward: needs data.task=reviews"
        check(cfg.data.task == DataTask.reviews, "reward.kind", reward.kind, needs)
        tiny = "reward.kind=proxy learns from the tiny actor's samples: needs model.path=null"
        check(cfg.model.path is None, "model.path", cfg.model.path, tiny)
    else:
        url_ok = bool(reward.url) and reward.url.startswith(("http://", "https://"))
        check(url_ok, "reward.url", reward.url, "reward.kind=http needs an http:// or https:// URL")
    positive("reward.timeout", reward.timeout)
    non_negative("reward.retries", reward.retries)


# Upper bounds of the proxy's sizes, far above real use: it is built and trained on the CPU before the run
# starts, so a slip of the keyboard (three zeros too many) must fail at once instead of exhausting memory
# or running for days.
PROXY_LIMITS = {"hidden_size": 4096, "num_layers": 64, "epochs": 1000}


def validate_proxy(cfg: Any) -> None:
    """The proxy reward model's build (reward.kind=proxy)."""
    proxy = cfg.reward.proxy
    in_range = 20 <= proxy.num_pairs <= 100_000
    check(in_range, "reward.proxy.num_pairs", proxy.num_pairs, "must be in [20, 100000] (a tenth is held out)")
    for name, limit in PROXY_LIMITS.items():
        value = getattr(proxy, name)
        check(value <= limit, f"reward.proxy.{name}", value, f"must be <= {limit} (built on the CPU at start)")
    non_negative("reward.proxy.label_noise", proxy.label_noise)
    check(
        proxy.hidden_size > 0 and proxy.hidden_size % 16 == 0,
        "reward.proxy.hidden_size",
        proxy.hidden_size,
        "must be a positive multiple of 16 (16 dimensions per attention head)",
    )
    for name in ("num_layers", "epochs", "lr", "batch_size"):
        positive(f"reward.proxy.{name}", getattr(proxy, name))
    check(0 <= proxy.seed <= 2**32 - 1, "reward.proxy.seed", proxy.seed, "must be in [0, 2**32 - 1]")


def validate_reward_scaling(cfg: Any) -> None:
    """What is done to the scores before they enter the KL-shaped reward."""
    reward = cfg.reward
    one_of("reward.normalize", reward.normalize, RewardNormalize)
    one_of("reward.on_nonfinite", reward.on_nonfinite, OnNonfinite)
    positive_or_none("reward.clip", reward.clip)


def validate_reward_model(cfg: Any) -> None:
    """How a reward model (or an HTTP endpoint, for batch_size) reads the responses."""
    reward = cfg.reward
    positive("reward.max_length", reward.max_length)
    one_of("reward.dtype", reward.dtype, DType)
    positive("reward.batch_size", reward.batch_size)
    # Whether a reward model's tokenizer has a chat template is checked when it loads.
    one_of("reward.input_format", reward.input_format, InputFormat)


OPTIMIZER_ARGS = {
    "lr": (lambda v: v > 0, "must be > 0"),
    "eps": (lambda v: v > 0, "must be > 0"),
    "weight_decay": (lambda v: v >= 0, "must be >= 0"),
    "momentum": (lambda v: v >= 0, "must be >= 0"),
    "dampening": (lambda v: v >= 0, "must be >= 0"),
}


# torch.optim.lr_scheduler.LinearLR's own ranges (checked by torch on construction), and the length of its ramp.
LINEAR_LR_ARGS = {
    "start_factor": (lambda v: 0 < v <= 1, "must be in (0, 1]"),
    "end_factor": (lambda v: 0 <= v <= 1, "must be in [0, 1]"),
    "total_iters": (lambda v: v >= 0 and v == int(v), "must be a whole number >= 0"),
}


def _check_args(key: str, node: Any, checks: dict) -> None:
    for arg, (ok, allowed) in checks.items():
        if arg in node:
            number(f"{key}.{arg}", node[arg])
            check(ok(node[arg]), f"{key}.{arg}", node[arg], allowed)


def _check_hydra_node(key: str, node: Any) -> None:
    is_node = OmegaConf.is_dict(node)
    check(is_node, key, node, "must be a Hydra node {_target_: pkg.module.Class, _partial_: true, ...}")
    target = node.get("_target_")
    check(isinstance(target, str) and bool(target), f"{key}._target_", target, "must name a class (pkg.module.Class)")


def validate_optimizer(cfg: Any) -> None:
    for name in ("actor", "critic"):
        key, node = f"optimizer.{name}", cfg.optimizer[name]
        _check_hydra_node(key, node)
        _check_args(key, node, OPTIMIZER_ARGS)
        if "betas" in node:
            betas = node.betas
            check(OmegaConf.is_list(betas) and len(betas) == 2, f"{key}.betas", betas, "must be two numbers")
            for i, beta in enumerate(betas):
                number(f"{key}.betas[{i}]", beta)
                check(0 <= beta < 1, f"{key}.betas[{i}]", beta, "must be in [0, 1)")
    scheduler = cfg.optimizer.scheduler
    _check_hydra_node("optimizer.scheduler", scheduler)
    if scheduler._target_.rpartition(".")[2] == "LinearLR":
        _check_args("optimizer.scheduler", scheduler, LINEAR_LR_ARGS)


def validate_hardware(cfg: Any) -> None:
    hardware = cfg.hardware
    one_of("hardware.device", hardware.device, Device)
    one_of("hardware.autocast_dtype", hardware.autocast_dtype, DType)
    positive_or_none("hardware.num_threads", hardware.num_threads)
    one_of("hardware.distributed", hardware.distributed, DistributedKind)
    one_of("hardware.zero_stage", hardware.zero_stage, ZERO_STAGES)
    non_negative("hardware.zero3_persistence_threshold", hardware.zero3_persistence_threshold)
    chunk = hardware.logits_chunk_tokens
    allowed = '"auto", a number of tokens >= 1, or null/0 (the plain path, whole logits)'
    ok = chunk is None or chunk == "auto" or re.fullmatch("[0-9]+", chunk) is not None
    check(ok, "hardware.logits_chunk_tokens", chunk, allowed)


def validate_parallelism(cfg: Any) -> None:
    hardware, shared_critic = cfg.hardware, cfg.model.shared_critic
    if hardware.distributed != DistributedKind.none:
        one_at_a_time = "runs one model at a time per process: set hardware.parallel_models=false"
        check(not hardware.parallel_models, "hardware.distributed", hardware.distributed, one_at_a_time)
        needs = "needs a critic with its own trunk (model.shared_critic=false)"
        check(not shared_critic, "hardware.distributed", hardware.distributed, needs)
    if hardware.parallel_models:
        needs = "runs two models side by side on a CPU's cores: needs hardware.device=cpu"
        check(hardware.device == Device.cpu, "hardware.parallel_models", hardware.parallel_models, needs)
        beside = "a critic sharing the actor's trunk (model.shared_critic=true) cannot run beside it"
        check(not shared_critic, "hardware.parallel_models", hardware.parallel_models, beside)


def _check_data_files(data: Any) -> None:
    check(bool(data.path), "data.path", data.path, "data.task=dataset needs a file, folder or hub dataset name")
    for key in ("path", "eval_path"):
        value = getattr(data, key)
        looks_local = value and (value.endswith(DATA_SUFFIXES) or value.startswith(("/", ".", "~")))
        exists = not looks_local or Path(value).expanduser().exists()
        check(exists, f"data.{key}", value, "no such file or folder")


def validate_data(cfg: Any) -> None:
    data = cfg.data
    one_of("data.task", data.task, DataTask)
    check(data.max_operand >= 1, "data.max_operand", data.max_operand, "must be >= 1")
    if data.task == DataTask.arithmetic:
        num_pairs = (data.max_operand + 1) ** 2
        distinct = f"must be in [1, {num_pairs - 1}] (the built-in task has {num_pairs} distinct prompts)"
        check(0 < data.num_eval < num_pairs, "data.num_eval", data.num_eval, distinct)
    elif data.task == DataTask.reviews:
        limit = REVIEW_PROMPTS // 2
        check(
            0 < data.num_eval <= limit, "data.num_eval", data.num_eval, f"must be in [1, {limit}] on the reviews task"
        )
    else:
        _check_data_files(data)
        positive("data.num_eval", data.num_eval)
    positive("data.max_prompt_length", data.max_prompt_length)
    one_of("data.overlong", data.overlong, OverlongPolicy)


def validate_logging(cfg: Any) -> None:
    logging = cfg.logging
    one_of("logging.wandb.mode", logging.wandb.mode, (None, *WandbMode))
    positive("logging.samples_every", logging.samples_every)
    non_negative("logging.num_samples", logging.num_samples)
    non_negative("logging.debug_samples", logging.debug_samples)


def validate_trainer(cfg: Any) -> None:
    trainer = cfg.trainer
    non_negative("trainer.steps", trainer.steps)
    positive("trainer.eval_every", trainer.eval_every)
    non_negative("trainer.objective_kl_weight", trainer.objective_kl_weight)
    non_negative("trainer.save_every", trainer.save_every)
    positive("trainer.keep_last", trainer.keep_last)
    # From the command line `trainer.resume=true` arrives as the string "True".
    one_of("trainer.resume", str(trainer.resume).lower(), ResumeMode)
