"""The settings PPO reads, as small frozen dataclasses built once from the config by ``rlhf.app.build``
(torchtune's read-once style): below the composition root nothing sees the config object."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class ExperienceSettings:
    """From a rollout's forwards to advantages and returns (config groups ``kl`` and ``gae``)."""

    kl_estimator: str  # per-token KL in the reward: "k1", "k2" or "k3"
    gamma: float  # discount
    lam: float  # GAE lambda
    whiten_rewards: bool  # whiten the KL-shaped rewards, keeping their mean, before GAE
    whiten_advantages: bool  # whiten the advantages after GAE
    advantage_clip: float | None = None  # clamp the advantages to [-clip, clip] after whitening
    kl_mode: str = "reward"  # "reward": -beta * kl shapes the rewards; "loss": no KL in them (the policy loss has it)
    estimator: str = "gae"  # advantage.estimator: gae, or critic-free grpo, rloo, reinforce_pp, remax
    std_normalize: bool = True  # grpo: divide by the group's std (false: Dr. GRPO)
    lam_critic: float | None = None  # GAE lambda of the returns (the critic's targets); None = lam
    lam_adaptive_alpha: float | None = None  # the policy's lambda per sequence 1 - 1/(alpha * length); None = lam


@dataclass(frozen=True)
class PPOSettings:
    """What one PPO iteration reads: rollout, reward post-processing, experience, update, precision."""

    # rollout (and data.max_prompt_length, the prompts' left-padded width)
    max_new_tokens: int
    temperature: float
    max_prompt_length: int
    # reward: "error" stops at a NaN/inf score, "mask" drops the sample; truncated responses' score
    on_nonfinite: str
    missing_eos_penalty: float | None
    experience: ExperienceSettings
    # update
    epochs: int
    minibatch_size: int  # per rank
    clip_eps: float
    value_clip_eps: float | None
    vf_coef: float
    entropy_coef: float
    max_grad_norm: float
    max_consecutive_skips: int
    # precision of the forwards: "float32" runs without autocast
    device: str
    autocast_dtype: str
    # PPO knobs (README, "PPO knobs"): the ratio's clip range [1 - low, 1 + high] (None = clip_eps), the
    # dual-clip bound c (None = off), how per-token losses are averaged, critic-only iterations first
    clip_eps_low: float | None = None
    clip_eps_high: float | None = None
    dual_clip_c: float | None = None
    loss_agg: str = "token_mean"  # "token_mean", "seq_mean_token_mean" or "seq_mean_token_sum"
    critic_warmup_steps: int = 0
    # rollout.n samples of each prompt, grouped (Samples.group_ids)
    samples_per_prompt: int = 1
    # hardware.logits_chunk_tokens: "auto", tokens per chunk of logits, or None/"0" (the plain (B, A, V) logits)
    logits_chunk_tokens: str | None = None


class KLController(Protocol):
    """``rlhf.core.kl.FixedKLController`` or ``AdaptiveKLController``: the coefficient and its update."""

    value: float

    def update(self, current_kl: float, n_steps: int) -> None: ...
