"""``train(cfg)``: build the run from a composed config and loop PPO iterations.

Entry point: ``python train.py`` (see README). Tests call ``train(cfg)`` directly.
"""

from __future__ import annotations

import logging
import math
import random
import time
import warnings
from pathlib import Path

import hydra
import numpy as np
import torch
import yaml
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm
from transformers.utils import logging as hf_logging

from rlhf.checkpoint import (
    capture_rng,
    complete_checkpoints,
    find_resume_checkpoint,
    load_checkpoint,
    restore_rng,
    save_checkpoint,
)
from rlhf.config import DataConfig, loggable_config, validate
from rlhf.data import PromptSampler, fit_prompt_lengths, load_prompts
from rlhf.health import HealthMonitor
from rlhf.job import check_command_line_targets, group_of, run_dir_of, run_name_of, write_status
from rlhf.kl import make_kl_controller
from rlhf.models import (
    AdapterDisabledReference,
    add_lora,
    build_critic,
    check_context_length,
    frozen_copy,
    load_actor,
    load_tokenizer,
    trunk_of,
)
from rlhf.reward import RewardNormalizer, build_reward
from rlhf.signals import RunInterrupted, StopSignals
from rlhf.tasks.arithmetic import exact_match_reward, solve, split_prompts
from rlhf.tiny import ensure_tiny_actor
from rlhf.tracking import Tracker
from rlhf.trainer import PPOTrainer, token_debug_rows

log = logging.getLogger(__name__)


