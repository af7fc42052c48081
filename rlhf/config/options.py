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
    """A set of names a ``str`` field takes; members compare and format as their names."""

    def __str__(self) -> str:
        return self.value


class DType(Options):
    """model.dtype, reward.dtype, hardware.autocast_dtype: torch dtypes by name."""

    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"


class CriticInit(Options):
    """model.critic_init: where the critic's trunk comes from."""

    actor = "actor"
    reward_model = "reward_model"
    path = "path"


class RewardKind(Options):
    """reward.kind: how responses are scored."""

    function = "function"
    model = "model"
    http = "http"


class InputFormat(Options):
    """reward.input_format: how a reward model reads (prompt, response)."""

    pair = "pair"
    chat = "chat"


class RewardNormalize(Options):
    """reward.normalize: scaling of the training reward."""

    none = "none"
    running = "running"
    fixed = "fixed"


class OnNonfinite(Options):
    """reward.on_nonfinite: what a NaN/inf score does."""

    error = "error"
    mask = "mask"


class KLControllerKind(Options):
    """kl.controller: constant or adaptive KL coefficient."""

    fixed = "fixed"
    adaptive = "adaptive"


class KLEstimator(Options):
    """kl.estimator: per-token KL estimators (rlhf.core.kl, which keeps its own tuple: the core never
    imports the config; tests/test_config_layout.py checks that the two agree)."""

    k1 = "k1"
    k2 = "k2"
    k3 = "k3"


class Device(Options):
    """hardware.device."""

    cpu = "cpu"
    cuda = "cuda"


class DistributedKind(Options):
    """hardware.distributed: one process, or several with the trained models replicated (DDP) or sharded
    (FSDP2, DeepSpeed ZeRO)."""

    none = "none"
    ddp = "ddp"
    fsdp = "fsdp"
    deepspeed = "deepspeed"


# hardware.zero_stage: the DeepSpeed ZeRO stages rlhf builds engines for.
ZERO_STAGES = (2, 3)


class DataTask(Options):
    """data.task: the built-in arithmetic prompts or prompts from a dataset."""

    arithmetic = "arithmetic"
    dataset = "dataset"


class OverlongPolicy(Options):
    """data.overlong: what happens to prompts over data.max_prompt_length."""

    error = "error"
    filter = "filter"
    truncate = "truncate"


class WandbMode(Options):
    """logging.wandb.mode (or null: online with an API key, else offline)."""

    online = "online"
    offline = "offline"
    disabled = "disabled"


class ResumeMode(Options):
    """trainer.resume (lower-cased: from the command line `true` arrives as "True")."""

    auto = "auto"
    true = "true"
    false = "false"
