"""``train(cfg)``: build the run from a composed config and loop PPO iterations.

Entry point: ``python train.py`` (see README). Tests call ``train(cfg)`` directly.
"""

from __future__ import annotations

import logging
import random
import time
from pathlib import Path

import hydra
import numpy as np
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from rlhf.config import validate
from rlhf.data import PromptSampler, load_prompts
from rlhf.kl import make_kl_controller
from rlhf.models import build_critic, frozen_copy, load_actor, load_tokenizer
from rlhf.reward import build_reward
from rlhf.tasks.arithmetic import exact_match_reward, solve
from rlhf.tiny import ensure_tiny_actor
from rlhf.tracking import Tracker
from rlhf.trainer import PPOTrainer

log = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def run_dir_of(cfg: DictConfig) -> Path:
    """``trainer.output_dir`` if set, else Hydra's output dir of this job."""
    if cfg.trainer.output_dir:
        return Path(cfg.trainer.output_dir)
    if HydraConfig.initialized():
        return Path(HydraConfig.get().runtime.output_dir)
    raise ValueError("trainer.output_dir is not set and there is no Hydra run dir: set trainer.output_dir=DIR")


def run_name_of(cfg: DictConfig) -> str:
    """``logging.wandb.name`` if set, else the command-line overrides (less logging.*), else "default"."""
    if cfg.logging.wandb.name:
        return cfg.logging.wandb.name
    if HydraConfig.initialized():
        # Logging and Hydra settings do not define the experiment, so they stay out of its name.
        overrides = [o for o in HydraConfig.get().overrides.task if not o.startswith(("hydra.", "logging."))]
        if overrides:
            return ",".join(overrides)
    return "default"


def resolve_actor_paths(cfg: DictConfig, train_prompts: list[str], eval_prompts: list[str]) -> tuple[str, str]:
    """(model path, tokenizer path): ``model.path``, or the tiny actor built for the task."""
    if cfg.model.path:
        return cfg.model.path, cfg.model.path
    answers = [solve(p) for p in train_prompts]
    model_dir, tokenizer_dir = ensure_tiny_actor(
        OmegaConf.to_object(cfg.model.tiny), cfg.model.cache_dir, train_prompts, answers, eval_prompts,
        exact_match_reward, cfg.data.max_prompt_length,
    )  # fmt: skip
    return str(model_dir), str(tokenizer_dir)


def evaluate(trainer: PPOTrainer, prompts: list[str]) -> dict[str, float]:
    """Mean reward on held-out prompts, sampled (as trained) and greedy."""
    sampled = trainer.score(trainer.generate(prompts, do_sample=True)).mean().item()
    greedy = trainer.score(trainer.generate(prompts, do_sample=False)).mean().item()
    return {"eval/score": sampled, "eval/score_greedy": greedy}


def build_trainer(cfg: DictConfig) -> tuple[PPOTrainer, list[str], list[str]]:
    """Validate the config, then build data, reward and models: (trainer, train prompts, held-out prompts)."""
    # 0. check the config before anything is built
    validate(cfg)
    if cfg.hardware.num_threads is not None:
        torch.set_num_threads(cfg.hardware.num_threads)
    device = torch.device(cfg.hardware.device)
    seed_everything(cfg.seed)

    # 1. data and reward
    train_prompts, eval_prompts = load_prompts(cfg.data.task, cfg.data.max_operand, cfg.data.num_eval, cfg.data.seed)
    reward = build_reward(
        cfg.reward.kind, cfg.reward.fn, cfg.reward.path, cfg.reward.max_length, cfg.reward.batch_size, device
    )

    # 2. models: actor, frozen reference, critic
    model_path, tokenizer_path = resolve_actor_paths(cfg, train_prompts, eval_prompts)
    tokenizer = load_tokenizer(tokenizer_path)
    actor = load_actor(model_path, cfg.model.dtype).to(device)
    reference = frozen_copy(actor)
    critic = build_critic(actor, shared=cfg.model.shared_critic)

    # 3. optimizers and KL controller
    if cfg.model.shared_critic:
        params = list(actor.parameters()) + list(critic.value_head.parameters())
        actor_optimizer, critic_optimizer = hydra.utils.instantiate(cfg.optimizer.actor)(params), None
    else:
        actor_optimizer = hydra.utils.instantiate(cfg.optimizer.actor)(actor.parameters())
        critic_optimizer = hydra.utils.instantiate(cfg.optimizer.critic)(critic.parameters())
    schedulers = [
        hydra.utils.instantiate(cfg.optimizer.scheduler)(opt) for opt in (actor_optimizer, critic_optimizer) if opt
    ]
    kl_controller = make_kl_controller(cfg.kl.controller, cfg.kl.beta, cfg.kl.target, cfg.kl.horizon)
    seed_everything(cfg.seed)  # same sampling whatever the build above consumed
    trainer = PPOTrainer(
        actor,
        reference,
        critic,
        reward,
        tokenizer,
        actor_optimizer,
        critic_optimizer,
        schedulers,
        kl_controller,
        cfg,
        cfg.seed,
    )
    return trainer, train_prompts, eval_prompts


