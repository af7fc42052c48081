"""``train(cfg)``: build the run from a composed config (``rlhf.app.build``) and loop PPO iterations,
checkpointing and resuming (``rlhf.runtime.checkpoint``) and stopping cleanly on SIGTERM/SIGINT.

Entry point: ``python train.py`` (see README). Tests call ``train(cfg)`` directly.
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import yaml
from omegaconf import DictConfig
from tqdm import tqdm

from rlhf.app.build import build_trainer, make_schedulers
from rlhf.app.jobinfo import group_of, run_dir_of, run_name_of, shares_console
from rlhf.config.redact import loggable_config
from rlhf.config.validate import validate
from rlhf.data.prompts import PromptSampler
from rlhf.ppo.metrics import sample_rows, summarize, token_debug_rows
from rlhf.ppo.trainer import PPOTrainer, StepResult
from rlhf.runtime.checkpoint import (
    capture_rng,
    checkpoint_path,
    complete_checkpoints,
    find_resume_checkpoint,
    load_checkpoint,
    restore_rng,
    retied,
    save_checkpoint,
    untied,
)
from rlhf.runtime.health import HealthMonitor
from rlhf.runtime.rundir import locked_run_dir
from rlhf.runtime.signals import RunInterrupted, StopSignals
from rlhf.runtime.status import write_status
from rlhf.runtime.tracking import NullTracker, Tracker

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)


ENGINES = "deepspeed"  # a checkpoint's folder of DeepSpeed engine checkpoints


def evaluate(trainer: PPOTrainer, prompts: list[str]) -> dict[str, float]:
    """Mean reward on held-out prompts, sampled (as trained) and greedy, and ``eval/kl``: the KL to the
    reference of the sampled responses, the sum over each response's tokens of log pi - log pi_ref
    (nats per response, as ``objective/kl``), averaged over the responses. With several ranks each
    scores its share of the prompts."""
    dist, rollout, prompts = trainer.dist, trainer.rollout, trainer.dist.shard(prompts)
    where = f"held-out evaluation after step {trainer.steps_done}"  # for the error of a non-finite score
    samples = rollout.generate(prompts, do_sample=True)
    sampled = torch.tensor(dist.gather_objects(rollout.score(samples, where=where).tolist()))
    was_training = trainer.actor.training
    trainer.actor.eval()  # as for the rollout's log-probs: no (LoRA) dropout
    logprobs, ref_logprobs = rollout.policy_logprobs(samples)  # (b, A) each
    trainer.actor.train(was_training)
    kl = torch.tensor(dist.gather_objects(((logprobs - ref_logprobs) * samples.action_mask).sum(dim=1).tolist()))
    greedy = torch.tensor(
        dist.gather_objects(rollout.score(rollout.generate(prompts, do_sample=False), where=where).tolist())
    )
    # Non-finite scores (kept only with reward.on_nonfinite=mask) stay out of the means.
    return {
        "eval/score": sampled[sampled.isfinite()].mean().item(),
        "eval/score_greedy": greedy[greedy.isfinite()].mean().item(),
        "eval/kl": kl.mean().item(),
    }


def train(cfg: DictConfig) -> dict[str, float]:
    """Run PPO as configured, continuing from a checkpoint per ``trainer.resume``; returns the
    run's final figures (also the W&B summary). Raises ``RunInterrupted`` after a stop signal."""
    started = time.perf_counter()
    validate(cfg)  # milliseconds; from the command line it has run already, before torch was imported
    run_dir = run_dir_of(cfg)
    with locked_run_dir(run_dir):  # one run at a time in a run dir, from before anything is read or written
        return _train(cfg, run_dir, started)


