"""Build a run from a validated config: prompts, tokenizer, reward, the four
models, optimizers, LR schedulers and KL controller, in the order that reports bad input before any
model is loaded. ``build_trainer(cfg)`` is what ``rlhf.app.run.train`` and the tests call.
"""

from __future__ import annotations

import logging
import random

import numpy as np
import torch
from omegaconf import DictConfig
from transformers import PreTrainedTokenizerBase
from transformers.utils import logging as hf_logging

from rlhf.app.optimizers import build_optimizers, make_schedulers
from rlhf.app.proxy import ensure_proxy
from rlhf.app.tasks import gold_reward_of, resolve_actor_paths
from rlhf.config.options import DistributedKind
from rlhf.core.kl import make_kl_controller
from rlhf.data.prompts import fit_prompt_lengths, load_prompts
from rlhf.models.critic import Critic, build_critic, shares_vocabulary
from rlhf.models.loading import (
    AdapterDisabledReference,
    add_lora,
    check_context_length,
    frozen_copy,
    load_actor,
    load_tokenizer,
    trunk_of,
)
from rlhf.ppo.rollout import Rollout
from rlhf.ppo.settings import ExperienceSettings, PPOSettings
from rlhf.ppo.trainer import PPOTrainer
from rlhf.rewards.normalize import RewardNormalizer
from rlhf.rewards.scorers import build_reward
from rlhf.runtime import distributed
from rlhf.runtime.distributed import Distributed, LaunchSettings
from rlhf.runtime.malloc import keep_freed_memory, limit_malloc_arenas
from rlhf.runtime.threads import ModelThreads

log = logging.getLogger(__name__)


