"""Typed schema of a run, registered in Hydra's ConfigStore: with ``rlhf.config.nested`` (model.tiny,
model.lora, reward.proxy, logging.wandb), the one home of every key's default (the YAML presets in conf/
state only what they change). The names a ``str`` field takes are the enums of ``rlhf.config.options``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from rlhf.config.nested import LoraConfig, ProxyConfig, TinyModelConfig, WandbConfig
from rlhf.config.options import DistributedKind


@dataclass
class ModelConfig:
    """Actor (and from it reference and critic)."""

    # Hub id or local folder of a causal LM; null builds the tiny actor for the task below.
    path: str | None = None
    # Hub id or folder of the tokenizer; null = model.path.
    tokenizer_path: str | None = None
    # Run code shipped with a checkpoint (only for models you trust).
    trust_remote_code: bool = False
    # A tokenizer without a pad token gets a new one (true) or stops the run with an error (false).
    add_pad_token: bool = True
    # Weights dtype: float32, bfloat16 or float16.
    dtype: str = "float32"
    # Attention kernel of actor, reference and critic (transformers' attn_implementation): null = its
    # default (sdpa), or eager, sdpa, flex_attention, flash_attention_2. In bf16 on this CPU eager ran a
    # forward + backward of the benchmark's "small" model 18 % faster than sdpa (fp32: the same).
    attn_implementation: str | None = None
    # Critic shares the actor's trunk (one optimizer, loss = pg + vf_coef * vf) instead of a copy.
    shared_critic: bool = False
    # Critic trunk: "actor" (a copy of the actor's), "reward_model" (reward.path's) or "path" (critic_path).
    critic_init: str = "actor"
    # Checkpoint of the critic trunk for critic_init=path.
    critic_path: str | None = None
    # Value-head init std; 0 = zeros, null = 1 / (hidden size + 1).
    value_head_std: float | None = None
    # Where built tiny models are cached (keyed by their config); null = $RLHF_CACHE or ~/.cache/rlhf.
    cache_dir: str | None = None
    tiny: TinyModelConfig = field(default_factory=TinyModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)


@dataclass
class RewardConfig:
    """How responses are scored."""

    # "function": a Python callable (prompts, responses) -> scores from ``fn``;
    # "model": a Hugging Face sequence classifier at ``path`` with its own tokenizer;
    # "http": POST {"prompts", "responses"} as JSON to ``url``, answered by {"scores"};
    # "proxy": the reviews task's proxy reward model, built as ``proxy`` says (data.task=reviews).
    kind: str = "function"
    # Hydra node of the reward callable, e.g. {_target_: pkg.mod.fn, _partial_: true}.
    fn: Any = None
    # Hub id or local folder of the reward model (kind=model).
    path: str | None = None
    # Reward-model input (kind=model): "pair" = (prompt, response) as a text pair; "chat" = user + assistant turn.
    input_format: str = "pair"
    # Maximum reward-model input length in its own tokens (kind=model).
    max_length: int = 512
    # Reward-model weights dtype (kind=model): float32, bfloat16 or float16.
    dtype: str = "float32"
    # Reward-model forward batch size (kind=model), or responses per request (kind=http).
    batch_size: int = 16
    # Endpoint of kind=http.
    url: str | None = None
    # Seconds before an HTTP request is given up (kind=http).
    timeout: float = 30.0
    # Extra attempts after a failed HTTP request (kind=http).
    retries: int = 2
    # Extra HTTP headers (kind=http), e.g. +reward.headers.Authorization='Bearer ${oc.env:REWARD_API_TOKEN}';
    # a value read from the environment with ${oc.env:...} is never written to W&B, checkpoints or the run dir.
    headers: dict[str, str] = field(default_factory=dict)
    # Training-reward scaling: "none", "running" (running mean/std) or "fixed" (gain * score + bias).
    normalize: str = "none"
    # normalize=fixed: multiplier.
    gain: float = 1.0
    # normalize=fixed: offset.
    bias: float = 0.0
    # Clip training rewards to [-clip, clip] after scaling; null = no clipping.
    clip: float | None = None
    # A NaN/inf score: "error" stops the step before any update, naming the samples; "mask" drops
    # those samples from the update and the statistics and counts them (objective/nonfinite_scores).
    on_nonfinite: str = "error"
    # Score given instead when a response hits max_new_tokens without EOS; null = keep the score.
    missing_eos_penalty: float | None = None
    # kind=proxy: how the proxy reward model is built.
    proxy: ProxyConfig = field(default_factory=ProxyConfig)


@dataclass
class KLConfig:
    """KL penalty to the reference."""

    # "fixed" or "adaptive" (Ziegler et al. 2019).
    controller: str = "fixed"
    # KL coefficient (initial value for the adaptive controller).
    beta: float = 0.02
    # Per-token estimator in the reward: k1, k2 or k3.
    estimator: str = "k1"
    # Adaptive controller: KL (per sequence, summed over tokens) to steer towards.
    target: float | None = None
    # Adaptive controller: samples over which the error is corrected.
    horizon: int | None = None
    # Where the KL goes: "reward" (-beta * kl shapes the per-token rewards; Ziegler et al. 2019) or "loss"
    # (no KL in the rewards; the policy loss adds beta * the estimator against the reference; GRPO, Shao et al. 2024).
    mode: str = "reward"


@dataclass
class GAEConfig:
    """Advantage estimation."""

    # Discount factor.
    gamma: float = 1.0
    # GAE lambda (0 = one-step TD, 1 = Monte Carlo returns).
    lam: float = 0.95
    # Normalise the KL-shaped rewards (masked, keeping their mean) before GAE.
    whiten_rewards: bool = False
    # Normalise advantages to zero mean, unit variance over the batch's action tokens.
    whiten_advantages: bool = True
    # Clip advantages (after whitening) to [-advantage_clip, advantage_clip]; null = no clipping.
    advantage_clip: float | None = None
    # Lambda of the critic's targets (returns); null = lam (decoupled GAE: Yuan et al. 2025, VC-PPO).
    lam_critic: float | None = None
    # Policy lambda per sequence 1 - 1/(alpha * response length); null = lam (Yue et al. 2025, VAPO, alpha 0.05).
    lam_adaptive_alpha: float | None = None


@dataclass
class AdvantageConfig:
    """The advantage estimator (conf/advantage/): gae with a critic, or a critic-free one."""

    # gae (with a critic), grpo, rloo, reinforce_pp or remax (no critic); README's "Advantage estimators".
    estimator: str = "gae"
    # grpo: divide by the group's score std (false = Dr. GRPO, Liu et al. 2025).
    std_normalize: bool = True


@dataclass
class OptimizerConfig:
    """Optimizers of the actor and the critic and their LR schedule (no defaults: conf/optimizer/). Nodes
    are instantiated with ``_partial_: true`` and then given the parameters (or the optimizer)."""

    actor: Any = MISSING
    critic: Any = MISSING
    scheduler: Any = MISSING
    # With model.dtype bfloat16/float16: step float32 master copies of the trained weights, state in float32.
    master_weights: bool = True


# The names of hardware.distributed, as a tuple for the runtime's own check.
DISTRIBUTED_KINDS = tuple(DistributedKind)


@dataclass
class HardwareConfig:
    """Device, precision and processes (the defaults: one CPU process in float32)."""

    # "cpu" or "cuda".
    device: str = "cpu"
    # Autocast dtype for forwards ("float32" = no autocast).
    autocast_dtype: str = "float32"
    # torch intra-op threads (1 is fastest for tiny models on a busy 2-core machine); null leaves torch's default.
    num_threads: int | None = 1
    # Recompute activations in the backward pass of actor and critic (less memory, more time).
    gradient_checkpointing: bool = False
    # CPU: actor and critic forward, backward and step at once on two threads (and the experience
    # forwards in two halves), each with half of num_threads. Needs a critic with its own trunk.
    parallel_models: bool = False
    # Keep freed memory in the process for reuse (glibc: large blocks from the heap, no trimming) instead of
    # giving it back to the OS and faulting it in again each step: 1.7x faster on a Qwen2.5-size vocabulary.
    keep_freed_memory: bool = True
    # "none" (one process), or data-parallel processes launched by torchrun or accelerate launch
    # (rollout.batch_size and ppo.minibatch_size are per process): "ddp" (actor and critic replicated),
    # "fsdp" (actor and critic sharded over the processes with torch FSDP2) or "deepspeed" (actor and
    # critic in DeepSpeed ZeRO engines).
    distributed: str = "none"
    # deepspeed: ZeRO stage, 2 (gradients and optimizer state sharded) or 3 (weights too).
    zero_stage: int = 2
    # deepspeed, ZeRO-3: tensors with fewer elements than this stay whole on every rank (DeepSpeed's
    # stage3_param_persistence_threshold; 0 shards every one).
    zero3_persistence_threshold: int = 100_000
    # Log-probs and entropy a chunk of this many response tokens at a time, never the (B, A, V) logits: "auto"
    # (256 when the vocabulary has >= 32,768 tokens, e.g. Qwen2.5's 151,936), a number, or null/0 (off).
    logits_chunk_tokens: str | None = "auto"


@dataclass
class DataConfig:
    """Prompts."""

    # "arithmetic" (the built-in task), "reviews" (the built-in task with a hidden gold reward: first
    # sentences of generated reviews) or "dataset" (prompts from files or a hub dataset).
    task: str = "arithmetic"
    # arithmetic: operands are drawn from 0..max_operand (the tiny actor is built on this task unless
    # data.task=reviews).
    max_operand: int = 29
    # Prompts held out for evaluation (never trained on), unless eval_path is set.
    num_eval: int = 128
    # Seed of the train / held-out split.
    seed: int = 0
    # dataset: a .jsonl/.json/.parquet/.csv file, a folder of them, or a hub dataset name.
    path: str | None = None
    # dataset: the column holding the prompt text.
    prompt_key: str = "prompt"
    # dataset: split to train on (a single file is one split, "train").
    split: str = "train"
    # dataset: held-out prompts from this file or dataset instead of holding out num_eval.
    eval_path: str | None = None
    # dataset: split of eval_path.
    eval_split: str = "test"
    # dataset: where `datasets` caches what it reads; null = its default.
    cache_dir: str | None = None
    # Maximum prompt length in actor tokens, after the chat template.
    max_prompt_length: int = 32
    # Prompts over max_prompt_length: "error" (list them), "filter" (drop them) or "truncate" (keep the end).
    overlong: str = "error"


@dataclass
class RolloutConfig:
    """Generation."""

    # Prompts per PPO step (each sampled n times: batch_size * n samples per step).
    batch_size: int = 64
    # Maximum response length in tokens.
    max_new_tokens: int = 4
    # Sampling temperature (also applied to the log-probs used for PPO).
    temperature: float = 1.0
    # Samples per prompt, grouped by prompt (advantage=grpo and rloo need >= 2).
    n: int = 1


@dataclass
class PPOConfig:
    """PPO update."""

    # Passes over the rollout batch.
    epochs: int = 4
    # Samples per mini-batch; must divide rollout.batch_size * rollout.n.
    minibatch_size: int = 16
    # Policy ratio clip range epsilon.
    clip_eps: float = 0.2
    # Value clip range around the old values; null = no value clipping.
    value_clip_eps: float | None = None
    # Weight of the value loss.
    vf_coef: float = 0.5
    # Weight of the entropy bonus.
    entropy_coef: float = 0.0
    # Gradient norm clip per model.
    max_grad_norm: float = 1.0
    # Optimizer steps with a non-finite loss or gradient are skipped; this many in a row stop the run.
    max_consecutive_skips: int = 10
    # Lower clip range: the ratio's floor is 1 - clip_eps_low; null = clip_eps (DAPO, Yu et al. 2025).
    clip_eps_low: float | None = None
    # Upper clip range ("clip-higher", e.g. 0.28): the ratio's ceiling is 1 + clip_eps_high; null = clip_eps
    # (DAPO, Yu et al. 2025).
    clip_eps_high: float | None = None
    # Dual clip: a token with a negative advantage A has its loss bounded by -c * A, c > 1; null = off
    # (Ye et al. 2020, "Mastering Complex Control in MOBA Games with Deep Reinforcement Learning").
    dual_clip_c: float | None = None
    # How policy, value, entropy and KL-loss terms average over tokens: token_mean (each token of the mini-batch
    # alike), seq_mean_token_mean (each response alike; GRPO, Shao et al. 2024) or seq_mean_token_sum (token sums
    # over rollout.max_new_tokens; Dr. GRPO, Liu et al. 2025, "Understanding R1-Zero-Like Training").
    loss_agg: str = "token_mean"
    # The first this many PPO iterations train only the critic, the actor frozen (value pretraining; VC-PPO,
    # Yuan et al. 2025, "What's Behind PPO's Collapse in Long-CoT?"); needs model.shared_critic=false.
    critic_warmup_steps: int = 0


@dataclass
class LoggingConfig:
    """Metrics file, W&B and console."""

    wandb: WandbConfig = field(default_factory=WandbConfig)
    # A table of (prompt, response, score) samples is logged every this many steps.
    samples_every: int = 10
    # Rows in that table.
    num_samples: int = 8
    # Samples shown token by token (logprob, ref logprob, KL, value, reward, advantage, return) in the
    # token_debug table, logged with the samples table.
    debug_samples: int = 2
    # Show a progress bar over PPO steps.
    progress_bar: bool = True


@dataclass
class TrainerConfig:
    """The loop, checkpoints and resume."""

    # Number of PPO iterations (rollout + update).
    steps: int = 300
    # Held-out evaluation every this many steps (and at the start and end).
    eval_every: int = 25
    # Run directory; null = Hydra's output dir.
    output_dir: str | None = None
    # The value train() returns to sweepers: final held-out reward - this weight * final held-out KL.
    objective_kl_weight: float = 0.0
    # Save the trained policy and its tokenizer to <run dir>/model at the end (LoRA: the adapters only).
    save_model: bool = True
    # A checkpoint every this many steps (and at the end); 0 = only at the end.
    save_every: int = 100
    # Complete checkpoints kept; older ones are deleted after a new one is complete.
    keep_last: int = 2
    # "auto" (continue from the latest checkpoint in the run dir if there is one), "true" (must), "false".
    resume: str = "auto"
    # Resume even when config keys other than trainer.steps changed since the checkpoint.
    allow_config_change: bool = False


@dataclass
class TrainConfig:
    """The whole run. Field order is the order of sections in the resolved config. Which modules read
    each group: the README's "Config groups and their one reader each" (checked by tests/test_config_layout.py)."""

    # Seed of sampling, shuffling and value-head init.
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    kl: KLConfig = field(default_factory=KLConfig)
    gae: GAEConfig = field(default_factory=GAEConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    hardware: HardwareConfig = field(default_factory=HardwareConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    advantage: AdvantageConfig = field(default_factory=AdvantageConfig)


def register_configs() -> None:
    """Register the schema so ``conf/train.yaml`` can list ``train_schema`` first in its defaults."""
    ConfigStore.instance().store(name="train_schema", node=TrainConfig)
