"""Typed schema of a run, registered in Hydra's ConfigStore, and its start-up validation.

``conf/train.yaml`` composes the groups on top of ``TrainConfig``, so OmegaConf checks types
(``kl.beta=abc`` fails) and unknown keys (``kl.betta=1`` fails). ``validate`` checks what OmegaConf
lets through: keys added with ``+``/``++`` that the schema lacks, non-finite floats anywhere, ranges,
relations, optimizer and scheduler arguments by name, and upper bounds of sizes. It runs before any
model is built and imports neither torch nor transformers; each error names the full key, the value
and what is allowed.
"""

from __future__ import annotations

import difflib
import math
from dataclasses import is_dataclass
from pathlib import Path
from typing import Any, get_type_hints

from omegaconf import OmegaConf

from rlhf.config.errors import ConfigError
from rlhf.config.schema import DISTRIBUTED_KINDS, TrainConfig


def _check(ok: bool, key: str, value: object, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={value!r} is not allowed: {allowed}")


def _one_of(key: str, value: object, options: tuple) -> None:
    _check(value in options, key, value, "one of " + ", ".join(map(str, options)))


def _positive(key: str, value: float) -> None:
    _check(value > 0, key, value, "must be > 0")


def _non_negative(key: str, value: float) -> None:
    _check(value >= 0, key, value, "must be >= 0")


def _unit_interval(key: str, value: float) -> None:
    _check(0.0 <= value <= 1.0, key, value, "must be in [0, 1]")


def _number(key: str, value: object) -> None:
    _check(isinstance(value, int | float) and not isinstance(value, bool), key, value, "must be a number")


DTYPE_NAMES = ("float32", "bfloat16", "float16")


DATA_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")


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
            _check(False, f"{prefix}{key}", value, f"unknown key (the schema is rlhf.config.schema.TrainConfig){hint}")
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
                _check(False, key, choice, f"no such option of the config group {key}: {hint}options: {options}")
        return
    node: Any = value
    for part in reversed(key.split(".")):
        node = {part: node}
    _check_known(node, TrainConfig, "")


def _validate_known_keys(cfg: Any) -> None:
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
        _check(math.isfinite(node), key, node, "must be a finite number")


def _validate_finite(cfg: Any) -> None:
    # inf passes a range check such as `>= 0` (and kl.beta=inf makes every step non-finite, so skipped),
    # nan fails it with a message that does not say why: every float of the config is checked here once.
    _check_finite(OmegaConf.to_container(cfg, resolve=True), "")


def _validate_seed(cfg: Any) -> None:
    # NumPy's global seed (rlhf.app.build.seed_everything) takes only these.
    _check(0 <= cfg.seed <= 2**32 - 1, "seed", cfg.seed, "must be in [0, 2**32 - 1]")


# Sizes and warm-up settings of the tiny actor that must be > 0.
TINY_POSITIVE = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads")


TINY_POSITIVE += ("intermediate_size", "warmup_batch_size", "warmup_eval_every", "warmup_lr")


def _validate_tiny(cfg: Any) -> None:
    tiny = cfg.model.tiny
    for name in TINY_POSITIVE:
        _positive(f"model.tiny.{name}", getattr(tiny, name))
    _non_negative("model.tiny.warmup_max_steps", tiny.warmup_max_steps)
    _unit_interval("model.tiny.warmup_target_accuracy", tiny.warmup_target_accuracy)
    smoothing = tiny.warmup_label_smoothing
    _check(0 <= smoothing < 1, "model.tiny.warmup_label_smoothing", smoothing, "must be in [0, 1)")
    heads, kv_heads = tiny.num_attention_heads, tiny.num_key_value_heads
    multiple = f"must be a multiple of model.tiny.num_attention_heads={heads}"
    _check(tiny.hidden_size % heads == 0, "model.tiny.hidden_size", tiny.hidden_size, multiple)
    divide = f"must divide model.tiny.num_attention_heads={heads}"
    _check(heads % kv_heads == 0, "model.tiny.num_key_value_heads", kv_heads, divide)


def _validate_model(cfg: Any) -> None:
    model = cfg.model
    _one_of("model.dtype", model.dtype, DTYPE_NAMES)
    _one_of("model.critic_init", model.critic_init, ("actor", "reward_model", "path"))
    _check(
        not (model.shared_critic and model.critic_init != "actor"),
        "model.critic_init",
        model.critic_init,
        "a shared critic (model.shared_critic=true) uses the actor's own trunk: model.critic_init=actor",
    )
    if model.critic_init == "path":
        _check(bool(model.critic_path), "model.critic_path", model.critic_path, "model.critic_init=path needs a path")
    if model.critic_init == "reward_model":
        _check(
            cfg.reward.kind == "model",
            "model.critic_init",
            model.critic_init,
            "critic_init=reward_model needs reward.kind=model (a reward model to start from)",
        )
    if model.value_head_std is not None:
        _non_negative("model.value_head_std", model.value_head_std)


def _validate_lora(cfg: Any) -> None:
    model, lora = cfg.model, cfg.model.lora
    if lora.enabled:
        _check(
            model.shared_critic,
            "model.shared_critic",
            model.shared_critic,
            "model.lora.enabled=true keeps one copy of the base model, so the critic must share it: "
            "set model.shared_critic=true",
        )
        _positive("model.lora.r", lora.r)
        _positive("model.lora.alpha", lora.alpha)
        _check(
            lora.dropout == 0,
            "model.lora.dropout",
            lora.dropout,
            "must be 0: PPO needs the same forward at sampling and update time (dropout moves the first ratio)",
        )


def _validate_reward_input(reward: Any) -> None:
    """How a reward model reads its input; whether its tokenizer has a chat template is checked when it loads."""
    _one_of("reward.input_format", reward.input_format, ("pair", "chat"))


def _validate_reward(cfg: Any) -> None:
    reward = cfg.reward
    _one_of("reward.kind", reward.kind, ("function", "model", "http"))
    if reward.kind == "function":
        _check(
            reward.fn is not None,
            "reward.fn",
            reward.fn,
            "reward.kind=function needs a node like {_target_: pkg.module.fn, _partial_: true}",
        )
    elif reward.kind == "model":
        _check(bool(reward.path), "reward.path", reward.path, "reward.kind=model needs a hub id or folder")
    else:
        url_ok = bool(reward.url) and reward.url.startswith(("http://", "https://"))
        _check(url_ok, "reward.url", reward.url, "reward.kind=http needs an http:// or https:// URL")
    _positive("reward.timeout", reward.timeout)
    _non_negative("reward.retries", reward.retries)
    _one_of("reward.normalize", reward.normalize, ("none", "running", "fixed"))
    _one_of("reward.on_nonfinite", reward.on_nonfinite, ("error", "mask"))
    if reward.clip is not None:
        _positive("reward.clip", reward.clip)
    _positive("reward.max_length", reward.max_length)
    _one_of("reward.dtype", reward.dtype, DTYPE_NAMES)
    _positive("reward.batch_size", reward.batch_size)
    _validate_reward_input(reward)


def _validate_kl(cfg: Any) -> None:
    kl = cfg.kl
    _one_of("kl.controller", kl.controller, ("fixed", "adaptive"))
    _non_negative("kl.beta", kl.beta)
    _one_of("kl.estimator", kl.estimator, ("k1", "k2", "k3"))
    if kl.controller == "adaptive":
        _check(
            kl.target is not None and kl.target > 0,
            "kl.target",
            kl.target,
            "kl.controller=adaptive needs a target > 0",
        )
        _check(
            kl.horizon is not None and kl.horizon > 0,
            "kl.horizon",
            kl.horizon,
            "kl.controller=adaptive needs a horizon > 0",
        )


def _validate_gae(cfg: Any) -> None:
    _unit_interval("gae.gamma", cfg.gae.gamma)
    _unit_interval("gae.lam", cfg.gae.lam)
    if cfg.gae.advantage_clip is not None:
        _positive("gae.advantage_clip", cfg.gae.advantage_clip)


# Arguments of an optimizer node checked by name, whatever its _target_ (they mean the same in every
# torch.optim optimizer that takes them): torch itself checks them only when the optimizer is built,
# after the models are loaded, and its messages do not name the key.
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
            _number(f"{key}.{arg}", node[arg])
            _check(ok(node[arg]), f"{key}.{arg}", node[arg], allowed)


def _check_hydra_node(key: str, node: Any) -> None:
    _check(
        OmegaConf.is_dict(node), key, node, "must be a Hydra node {_target_: pkg.module.Class, _partial_: true, ...}"
    )
    target = node.get("_target_")
    _check(isinstance(target, str) and bool(target), f"{key}._target_", target, "must name a class (pkg.module.Class)")


def _validate_optimizer(cfg: Any) -> None:
    for name in ("actor", "critic"):
        key, node = f"optimizer.{name}", cfg.optimizer[name]
        _check_hydra_node(key, node)
        _check_args(key, node, OPTIMIZER_ARGS)
        if "betas" in node:
            betas = node.betas
            _check(OmegaConf.is_list(betas) and len(betas) == 2, f"{key}.betas", betas, "must be two numbers")
            for i, beta in enumerate(betas):
                _number(f"{key}.betas[{i}]", beta)
                _check(0 <= beta < 1, f"{key}.betas[{i}]", beta, "must be in [0, 1)")
    scheduler = cfg.optimizer.scheduler
    _check_hydra_node("optimizer.scheduler", scheduler)
    if scheduler._target_.rpartition(".")[2] == "LinearLR":
        _check_args("optimizer.scheduler", scheduler, LINEAR_LR_ARGS)


def _validate_hardware(cfg: Any) -> None:
    hardware = cfg.hardware
    _one_of("hardware.device", hardware.device, ("cpu", "cuda"))
    _one_of("hardware.autocast_dtype", hardware.autocast_dtype, DTYPE_NAMES)
    if hardware.num_threads is not None:
        _positive("hardware.num_threads", hardware.num_threads)
    _one_of("hardware.distributed", hardware.distributed, DISTRIBUTED_KINDS)
    _one_of("hardware.zero_stage", hardware.zero_stage, (2, 3))
    _non_negative("hardware.zero3_persistence_threshold", hardware.zero3_persistence_threshold)


def _validate_parallelism(cfg: Any) -> None:
    hardware, shared_critic = cfg.hardware, cfg.model.shared_critic
    if hardware.distributed != "none":
        _check(
            not hardware.parallel_models,
            "hardware.distributed",
            hardware.distributed,
            "runs one model at a time per process: set hardware.parallel_models=false",
        )
        needs = "needs a critic with its own trunk (model.shared_critic=false)"
        _check(not shared_critic, "hardware.distributed", hardware.distributed, needs)
    if hardware.parallel_models:
        needs = "runs two models side by side on a CPU's cores: needs hardware.device=cpu"
        _check(hardware.device == "cpu", "hardware.parallel_models", hardware.parallel_models, needs)
        _check(
            not shared_critic,
            "hardware.parallel_models",
            hardware.parallel_models,
            "a critic sharing the actor's trunk (model.shared_critic=true) cannot run beside it",
        )


def _validate_data(cfg: Any) -> None:
    data = cfg.data
    _one_of("data.task", data.task, ("arithmetic", "dataset"))
    _check(data.max_operand >= 1, "data.max_operand", data.max_operand, "must be >= 1")
    if data.task == "arithmetic":
        num_pairs = (data.max_operand + 1) ** 2
        _check(
            0 < data.num_eval < num_pairs,
            "data.num_eval",
            data.num_eval,
            f"must be in [1, {num_pairs - 1}] (the built-in task has {num_pairs} distinct prompts)",
        )
    else:
        _check(bool(data.path), "data.path", data.path, "data.task=dataset needs a file, folder or hub dataset name")
        for key in ("path", "eval_path"):
            value = getattr(data, key)
            looks_local = value and (value.endswith(DATA_SUFFIXES) or value.startswith(("/", ".", "~")))
            exists = not looks_local or Path(value).expanduser().exists()
            _check(exists, f"data.{key}", value, "no such file or folder")
        _positive("data.num_eval", data.num_eval)
    _positive("data.max_prompt_length", data.max_prompt_length)
    _one_of("data.overlong", data.overlong, ("error", "filter", "truncate"))


def _validate_rollout(cfg: Any) -> None:
    _positive("rollout.batch_size", cfg.rollout.batch_size)
    _positive("rollout.max_new_tokens", cfg.rollout.max_new_tokens)
    _positive("rollout.temperature", cfg.rollout.temperature)


def _validate_ppo(cfg: Any) -> None:
    ppo, batch_size = cfg.ppo, cfg.rollout.batch_size
    _positive("ppo.epochs", ppo.epochs)
    _positive("ppo.minibatch_size", ppo.minibatch_size)
    _check(
        batch_size % ppo.minibatch_size == 0,
        "ppo.minibatch_size",
        ppo.minibatch_size,
        f"must divide rollout.batch_size={batch_size}",
    )
    _positive("ppo.clip_eps", ppo.clip_eps)
    if ppo.value_clip_eps is not None:
        _positive("ppo.value_clip_eps", ppo.value_clip_eps)
    _non_negative("ppo.vf_coef", ppo.vf_coef)
    _non_negative("ppo.entropy_coef", ppo.entropy_coef)
    _positive("ppo.max_grad_norm", ppo.max_grad_norm)
    _positive("ppo.max_consecutive_skips", ppo.max_consecutive_skips)


def _validate_logging(cfg: Any) -> None:
    logging = cfg.logging
    _one_of("logging.wandb.mode", logging.wandb.mode, (None, "online", "offline", "disabled"))
    _positive("logging.samples_every", logging.samples_every)
    _non_negative("logging.num_samples", logging.num_samples)
    _non_negative("logging.debug_samples", logging.debug_samples)


def _validate_trainer(cfg: Any) -> None:
    trainer = cfg.trainer
    _non_negative("trainer.steps", trainer.steps)
    _positive("trainer.eval_every", trainer.eval_every)
    _non_negative("trainer.objective_kl_weight", trainer.objective_kl_weight)
    _non_negative("trainer.save_every", trainer.save_every)
    _positive("trainer.keep_last", trainer.keep_last)
    # From the command line `trainer.resume=true` arrives as the string "True".
    _one_of("trainer.resume", str(trainer.resume).lower(), ("auto", "true", "false"))


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


def _validate_sizes(cfg: Any) -> None:
    for key, (limit, why) in SIZE_LIMITS.items():
        value = OmegaConf.select(cfg, key)
        _check(value is None or value <= limit, key, value, f"must be <= {limit} ({why})")


# One validator per config group, in the order errors are reported: the shape of the config (unknown
# keys, non-finite floats) first, then each group's ranges and relations (the optimizer's last: its
# total_iters follows trainer.steps, which is named when it is the one at fault), then the size limits.
VALIDATORS = (
    _validate_known_keys,
    _validate_finite,
    _validate_seed,
    _validate_tiny,
    _validate_model,
    _validate_lora,
    _validate_reward,
    _validate_kl,
    _validate_gae,
    _validate_hardware,
    _validate_parallelism,
    _validate_data,
    _validate_rollout,
    _validate_ppo,
    _validate_logging,
    _validate_trainer,
    _validate_optimizer,
    _validate_sizes,
)


def validate(cfg: Any) -> None:
    """Check ranges and relations of a composed config; raise ``ConfigError`` naming the key. Needs
    neither torch nor transformers, so a bad command line fails before they are imported."""
    for validator in VALIDATORS:
        validator(cfg)