def seed_everything(seed: int) -> torch.Generator:
    """Seed every source of randomness (Python, NumPy, torch CPU and CUDA) and return the dedicated
    generator that shuffles PPO mini-batches."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds CUDA
    return torch.Generator().manual_seed(seed)


def resolve_actor_paths(cfg: DictConfig) -> tuple[str, str]:
    """(model path, tokenizer path): ``model.path``, or the tiny actor built on the built-in task."""
    if cfg.model.path:
        return cfg.model.path, cfg.model.tokenizer_path or cfg.model.path
    # The run's own split when it trains on the task (its held-out prompts stay unseen in the warm-up
    # too); the task's default split when the run's prompts come from elsewhere.
    task = cfg.data if cfg.data.task == "arithmetic" else DataConfig()
    train_prompts, eval_prompts = split_prompts(task.max_operand, task.num_eval, task.seed)
    model_dir, tokenizer_dir = ensure_tiny_actor(
        OmegaConf.to_object(cfg.model.tiny), cfg.model.cache_dir, train_prompts, [solve(p) for p in train_prompts],
        eval_prompts, exact_match_reward,
    )  # fmt: skip
    return str(model_dir), str(tokenizer_dir)


def evaluate(trainer: PPOTrainer, prompts: list[str]) -> dict[str, float]:
    """Mean reward on held-out prompts, sampled (as trained) and greedy."""
    sampled = trainer.score(trainer.generate(prompts, do_sample=True), evaluation=True)
    greedy = trainer.score(trainer.generate(prompts, do_sample=False), evaluation=True)
    # Non-finite scores (kept only with reward.on_nonfinite=mask) stay out of the means.
    return {"eval/score": sampled[sampled.isfinite()].mean().item(),
            "eval/score_greedy": greedy[greedy.isfinite()].mean().item()}  # fmt: skip


def build_trainer(cfg: DictConfig) -> tuple[PPOTrainer, list[str], list[str]]:
    """Validate the config, then build data, reward and models: (trainer, train prompts, held-out prompts)."""
    # 0. check the config, and everything else that is cheap to check, before any model is loaded
    validate(cfg)
    check_command_line_targets(list(cfg.trainer.allowed_targets))
    hf_logging.disable_progress_bar()  # our own progress bar is the one that matters
    if cfg.hardware.num_threads is not None:
        torch.set_num_threads(cfg.hardware.num_threads)
    device = torch.device(cfg.hardware.device)

    # 1. prompts, the actor's tokenizer, and whether prompts and responses fit the actor's context
    train_prompts, eval_prompts = load_prompts(cfg.data)
    model_path, tokenizer_path = resolve_actor_paths(cfg)
    # Seed here, after the one step whose use of randomness depends on the cache (building the tiny
    # actor or finding it built): from now on the run is a function of its config alone.
    shuffle_generator = seed_everything(cfg.seed)
    tokenizer_key = "model.tokenizer_path" if cfg.model.tokenizer_path else "model.path"
    tokenizer = load_tokenizer(tokenizer_path, cfg.model.trust_remote_code, cfg.model.add_pad_token, tokenizer_key)
    train_prompts, eval_prompts = (
        fit_prompt_lengths(tokenizer, prompts, cfg.data.max_prompt_length, cfg.data.overlong, name)
        for prompts, name in ((train_prompts, "training"), (eval_prompts, "held-out"))
    )
    check_context_length(
        model_path, cfg.data.max_prompt_length, cfg.rollout.max_new_tokens, cfg.model.trust_remote_code
    )

    # 2. reward, then the models: actor, frozen reference, critic
    reward = build_reward(cfg.reward, device)
    actor = load_actor(model_path, cfg.model.dtype, cfg.model.trust_remote_code, len(tokenizer)).to(device)
    actor.config.pad_token_id = actor.generation_config.pad_token_id = tokenizer.pad_token_id
    lora = cfg.model.lora
    if lora.enabled:
        actor = add_lora(actor, lora.r, lora.alpha, lora.dropout, lora.target_modules)
        reference = AdapterDisabledReference(actor)
    else:
        reference = frozen_copy(actor)
    critic_path = {"reward_model": cfg.reward.path, "path": cfg.model.critic_path}.get(cfg.model.critic_init)
    critic = build_critic(
        actor, tokenizer, cfg.model.critic_init, cfg.model.shared_critic, critic_path, cfg.model.value_head_std,
        cfg.model.trust_remote_code,
    )  # fmt: skip
    if cfg.hardware.gradient_checkpointing:
        actor.activation_checkpointing_enable()
        if critic.backbone is not trunk_of(actor):
            critic.backbone.activation_checkpointing_enable()

    # 3. optimizers and KL controller
    def trainable(*modules: torch.nn.Module) -> list[torch.nn.Parameter]:
        return [p for module in modules for p in module.parameters() if p.requires_grad]

    if cfg.model.shared_critic:
        params = trainable(actor, critic.value_head)
        actor_optimizer, critic_optimizer = hydra.utils.instantiate(cfg.optimizer.actor)(params), None
    else:
        actor_optimizer = hydra.utils.instantiate(cfg.optimizer.actor)(trainable(actor))
        critic_optimizer = hydra.utils.instantiate(cfg.optimizer.critic)(trainable(critic))
    schedulers = make_schedulers(cfg, [opt for opt in (actor_optimizer, critic_optimizer) if opt])
    kl_controller = make_kl_controller(cfg.kl.controller, cfg.kl.beta, cfg.kl.target, cfg.kl.horizon)
    normalizer = RewardNormalizer(cfg.reward.normalize, cfg.reward.gain, cfg.reward.bias, cfg.reward.clip)
    trainer = PPOTrainer(
        actor,
        reference,
        critic,
        reward,
        normalizer,
        tokenizer,
        actor_optimizer,
        critic_optimizer,
        schedulers,
        kl_controller,
        cfg,
        shuffle_generator,
    )
    return trainer, train_prompts, eval_prompts


def train(cfg: DictConfig) -> dict[str, float]:
    """Run PPO as configured, continuing from a checkpoint per ``trainer.resume``; returns the
    run's final figures (also the W&B summary). Raises ``RunInterrupted`` after a stop signal."""
    started = time.perf_counter()
    validate(cfg)
    run_dir = run_dir_of(cfg)
    resume_from = find_resume_checkpoint(cfg, run_dir)
    trainer, train_prompts, eval_prompts = build_trainer(cfg)
    sampler = PromptSampler(train_prompts, cfg.rollout.batch_size, cfg.seed)
    health = HealthMonitor()
    run_id, last_step = None, None
    if resume_from is not None:
        run_id, last_step = restore_run(resume_from, cfg, trainer, sampler, health)
    wandb_cfg = cfg.logging.wandb
    tracker = Tracker(
        run_dir, loggable_config(cfg), wandb_cfg.mode, wandb_cfg.project, wandb_cfg.entity,
        group_of(cfg), run_name_of(cfg), list(wandb_cfg.tags), run_id, last_step,
    )  # fmt: skip
    exit_code, preempted = 1, False
    try:
        with StopSignals() as stop:
            history = ppo_loop(cfg, trainer, sampler, health, tracker, eval_prompts, stop, run_dir)
        summary = summarize(history[0], history[1:], time.perf_counter() - started, cfg.trainer.objective_kl_weight)
        if cfg.trainer.save_model:
            # save_pretrained of a peft model writes the adapters only.
            trainer.actor.save_pretrained(run_dir / "model")
            trainer.tokenizer.save_pretrained(run_dir / "model")
        tracker.summary(summary)
        write_status(run_dir, "completed", summary=summary)
        print_summary(summary, run_dir)
        exit_code = 0
        return summary
    except RunInterrupted as stopped:
        exit_code, preempted = stopped.exit_code, True
        write_status(run_dir, "interrupted", step=stopped.step, checkpoint=str(stopped.checkpoint))
        raise
    except BaseException:
        checkpoints = complete_checkpoints(run_dir / "checkpoints")
        log.error("the run failed; last complete checkpoint: %s", checkpoints[-1] if checkpoints else "none")
        raise
    finally:
        tracker.finish(exit_code, preempted)


