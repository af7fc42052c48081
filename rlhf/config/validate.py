"""Start-up validation of a composed config: ``validate(cfg)``, the one entry.

``conf/train.yaml`` composes the groups on top of ``rlhf.config.schema.TrainConfig``, so OmegaConf checks
types (``kl.beta=abc`` fails) and unknown keys (``kl.betta=1`` fails). ``validate`` checks what OmegaConf
lets through: keys added with ``+``/``++`` that the schema lacks, non-finite floats anywhere, option
names, ranges, relations, optimizer and scheduler arguments by name, and upper bounds of sizes. It runs
before any model is built and imports neither torch nor transformers; each error names the full key, the
value and what is allowed. The shape checks live in ``rlhf.config.checks``, the per-group validators in
``rlhf.config.validators``.
"""

from __future__ import annotations

from typing import Any

from rlhf.config import algorithm_validators as algorithm
from rlhf.config import validators as groups
from rlhf.config.checks import validate_finite, validate_known_keys, validate_sizes

# One validator per config group, in the order errors are reported: the shape of the config (unknown
# keys, non-finite floats) first, then each group's ranges and relations (the optimizer's last: its
# total_iters follows trainer.steps, which is named when it is the one at fault), then the size limits.
VALIDATORS = (
    validate_known_keys,
    validate_finite,
    groups.validate_seed,
    groups.validate_tiny,
    groups.validate_model,
    groups.validate_lora,
    groups.validate_reward_source,
    groups.validate_proxy,
    groups.validate_reward_scaling,
    groups.validate_reward_model,
    algorithm.validate_kl,
    algorithm.validate_gae,
    algorithm.validate_advantage,
    groups.validate_hardware,
    groups.validate_parallelism,
    groups.validate_data,
    algorithm.validate_rollout,
    algorithm.validate_ppo,
    groups.validate_logging,
    groups.validate_trainer,
    groups.validate_optimizer,
    validate_sizes,
)


def validate(cfg: Any) -> None:
    """Check ranges and relations of a composed config; raise ``ConfigError`` naming the key. Needs
    neither torch nor transformers, so a bad command line fails before they are imported."""
    for validator in VALIDATORS:
        validator(cfg)