def _train(cfg: DictConfig, run_dir: Path, started: float) -> dict[str, float]:
    resume_from = find_resume_checkpoint(cfg, run_dir)
    trainer, train_prompts, eval_prompts = build_trainer(cfg)
    dist = trainer.dist
    # Every rank draws the same global batch of rollout.batch_size prompts per rank, and samples its share.
    sampler = PromptSampler(train_prompts, cfg.rollout.batch_size * dist.world_size, cfg.seed)
    health = HealthMonitor()
    run_id, last_step = None, None
    if resume_from is not None:
        run_id, last_step = restore_run(resume_from, cfg, trainer, sampler, health)
    logged = loggable_config(cfg)
    wandb_cfg = logged["logging"]["wandb"]  # mode as set; project, entity, tags with ${oc.env:...} as <env NAME> too
    if dist.is_main:  # rank 0 alone writes the run dir: metrics, W&B, checkpoints
        tracker = Tracker(
            run_dir, logged, cfg.logging.wandb.mode, wandb_cfg["project"], wandb_cfg["entity"],
            group_of(cfg), run_name_of(cfg), list(wandb_cfg["tags"]), run_id, last_step,
        )  # fmt: skip
    dist.barrier()  # rank 0 has cut metrics.jsonl back to the checkpoint's step: the others read it now
    if not dist.is_main:
        tracker = NullTracker(run_dir)
    exit_code, preempted = 1, False
    # From here on a stop signal is handled: the loop stops after its step; later, the run finishes.
    with StopSignals() as stop:
        try:
            history = ppo_loop(cfg, trainer, sampler, health, tracker, eval_prompts, stop, run_dir)
            seconds, kl_weight = time.perf_counter() - started, cfg.trainer.objective_kl_weight
            summary = summarize(history[0], history[1:], seconds=seconds, kl_weight=kl_weight)
            if cfg.trainer.save_model:
                save_model(trainer, run_dir / "model")
            tracker.summary(summary)
            if dist.is_main:
                with stop.protected():
                    write_status(run_dir, "completed", summary=summary, world_size=dist.world_size)
                print_summary(summary, run_dir)
            exit_code = 0
            return summary
        except RunInterrupted as stopped:
            exit_code, preempted = stopped.exit_code, True
            if dist.is_main:
                with stop.protected():
                    write_status(run_dir, "interrupted", step=stopped.step, checkpoint=str(stopped.checkpoint))
            raise
        except BaseException:
            checkpoints = complete_checkpoints(run_dir / "checkpoints")
            log.error("the run failed; last complete checkpoint: %s", checkpoints[-1] if checkpoints else "none")
            raise
        finally:
            with stop.protected():
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
    quiet = not cfg.logging.progress_bar or shares_console()  # joblib jobs' bars would overwrite each other
    bar = tqdm(range(len(history), steps + 1), desc="ppo", disable=quiet)
    for step in bar:
        # 1-5. rollout, score, experience, PPO epochs, KL controller (PPOTrainer.step)
        result = trainer.step(sampler.next_batch())
        metrics = result.metrics  # the health and evaluation figures join the step's own
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
        # Every rank stops after the same step, with the signal that any of them received.
        stop_signal = int(trainer.dist.max(stop.signum or 0))
        stopping = stop_signal > 0
        with stop.protected():
            log_step(tracker, result, trainer.tokenizer, step, cfg.logging)
            history.append(metrics)
            if final_state or stopping or (cfg.trainer.save_every and step % cfg.trainer.save_every == 0):
                state = final_state or run_state(step, trainer, sampler, health, tracker.run.id, steps)
                config_yaml = yaml.safe_dump(loggable_config(cfg), sort_keys=False)
                checkpoint = checkpoint_path(run_dir / "checkpoints", step)
                weights = model_weights(trainer)  # gathered on rank 0 from every rank's shard
                engines = save_engines(trainer, run_dir / "checkpoints" / f".engines-{checkpoint.name}")
                if trainer.dist.is_main:
                    checkpoint = save_checkpoint(
                        run_dir / "checkpoints", step, weights, state, config_yaml, cfg.trainer.keep_last,
                        folders=engines,
                    )  # fmt: skip
        bar.set_postfix(reward=f"{metrics['objective/scores']:.3f}", kl=f"{metrics['objective/kl']:.3f}")
        if quiet and "eval/score" in metrics:  # no bar: one line per evaluation instead
            figures = (metrics["objective/scores"], metrics["objective/kl"], metrics["eval/score"])
            log.info("step %d/%d: reward %.3f, KL %.3f, held-out reward %.3f", step, steps, *figures)
        if stopping and step < steps:
            raise RunInterrupted(stop_signal, step, checkpoint)
    return history


def log_step(
    tracker: Tracker, result: StepResult, tokenizer: PreTrainedTokenizerBase, step: int, logging_cfg: DictConfig
) -> None:
    """The step's metrics (with the figures the loop added); every ``logging.samples_every`` steps
    (and at step 1) the samples and token-debug tables of its rollout."""
    tracker.log(result.metrics, step=step)
    if step % logging_cfg.samples_every == 0 or step == 1:
        samples, exp = result.samples, result.experience
        rows = sample_rows(samples, raw_scores=result.raw_scores, scores=exp.scores, num=logging_cfg.num_samples)
        tracker.log_table("samples", step, rows)
        tracker.log_table("token_debug", step, token_debug_rows(samples, exp, tokenizer, logging_cfg.debug_samples))


