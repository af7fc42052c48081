"""The names each option of the config takes, defined once: ``rlhf.config.validate`` checks the config
against them and the modules that act on an option use them.

The fields of ``rlhf.config.schema`` that take these names stay typed ``str`` rather than enum-typed:
OmegaConf would store enum members, which would then flow into W&B, checkpoints and resume comparisons as
objects (and its message, "Invalid value 'k4', expected one of [k1, k2, k3]", puts the key last, on a
separate line); ``validate`` checks each against its enum once, naming the key and the allowed values.
Light on imports: it runs before torch is loaded.
"""

from __future__ import annotations

from enum import Enum


class Options(str, Enum):
    """A set of names a ``str`` field takes; members compare equal to, and format as, their names."""

    def __str__(self) -> str:
        return self.value


def _options(name: str, *names: str) -> type[Options]:
    """An ``Options`` enum whose members are named as their values (``DType.float32 == "float32"``)."""
    return Options(name, [(value, value) for value in names], module=__name__, qualname=name)


# model.dtype, reward.dtype, hardware.autocast_dtype: torch dtypes by name.
DType = _options("DType", "float32", "bfloat16", "float16")

# model.attn_implementation (when set): transformers' attention kernels.
AttnImplementation = _options("AttnImplementation", "eager", "sdpa", "flex_attention", "flash_attention_2")

# model.critic_init: where the critic's trunk comes from.
CriticInit = _options("CriticInit", "actor", "reward_model", "path")

# reward.kind: how responses are scored (a Python callable, a sequence classifier, an HTTP endpoint).
RewardKind = _options("RewardKind", "function", "model", "http", "proxy")

# reward.input_format: how a reward model reads (prompt, response).
InputFormat = _options("InputFormat", "pair", "chat")

# reward.normalize: scaling of the training reward.
RewardNormalize = _options("RewardNormalize", "none", "running", "fixed")

# reward.on_nonfinite: what a NaN/inf score does.
OnNonfinite = _options("OnNonfinite", "error", "mask")

# kl.controller: a constant or an adaptive KL coefficient.
KLControllerKind = _options("KLControllerKind", "fixed", "adaptive")

# kl.estimator: the per-token KL estimators. rlhf.core.kl keeps its own tuple (the core never imports
# the config); tests/test_config_layout.py checks that the two agree.
KLEstimator = _options("KLEstimator", "k1", "k2", "k3")

# kl.mode: the KL penalty shapes the reward, or is a term of the policy loss (GRPO style).
KLMode = _options("KLMode", "reward", "loss")

# ppo.loss_agg: how per-token losses are averaged. rlhf.core.losses keeps its own tuple (the core never
# imports the config); tests/test_ppo_knobs.py checks that the two agree.
LossAgg = _options("LossAgg", "token_mean", "seq_mean_token_mean", "seq_mean_token_sum")
# advantage.estimator: gae (with a critic) or a critic-free estimator. rlhf.core.advantages keeps its own
# tuple (the core never imports the config); tests/test_advantages.py checks that the two agree.
AdvantageEstimator = _options("AdvantageEstimator", "gae", "grpo", "rloo", "reinforce_pp", "remax")

# hardware.device.
Device = _options("Device", "cpu", "cuda")

# hardware.distributed: one process, or several with the trained models replicated (DDP) or sharded
# (FSDP2, DeepSpeed ZeRO).
DistributedKind = _options("DistributedKind", "none", "ddp", "fsdp", "deepspeed")

# hardware.zero_stage: the DeepSpeed ZeRO stages rlhf builds engines for.
ZERO_STAGES = (2, 3)

# data.task: a built-in task's prompts (arithmetic, reviews) or prompts from a dataset.
DataTask = _options("DataTask", "arithmetic", "reviews", "dataset")

# data.overlong: what happens to prompts over data.max_prompt_length.
OverlongPolicy = _options("OverlongPolicy", "error", "filter", "truncate")

# logging.wandb.mode (or null: online with an API key, else offline).
WandbMode = _options("WandbMode", "online", "offline", "disabled")

# trainer.resume (compared lower-cased: from the command line `true` arrives as "True").
ResumeMode = _options("ResumeMode", "auto", "true", "false")