def ppo_loop(
    cfg: DictConfig,
    trainer: PPOTrainer,
    sampler: PromptSampler,
    health: HealthMonitor,
    tracker: Tracker,
    eval_prompts: list[str],
    stop: StopSignals,
    run_dir: Path,
) -> list[dict[str, float]]:
    """Evaluate the reference (fresh runs only), then PPO iterations up to ``trainer.steps``; returns
    every step's metrics from step 0. Each step is logged before its checkpoint is written, so that
    a run resumed from a checkpoint never misses a logged step."""
    history = tracker.history()  # steps 0..checkpoint of a resumed run; none of a fresh one
    if not history:
        history.append(evaluate(trainer, eval_prompts))
        tracker.log(history[0], step=0)
    steps = cfg.trainer.steps
    models = {"actor": trainer.actor, "critic": trainer.critic}
    bar = tqdm(range(len(history), steps + 1), desc="ppo", disable=not cfg.logging.progress_bar)
    for step in bar:
        # 1-5. rollout, score, experience, PPO epochs, KL controller (PPOTrainer.step)
        metrics = trainer.step(sampler.next_batch())
        metrics.update(health(metrics, step))
        if step % cfg.trainer.eval_every == 0:
            metrics.update(evaluate(trainer, eval_prompts))
        # 6. the end-of-run evaluation comes after the run's state is taken: a run resumed from this
        # checkpoint to train longer must not see randomness that an uninterrupted run never drew
        final_state = run_state(step, trainer, sampler, health, tracker.run.id, steps) if step == steps else None
        if step == steps and "eval/score" not in metrics:
            metrics.update(evaluate(trainer, eval_prompts))
        # 7. log, then checkpoint; a second stop signal waits for both. One reading of the stop flag
        # decides both the save and the stop: a signal after it stops the run after the next step.
        stopping = stop.requested
        with stop.protected():
            log_step(tracker, trainer, metrics, step, cfg.logging)
            history.append(metrics)
            if final_state or stopping or (cfg.trainer.save_every and step % cfg.trainer.save_every == 0):
                state = final_state or run_state(step, trainer, sampler, health, tracker.run.id, steps)
                config_yaml = yaml.safe_dump(loggable_config(cfg), sort_keys=False)
                checkpoint = save_checkpoint(
                    run_dir / "checkpoints", step, models, state, config_yaml, cfg.trainer.keep_last
                )
        bar.set_postfix(reward=f"{metrics['objective/scores']:.3f}", kl=f"{metrics['objective/kl']:.3f}")
        if stopping and step < steps:
            raise RunInterrupted(stop.signum, step, checkpoint)
    return history


