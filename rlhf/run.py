"""``train(cfg)``: build the run from a composed config and loop PPO iterations.

Entry point: ``python train.py`` (see README). Tests call ``train(cfg)`` directly.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from pathlib import Path

import hydra
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm
from transformers.utils import logging as hf_logging

from rlhf.checkpoint import changed_keys, complete_checkpoints, load_checkpoint, save_checkpoint
from rlhf.config import DataConfig, validate
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
    sampled = trainer.score(trainer.generate(prompts, do_sample=True))
    greedy = trainer.score(trainer.generate(prompts, do_sample=False))
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
    schedulers = [
        hydra.utils.instantiate(cfg.optimizer.scheduler)(opt) for opt in (actor_optimizer, critic_optimizer) if opt
    ]
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


def find_resume_checkpoint(cfg: DictConfig, run_dir: Path) -> Path | None:
    """The checkpoint to continue from (``trainer.resume``), after checking the config has not changed."""
    mode = str(cfg.trainer.resume).lower()
    checkpoints = complete_checkpoints(run_dir / "checkpoints")
    if mode == "false" or (mode == "auto" and not checkpoints):
        return None
    if not checkpoints:
        raise ValueError(f"trainer.resume=true but there is no complete checkpoint in {run_dir / 'checkpoints'}")
    latest = checkpoints[-1]
    saved = OmegaConf.to_container(OmegaConf.load(latest / "config.yaml"), resolve=True)
    changes = changed_keys(saved, OmegaConf.to_container(cfg, resolve=True), RESUMABLE_CHANGES)
    if changes and not cfg.trainer.allow_config_change:
        raise ValueError(
            f"resuming from {latest} with a changed config: "
            + "; ".join(changes)
            + ". Set trainer.allow_config_change=true to resume anyway (raising trainer.steps is always allowed)"
        )
    return latest


# Config keys that may differ between a checkpoint and the run resuming from it.
RESUMABLE_CHANGES = (
    "trainer.steps", "trainer.resume", "trainer.allow_config_change", "logging.progress_bar",
    "optimizer.scheduler.total_iters",  # follows trainer.steps; the schedule itself resumes from its state
)  # fmt: skip


def capture_rng() -> dict:
    """Global RNG states (Python, NumPy, torch CPU) as plain values for a weights-only checkpoint."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"python": random.getstate(), "numpy": (kind, keys.tolist(), pos, has_gauss, gauss),
            "torch": torch.get_rng_state()}  # fmt: skip


def restore_rng(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])


def train(cfg: DictConfig) -> dict[str, float]:
    """Run PPO as configured, continuing from a checkpoint per ``trainer.resume``; returns the
    run's final figures (also the W&B summary)."""
    started = time.perf_counter()
    validate(cfg)
    run_dir = run_dir_of(cfg)
    resume_from = find_resume_checkpoint(cfg, run_dir)
    trainer, train_prompts, eval_prompts = build_trainer(cfg)
    sampler = PromptSampler(train_prompts, cfg.rollout.batch_size, cfg.seed)
    health = HealthMonitor()
    models = {"actor": trainer.actor, "critic": trainer.critic}
    metrics_file = run_dir / "metrics.jsonl"
    run_id, first_step = None, 1
    if resume_from is not None:
        state = load_checkpoint(resume_from, models)
        trainer.load_state_dict(state["trainer"])
        sampler.load_state_dict(state["sampler"])
        health.load_state_dict(state["health"])
        restore_rng(state["rng"])
        run_id, first_step = state["wandb_run_id"], state["step"] + 1
        log.info("resuming from %s at step %d", resume_from, first_step)
    # metrics.jsonl holds exactly the steps before first_step: a resumed run drops what was logged
    # after its checkpoint, a fresh run starts the file anew.
    rows = [json.loads(line) for line in metrics_file.read_text().splitlines()] if metrics_file.exists() else []
    rows = [row for row in rows if row["step"] < first_step]
    run_dir.mkdir(parents=True, exist_ok=True)
    metrics_file.write_text("".join(json.dumps(row) + "\n" for row in rows))

    wandb_cfg = cfg.logging.wandb
    tracker = Tracker(
        run_dir, OmegaConf.to_container(cfg, resolve=True), wandb_cfg.mode, wandb_cfg.project, wandb_cfg.entity,
        group_of(cfg), run_name_of(cfg), list(wandb_cfg.tags), run_id,
    )  # fmt: skip
    exit_code = 1
    try:
        # 4. the loop: evaluate the reference (unless resuming), then PPO iterations
        if resume_from is None:
            initial = evaluate(trainer, eval_prompts)
            tracker.log(initial, step=0)
            history: list[dict[str, float]] = []
        else:
            initial, history = rows[0], rows[1:]
        steps = cfg.trainer.steps
        bar = tqdm(range(first_step, steps + 1), desc="ppo", disable=not cfg.logging.progress_bar)
        for step in bar:
            metrics = trainer.step(sampler.next_batch())
            metrics.update(health(metrics, step))
            if step % cfg.trainer.eval_every == 0:
                metrics.update(evaluate(trainer, eval_prompts))
            if step == steps or (cfg.trainer.save_every and step % cfg.trainer.save_every == 0):
                state = {
                    "step": step,
                    "trainer": trainer.state_dict(),
                    "sampler": sampler.state_dict(),
                    "health": health.state_dict(),
                    "rng": capture_rng(),
                    "wandb_run_id": tracker.run.id,
                }
                config_yaml = OmegaConf.to_yaml(cfg, resolve=True)
                save_checkpoint(run_dir / "checkpoints", step, models, state, config_yaml, cfg.trainer.keep_last)
            if step == steps and "eval/score" not in metrics:
                # The end-of-run evaluation comes after the checkpoint: a run resumed from it to train
                # longer must not see randomness an uninterrupted run never drew.
                metrics.update(evaluate(trainer, eval_prompts))
            tracker.log(metrics, step=step)
            if step % cfg.logging.samples_every == 0 or step == 1:
                tracker.log_table("samples", step, sample_rows(trainer, cfg.logging.num_samples))
                rows = token_debug_rows(trainer.last_samples, trainer.last_experience, trainer.tokenizer,
                                        cfg.logging.debug_samples)  # fmt: skip
                tracker.log_table("token_debug", step, rows)
            bar.set_postfix(reward=f"{metrics['objective/scores']:.3f}", kl=f"{metrics['objective/kl']:.3f}")
            history.append(metrics)
        summary = summarize(initial, history, time.perf_counter() - started, cfg.trainer.objective_kl_weight)
        if cfg.trainer.save_model:
            # save_pretrained of a peft model writes the adapters only.
            trainer.actor.save_pretrained(run_dir / "model")
            trainer.tokenizer.save_pretrained(run_dir / "model")
        tracker.summary(summary)
        write_status(run_dir, "completed", summary=summary)
        print_summary(summary, run_dir)
        exit_code = 0
        return summary
    finally:
        tracker.finish(exit_code)


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
