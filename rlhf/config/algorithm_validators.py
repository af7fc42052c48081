"""Validators of the RL algorithm's groups: ``kl``, ``gae``, ``advantage``, ``rollout`` and ``ppo`` (with
its knobs). The other groups' are in ``rlhf.config.validators``; ``rlhf.config.validate`` runs both."""

from __future__ import annotations

from typing import Any

from rlhf.config.checks import check, non_negative, one_of, positive, positive_or_none, unit_interval
from rlhf.config.options import (
    AdvantageEstimator,
    DataTask,
    KLControllerKind,
    KLEstimator,
    KLMode,
    LossAgg,
)
from rlhf.config.validators import REVIEW_SENTENCE_TOKENS


def validate_kl(cfg: Any) -> None:
    kl = cfg.kl
    one_of("kl.controller", kl.controller, KLControllerKind)
    non_negative("kl.beta", kl.beta)
    one_of("kl.estimator", kl.estimator, KLEstimator)
    one_of("kl.mode", kl.mode, KLMode)
    if kl.controller == KLControllerKind.adaptive:
        target_ok = kl.target is not None and kl.target > 0
        check(target_ok, "kl.target", kl.target, "kl.controller=adaptive needs a target > 0")
        horizon_ok = kl.horizon is not None and kl.horizon > 0
        check(horizon_ok, "kl.horizon", kl.horizon, "kl.controller=adaptive needs a horizon > 0")


def validate_gae(cfg: Any) -> None:
    unit_interval("gae.gamma", cfg.gae.gamma)
    unit_interval("gae.lam", cfg.gae.lam)
    positive_or_none("gae.advantage_clip", cfg.gae.advantage_clip)
    if cfg.gae.lam_critic is not None:
        unit_interval("gae.lam_critic", cfg.gae.lam_critic)
    positive_or_none("gae.lam_adaptive_alpha", cfg.gae.lam_adaptive_alpha)


def validate_advantage(cfg: Any) -> None:
    estimator, n = cfg.advantage.estimator, cfg.rollout.n
    one_of("advantage.estimator", estimator, AdvantageEstimator)
    if estimator in (AdvantageEstimator.grpo, AdvantageEstimator.rloo):
        check(n >= 2, "rollout.n", n, f"advantage.estimator={estimator} compares samples of a prompt: needs >= 2")
    if estimator != AdvantageEstimator.gae:
        no_critic = f"advantage.estimator={estimator} builds no critic to share the actor's trunk: set it false"
        check(not cfg.model.shared_critic, "model.shared_critic", cfg.model.shared_critic, no_critic)


# Arguments of an optimizer node checked by name, whatever its _target_ (they mean the same in every
# torch.optim optimizer that takes them): torch itself checks them only when the optimizer is built,
# after the models are loaded, and its messages do not name the key.
def validate_rollout(cfg: Any) -> None:
    positive("rollout.batch_size", cfg.rollout.batch_size)
    positive("rollout.max_new_tokens", cfg.rollout.max_new_tokens)
    if cfg.data.task == DataTask.reviews:
        sentence = f"must be >= {REVIEW_SENTENCE_TOKENS} on the reviews task (its shortest sentence and EOS; "
        sentence += "experiment=overoptimization sets 22)"
        check(
            cfg.rollout.max_new_tokens >= REVIEW_SENTENCE_TOKENS,
            "rollout.max_new_tokens",
            cfg.rollout.max_new_tokens,
            sentence,
        )
    positive("rollout.temperature", cfg.rollout.temperature)
    positive("rollout.n", cfg.rollout.n)


def validate_ppo(cfg: Any) -> None:
    ppo, batch_size, n = cfg.ppo, cfg.rollout.batch_size, cfg.rollout.n
    positive("ppo.epochs", ppo.epochs)
    positive("ppo.minibatch_size", ppo.minibatch_size)
    # The update's batch is every sample: rollout.batch_size prompts times rollout.n samples each.
    samples = f"rollout.batch_size={batch_size}" if n == 1 else f"rollout.batch_size * rollout.n={batch_size * n}"
    divides = batch_size * n % ppo.minibatch_size == 0
    check(divides, "ppo.minibatch_size", ppo.minibatch_size, f"must divide {samples}")
    positive("ppo.clip_eps", ppo.clip_eps)
    positive_or_none("ppo.value_clip_eps", ppo.value_clip_eps)
    non_negative("ppo.vf_coef", ppo.vf_coef)
    non_negative("ppo.entropy_coef", ppo.entropy_coef)
    positive("ppo.max_grad_norm", ppo.max_grad_norm)
    positive("ppo.max_consecutive_skips", ppo.max_consecutive_skips)
    validate_ppo_knobs(cfg)


def validate_ppo_knobs(cfg: Any) -> None:
    """The clip variants, loss aggregation and critic warm-up (README, "PPO knobs")."""
    ppo = cfg.ppo
    positive_or_none("ppo.clip_eps_low", ppo.clip_eps_low)
    positive_or_none("ppo.clip_eps_high", ppo.clip_eps_high)
    if ppo.dual_clip_c is not None:
        bound = "must be null (off) or > 1: the bound -c * A of a negative advantage lies beyond the clipped range"
        check(ppo.dual_clip_c > 1, "ppo.dual_clip_c", ppo.dual_clip_c, bound)
    one_of("ppo.loss_agg", ppo.loss_agg, LossAgg)
    non_negative("ppo.critic_warmup_steps", ppo.critic_warmup_steps)
    if ppo.critic_warmup_steps > 0:
        alone = "trains the critic alone, which needs its own trunk: set model.shared_critic=false"
        check(not cfg.model.shared_critic, "ppo.critic_warmup_steps", ppo.critic_warmup_steps, alone)
        critic = f"trains the critic alone, and advantage={cfg.advantage.estimator} has none: use advantage=gae or 0"
        check(cfg.advantage.estimator == "gae", "ppo.critic_warmup_steps", ppo.critic_warmup_steps, critic)