def seed_everything(seed: int) -> torch.Generator:
    """Seed every source of randomness (Python, NumPy, torch CPU and CUDA) and return the dedicated
    generator that shuffles PPO mini-batches."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds CUDA
    return torch.Generator().manual_seed(seed)


def built_proxy(
    cfg: DictConfig, model_path: str, tokenizer_path: str, prompts: list[str]
) -> tuple[str | None, dict[str, float]]:
    """(folder, figures) of the proxy reward model with reward.kind=proxy, built on the first call (rank 0
    only, in ``dist.main_first``); (None, {}) otherwise."""
    if cfg.reward.kind != "proxy":
        return None, {}
    return ensure_proxy(cfg, actor_path=model_path, tokenizer_path=tokenizer_path, train_prompts=prompts)


def resolve_critic_init(cfg: DictConfig, tokenizer: PreTrainedTokenizerBase) -> str:
    """``model.critic_init`` as the run will use it, decided from tokenizers before any model is loaded.

    A trunk loaded from another checkpoint reads the actor's token ids, so it needs the actor's
    vocabulary. The presets that start the critic from the reward model (n_implementation_details,
    ppo_max) come from setups where it does; the seed's DeBERTa reward model beside a Qwen actor does
    not, so ``reward_model`` falls back to ``actor`` with a logged note. ``path`` names one checkpoint
    on purpose: another vocabulary there is an error."""
    init = cfg.model.critic_init
    if init not in ("reward_model", "path"):
        return init
    key = "reward.path" if init == "reward_model" else "model.critic_path"
    path = cfg.reward.path if init == "reward_model" else cfg.model.critic_path
    if shares_vocabulary(tokenizer, path, cfg.model.trust_remote_code, key):
        return init
    if init == "path":
        raise ValueError(
            f"model.critic_init=path: the tokenizer at {key}={path!r} does not share the actor's vocabulary, so a "
            "critic built on it would misread the actor's tokens; use model.critic_init=actor"
        )
    log.warning(
        "model.critic_init=reward_model: the reward model at reward.path=%r has another vocabulary than the actor, "
        "so its trunk could not read the actor's tokens; the critic starts from the actor instead "
        "(model.critic_init=actor)",
        path,
    )
    return "actor"


def build_trainer(cfg: DictConfig) -> tuple[PPOTrainer, list[str], list[str]]:
    """Data, reward and models of a validated config: (trainer, train prompts, held-out prompts). The
    order reports bad input (a missing file, an overlong prompt) before any model is loaded."""
    dist = launch(cfg)
    device = dist.accelerator.device if dist.accelerator else torch.device(cfg.hardware.device)
    # 1. prompts, the actor's tokenizer, and whether prompts and responses fit the actor's context
    task_prompts, eval_prompts = load_prompts(cfg.data)
    with dist.main_first():  # rank 0 builds the tiny actor (and proxy) into the cache; the others then load them
        model_path, tokenizer_path = resolve_actor_paths(cfg)
        # Prompts too long for data.max_prompt_length fail before the proxy's build (minutes when not cached).
        tokenizer, train_prompts, eval_prompts = fitted_tokenizer(
            cfg,
            model_path=model_path,
            tokenizer_path=tokenizer_path,
            train_prompts=task_prompts,
            eval_prompts=eval_prompts,
        )
        proxy_path, reward_figures = built_proxy(cfg, model_path, tokenizer_path, task_prompts)
    # Seed here, after the one step whose use of randomness depends on the cache (building the tiny
    # actor and proxy or finding them built): from now on the run is a function of its config alone.
    shuffle_generator = seed_everything(cfg.seed)
    critic_init = resolve_critic_init(cfg, tokenizer) if needs_critic(cfg) else None
    # 2. reward, then the models: actor, frozen reference, critic
    reward = build_reward(cfg.reward, device, path=proxy_path)
    actor, reference, critic = build_models(cfg, model_path, tokenizer, critic_init, device)
    # With FSDP each rank keeps its shard of the trained models (before optimizers are built on them).
    dist.shard_parameters(actor)
    if critic is not None:
        dist.shard_parameters(critic)
    if dist.world_size > 1:
        # Every rank built the same models from the same seed; from here each samples its own rollouts.
        torch.manual_seed(cfg.seed + 1_000_003 * dist.rank)
    # 3. the models as the rollout uses them, with the settings read once from the config; then
    # optimizers and KL controller: the trainer
    rollout = Rollout(
        actor=actor,
        reference=reference,
        critic=critic,
        reward=reward,
        settings=ppo_settings(cfg),
        tokenizer=tokenizer,
        dist=dist,
        threads=ModelThreads(parallel=cfg.hardware.parallel_models, num_threads=cfg.hardware.num_threads),
        gold=gold_reward_of(cfg),
        reward_figures=reward_figures,
    )
    return ppo_trainer(cfg, rollout, shuffle_generator), train_prompts, eval_prompts


def ppo_trainer(cfg: DictConfig, rollout: Rollout, shuffle_generator: torch.Generator) -> PPOTrainer:
    """The trainer of ``rollout``'s actor and critic: optimizers, LR schedulers, KL controller and
    reward normalizer as configured."""
    actor_optimizer, critic_optimizer = build_optimizers(
        cfg, rollout.actor, rollout.critic, rollout.dist, shared_critic=cfg.model.shared_critic
    )
    return PPOTrainer(
        rollout=rollout,
        reward_normalizer=RewardNormalizer(
            cfg.reward.normalize, gain=cfg.reward.gain, bias=cfg.reward.bias, clip=cfg.reward.clip
        ),
        actor_optimizer=actor_optimizer,
        critic_optimizer=critic_optimizer,
        schedulers=make_schedulers(cfg, [opt for opt in (actor_optimizer, critic_optimizer) if opt]),
        kl_controller=make_kl_controller(
            cfg.kl.controller, beta=cfg.kl.beta, target=cfg.kl.target, horizon=cfg.kl.horizon
        ),
        settings=rollout.settings,
        shuffle_generator=shuffle_generator,
    )


def launch(cfg: DictConfig) -> Distributed:
    """The process settings (threads, malloc arenas, progress bars) and the ranks of ``hardware.distributed``."""
    hardware = cfg.hardware
    hf_logging.disable_progress_bar()  # our own progress bar is the one that matters
    if hardware.num_threads is not None:
        torch.set_num_threads(hardware.num_threads)
    if hardware.parallel_models:
        limit_malloc_arenas(1)
    if hardware.keep_freed_memory:
        keep_freed_memory()
    return distributed.launch(hardware.distributed, launch_settings(cfg))


def launch_settings(cfg: DictConfig) -> LaunchSettings:
    """What the distributed strategy reads from the config when it launches."""
    hardware = cfg.hardware
    return LaunchSettings(
        device=hardware.device,
        zero_stage=hardware.zero_stage,
        zero3_persistence_threshold=hardware.zero3_persistence_threshold,
        minibatch_size=cfg.ppo.minibatch_size,
        max_grad_norm=cfg.ppo.max_grad_norm,
        dtype=cfg.model.dtype,
    )


def fitted_tokenizer(
    cfg: DictConfig, *, model_path: str, tokenizer_path: str, train_prompts: list[str], eval_prompts: list[str]
) -> tuple[PreTrainedTokenizerBase, list[str], list[str]]:
    """(the actor's tokenizer, training prompts, held-out prompts), the prompts fitted to
    ``data.max_prompt_length`` (per ``data.overlong``), once the actor's context is known to hold
    prompts and responses."""
    tokenizer_key = "model.tokenizer_path" if cfg.model.tokenizer_path else "model.path"
    tokenizer = load_tokenizer(
        tokenizer_path,
        trust_remote_code=cfg.model.trust_remote_code,
        add_pad_token=cfg.model.add_pad_token,
        key=tokenizer_key,
    )
    train_prompts, eval_prompts = (
        fit_prompt_lengths(
            tokenizer, prompts, max_length=cfg.data.max_prompt_length, policy=cfg.data.overlong, name=name
        )
        for prompts, name in ((train_prompts, "training"), (eval_prompts, "held-out"))
    )
    check_context_length(
        model_path,
        max_prompt_length=cfg.data.max_prompt_length,
        max_new_tokens=cfg.rollout.max_new_tokens,
        trust_remote_code=cfg.model.trust_remote_code,
    )
    return tokenizer, train_prompts, eval_prompts


def build_models(
    cfg: DictConfig,
    model_path: str,
    tokenizer: PreTrainedTokenizerBase,
    critic_init: str | None,
    device: torch.device,
) -> tuple[torch.nn.Module, torch.nn.Module, Critic | None]:
    """(actor, frozen reference, critic): a LoRA actor's reference is the actor with its adapters off; no
    critic (None) for a critic-free estimator."""
    actor = load_actor(
        model_path,
        dtype=cfg.model.dtype,
        trust_remote_code=cfg.model.trust_remote_code,
        vocab_size=len(tokenizer),
        attn_implementation=cfg.model.attn_implementation,
    ).to(device)
    actor.config.pad_token_id = actor.generation_config.pad_token_id = tokenizer.pad_token_id
    lora = cfg.model.lora
    if lora.enabled:
        actor = add_lora(actor, r=lora.r, alpha=lora.alpha, dropout=lora.dropout, target_modules=lora.target_modules)
        reference = AdapterDisabledReference(actor)
    else:
        reference = frozen_copy(actor)
    if critic_init is None:
        if cfg.hardware.gradient_checkpointing:
            actor.activation_checkpointing_enable()
        return actor, reference, None
    critic = build_critic(
        actor,
        tokenizer,
        init=critic_init,
        shared=cfg.model.shared_critic,
        path={"reward_model": cfg.reward.path, "path": cfg.model.critic_path}.get(critic_init),
        value_head_std=cfg.model.value_head_std,
        trust_remote_code=cfg.model.trust_remote_code,
    )
    if cfg.hardware.gradient_checkpointing:
        actor.activation_checkpointing_enable()
        if critic.backbone is not trunk_of(actor):
            critic.backbone.activation_checkpointing_enable()
    return actor, reference, critic


# hardware.distributed backends that shard or wrap the LM head: log-probs from the (B, A, V) logits.
UNCHUNKED = (DistributedKind.fsdp, DistributedKind.deepspeed)


def ppo_settings(cfg: DictConfig) -> PPOSettings:
    """The settings of the PPO iteration, read once from the config groups rollout, data, reward, kl,
    gae, ppo and hardware (each field by its key's name)."""
    experience = ExperienceSettings(
        kl_estimator=cfg.kl.estimator,
        **values_of(cfg.gae, "gamma", "lam", "whiten_rewards", "whiten_advantages", "advantage_clip"),
        kl_mode=cfg.kl.mode,
        **values_of(cfg.advantage, "estimator", "std_normalize"),
        **values_of(cfg.gae, "lam_critic", "lam_adaptive_alpha"),
    )
    return PPOSettings(
        **values_of(cfg.rollout, "max_new_tokens", "temperature"),
        max_prompt_length=cfg.data.max_prompt_length,
        **values_of(cfg.reward, "on_nonfinite", "missing_eos_penalty"),
        experience=experience,
        **values_of(cfg.ppo, "epochs", "minibatch_size", "clip_eps", "value_clip_eps", "vf_coef", "entropy_coef"),
        **values_of(cfg.ppo, "max_grad_norm", "max_consecutive_skips"),
        **values_of(cfg.hardware, "device", "autocast_dtype"),
        **values_of(cfg.ppo, "clip_eps_low", "clip_eps_high", "dual_clip_c", "loss_agg", "critic_warmup_steps"),
        samples_per_prompt=cfg.rollout.n,
        # FSDP and DeepSpeed shard or wrap the LM head: the plain path (the same in experience and update)
        logits_chunk_tokens=None if cfg.hardware.distributed in UNCHUNKED else cfg.hardware.logits_chunk_tokens,
    )


def needs_critic(cfg: DictConfig) -> bool:
    """Whether ``advantage.estimator`` learns a critic (gae); the critic-free ones build none."""
    return cfg.advantage.estimator == "gae"


def values_of(group: DictConfig, *keys: str) -> dict:
    """``{key: group.<key>}`` for ``keys``: settings fields named as their config keys."""
    return {key: group[key] for key in keys}