def train(cfg: DictConfig) -> dict[str, float]:
    """Run PPO as configured; returns the run's final figures (also the W&B summary)."""
    started = time.perf_counter()
    trainer, train_prompts, eval_prompts = build_trainer(cfg)
    run_dir = run_dir_of(cfg)
    wandb_cfg = cfg.logging.wandb
    tracker = Tracker(
        run_dir, OmegaConf.to_container(cfg, resolve=True), wandb_cfg.mode, wandb_cfg.project, wandb_cfg.entity,
        wandb_cfg.group, run_name_of(cfg), list(wandb_cfg.tags),
    )  # fmt: skip
    exit_code = 1
    try:
        # 4. the loop: evaluate the reference, then PPO iterations
        sampler = PromptSampler(train_prompts, cfg.rollout.batch_size, cfg.seed)
        initial = evaluate(trainer, eval_prompts)
        tracker.log(initial, step=0)
        final = dict(initial)
        bar = tqdm(range(1, cfg.trainer.steps + 1), desc="ppo", disable=not cfg.logging.progress_bar)
        for step in bar:
            metrics = trainer.step(sampler.next_batch())
            if step % cfg.trainer.eval_every == 0 or step == cfg.trainer.steps:
                metrics.update(evaluate(trainer, eval_prompts))
            tracker.log(metrics, step=step)
            if step % cfg.logging.samples_every == 0 or step == 1:
                tracker.log_samples(step, sample_rows(trainer, cfg.logging.num_samples))
            bar.set_postfix(reward=f"{metrics['objective/scores']:.3f}", kl=f"{metrics['objective/kl']:.3f}")
            final.update(metrics)
        summary = {
            "final/eval_score": final["eval/score"],
            "initial/eval_score": initial["eval/score"],
            "final/eval_score_greedy": final["eval/score_greedy"],
            "initial/eval_score_greedy": initial["eval/score_greedy"],
            "final/kl": final.get("objective/kl", 0.0),
            "time/total": time.perf_counter() - started,
        }
        tracker.summary(summary)
        print_summary(summary, run_dir)
        exit_code = 0
        return summary
    finally:
        tracker.finish(exit_code)


def sample_rows(trainer: PPOTrainer, num: int) -> list[dict]:
    """(prompt, response, score) of the first ``num`` samples of the last rollout."""
    samples, exp = trainer.last_samples, trainer.last_experience
    return [
        {"prompt": samples.prompts[i], "response": samples.responses[i], "score": exp.scores[i].item()}
        for i in range(min(num, len(samples.prompts)))
    ]


def print_summary(summary: dict[str, float], run_dir: Path) -> None:
    print(
        f"held-out reward (sampled): {summary['initial/eval_score']:.3f} -> {summary['final/eval_score']:.3f}; "
        f"greedy: {summary['initial/eval_score_greedy']:.3f} -> {summary['final/eval_score_greedy']:.3f}; "
        f"KL to reference: {summary['final/kl']:.3f}; wall time {summary['time/total']:.1f} s; run dir {run_dir}"
    )