def log_step(tracker: Tracker, trainer: PPOTrainer, metrics: dict[str, float], step: int, logging_cfg) -> None:
    """The step's metrics; every ``logging.samples_every`` steps (and at step 1) the samples and
    token-debug tables of its rollout."""
    tracker.log(metrics, step=step)
    if step % logging_cfg.samples_every == 0 or step == 1:
        tracker.log_table("samples", step, sample_rows(trainer, logging_cfg.num_samples))
        rows = token_debug_rows(trainer.last_samples, trainer.last_experience, trainer.tokenizer,
                                logging_cfg.debug_samples)  # fmt: skip
        tracker.log_table("token_debug", step, rows)


def run_state(
    step: int, trainer: PPOTrainer, sampler: PromptSampler, health: HealthMonitor, wandb_run_id: str, planned: int
) -> dict:
    """Everything besides the weights that the run after ``step`` depends on (a checkpoint's state.pt)."""
    return {
        "step": step,
        "planned_steps": planned,  # trainer.steps the LR schedule was planned for
        "trainer": trainer.state_dict(),
        "sampler": sampler.state_dict(),
        "health": health.state_dict(),
        "rng": capture_rng(),
        "wandb_run_id": wandb_run_id,
    }


def restore_run(
    path: Path, cfg: DictConfig, trainer: PPOTrainer, sampler: PromptSampler, health: HealthMonitor
) -> tuple[str, int]:
    """Load checkpoint ``path`` into the run's objects; returns (W&B run id, step of the checkpoint)."""
    state = load_checkpoint(path, {"actor": trainer.actor, "critic": trainer.critic})
    trainer.load_state_dict(state["trainer"])
    if state["planned_steps"] != cfg.trainer.steps:
        # trainer.steps was raised: the LR schedule continues as if the run had been planned this long.
        trainer.schedulers = make_schedulers(cfg, trainer.optimizers(), trainer.steps_done)
        log.info("LR schedule re-planned over trainer.steps=%d (was %d)", cfg.trainer.steps, state["planned_steps"])
    sampler.load_state_dict(state["sampler"])
    health.load_state_dict(state["health"])
    restore_rng(state["rng"])
    log.info("resuming from %s after step %d", path, state["step"])
    return state["wandb_run_id"], state["step"]


def make_schedulers(
    cfg: DictConfig, optimizers: list[torch.optim.Optimizer], steps_done: int = 0
) -> list[torch.optim.lr_scheduler.LRScheduler]:
    """One ``optimizer.scheduler`` per optimizer, stepped ``steps_done`` times from the start of its
    schedule: the same float operations as an uninterrupted run, so the learning rates match it."""
    schedulers = []
    for optimizer in optimizers:
        for group in optimizer.param_groups:  # a resumed optimizer's rate has decayed: start over
            group["lr"] = group.get("initial_lr", group["lr"])
        scheduler = hydra.utils.instantiate(cfg.optimizer.scheduler)(optimizer)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # torch warns of scheduler steps without optimizer steps
            for _ in range(steps_done):
                scheduler.step()
        schedulers.append(scheduler)
    return schedulers


def summarize(
    initial: dict[str, float], history: list[dict[str, float]], seconds: float, kl_weight: float
) -> dict[str, float]:
    """Final figures of a run (the W&B summary and status.json), and the sweep objective:
    final held-out reward - kl_weight * final KL. ``history`` holds each step's metrics."""
    evals = [m for m in [initial, *history] if "eval/score" in m]
    last = history[-1] if history else {}
    summary = {
        "initial/eval_score": initial["eval/score"],
        "initial/eval_score_greedy": initial["eval/score_greedy"],
        "final/eval_score": evals[-1]["eval/score"],
        "final/eval_score_greedy": evals[-1]["eval/score_greedy"],
        "best/eval_score": max(m["eval/score"] for m in evals),
        "final/kl": last.get("objective/kl", 0.0),
        "final/scores": last.get("objective/scores", math.nan),
        "final/value_loss": last.get("loss/value", math.nan),
        "mean/policy_clipfrac": sum(m["policy/clipfrac"] for m in history) / max(len(history), 1),
        "time/total": seconds,
    }
    summary["objective"] = summary["final/eval_score"] - kl_weight * summary["final/kl"]
    return summary


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