def trained_models(trainer: PPOTrainer) -> dict[str, torch.nn.Module]:
    return {"actor": trainer.actor, "critic": trainer.critic}


def trained_engines(trainer: PPOTrainer) -> dict[str, torch.nn.Module]:
    return {"actor": trainer.train_actor, "critic": trainer.train_critic}


def save_engines(trainer: PPOTrainer, folder: Path) -> dict[str, Path]:
    """With DeepSpeed, every rank writes its engines' checkpoints (its shards of the optimizer state)
    to ``folder``, which the checkpoint then takes in as its ``deepspeed/``; nothing otherwise."""
    dist = trainer.dist
    if dist.kind != "deepspeed":
        return {}
    if dist.is_main:
        shutil.rmtree(folder, ignore_errors=True)  # left by a save that died
    dist.barrier()
    for name, engine in trained_engines(trainer).items():
        dist.save_engine(engine, folder / name)
    return {ENGINES: folder}


def model_weights(trainer: PPOTrainer) -> dict[str, dict[str, torch.Tensor]]:
    """The trained models' full weights on rank 0 (each tied parameter once), for a checkpoint."""
    return {name: untied(model, trainer.dist.state_dict(model)) for name, model in trained_models(trainer).items()}


def save_model(trainer: PPOTrainer, folder: Path) -> None:
    """The trained actor and its tokenizer, as ``from_pretrained`` reads them (rank 0 writes; with
    FSDP every rank takes part in gathering the weights). A LoRA actor writes its adapters only."""
    dist = trainer.dist
    weights = untied(trainer.actor, dist.state_dict(trainer.actor)) if dist.sharded else None
    if dist.is_main:
        trainer.actor.save_pretrained(folder, state_dict=weights)
        trainer.tokenizer.save_pretrained(folder)


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
        "rng": trainer.dist.gather_objects([capture_rng()]),  # one per rank: each samples with its own
        "wandb_run_id": wandb_run_id,
    }


def restore_run(
    path: Path, cfg: DictConfig, trainer: PPOTrainer, sampler: PromptSampler, health: HealthMonitor
) -> tuple[str, int]:
    """Load checkpoint ``path`` into the run's objects; returns (W&B run id, step of the checkpoint)."""
    deepspeed = trainer.dist.kind == "deepspeed"  # the engines' own checkpoints hold the weights
    weights, state = load_checkpoint(path, [] if deepspeed else list(trained_models(trainer)))
    rngs, world = state["rng"], trainer.dist.world_size
    if len(rngs) != world:
        raise ValueError(
            f"{path} was written by a run of {len(rngs)} process(es): resume it with as many (this one has {world})"
        )
    if deepspeed:  # weights and optimizer state: each rank its shard
        if not (path / ENGINES).is_dir():
            raise ValueError(
                f"{path} was not written by DeepSpeed engines: resume it without hardware.distributed=deepspeed"
            )
        for name, engine in trained_engines(trainer).items():
            trainer.dist.load_engine(engine, path / ENGINES / name)
    else:
        for name, model in trained_models(trainer).items():
            trainer.dist.load_state_dict(model, retied(model, weights[name]))
    trainer.load_state_dict(state["trainer"])
    if state["planned_steps"] != cfg.trainer.steps:
        # trainer.steps was raised: the LR schedule continues as if the run had been planned this long.
        trainer.schedulers = make_schedulers(cfg, list(trainer.optimizers().values()), trainer.steps_done)
        log.info("LR schedule re-planned over trainer.steps=%d (was %d)", cfg.trainer.steps, state["planned_steps"])
    sampler.load_state_dict(state["sampler"])
    health.load_state_dict(state["health"])
    restore_rng(rngs[trainer.dist.rank])
    log.info("resuming from %s after step %d", path, state["step"])
    return state["wandb_run_id"], state["step"]


def print_summary(summary: dict[str, float], run_dir: Path) -> None:
    print(
        f"held-out reward (sampled): {summary['initial/eval_score']:.3f} -> {summary['final/eval_score']:.3f}; "
        f"greedy: {summary['initial/eval_score_greedy']:.3f} -> {summary['final/eval_score_greedy']:.3f}; "
        f"KL to reference on the held-out prompts: {summary['final/eval_kl']:.3f} nats per response "
        f"(last training batch: {summary['final/kl']:.3f}); wall time {summary['time/total']:.1f} s; run dir {run_dir}"
    )
