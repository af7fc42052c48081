"""``train(cfg)``: validate the config, build the run (``rlhf.app.build``), restore it from a checkpoint
(``rlhf.app.state``) and loop PPO iterations, checkpointing them and stopping cleanly on SIGTERM/SIGINT.

Entry point: ``python train.py`` (see README), whose job (``rlhf.app.job``) validates before torch is
imported and then calls ``train_validated``. Tests call ``train(cfg)`` directly.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from omegaconf import DictConfig
from tqdm import tqdm

from rlhf.app.build import build_trainer
from rlhf.app.jobinfo import group_of, run_dir_of, run_name_of, shares_console
from rlhf.app.state import restore_run, run_state, save_model, save_run_checkpoint
from rlhf.config.redact import loggable_config
from rlhf.config.validate import validate
from rlhf.data.prompts import PromptSampler
from rlhf.ppo.metrics import sample_rows, summarize, token_debug_rows
from rlhf.ppo.trainer import PPOTrainer, StepResult
from rlhf.runtime.checkpoint import complete_checkpoints, find_resume_checkpoint
from rlhf.runtime.health import HealthMonitor
from rlhf.runtime.rundir import locked_run_dir
from rlhf.runtime.signals import RunInterrupted, StopSignals
from rlhf.runtime.status import write_status
from rlhf.runtime.tracking import NullTracker, Tracker, WandbSettings

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)


def evaluate(trainer: PPOTrainer, prompts: list[str]) -> dict[str, float]:
    """Mean reward on held-out prompts, sampled (as trained) and greedy, and ``eval/kl``: the KL to the
    reference of the sampled responses, the sum over each response's tokens of log pi - log pi_ref
    (nats per response, as ``objective/kl``), averaged over the responses. With several ranks each
    scores its share of the prompts."""
    dist, rollout, prompts = trainer.dist, trainer.rollout, trainer.dist.shard(prompts)
    where = f"held-out evaluation after step {trainer.steps_done}"  # for the error of a non-finite score
    samples = rollout.generate(prompts, do_sample=True)
    sampled = torch.tensor(dist.gather_objects(rollout.score(samples, where=where).tolist()))
    gold = dist.gather_objects(rollout.gold(samples.prompts, samples.responses)) if rollout.gold else []
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
        **({"eval/gold_score": sum(gold) / len(gold)} if gold else {}),
    }


def train(cfg: DictConfig) -> dict[str, float]:
    """Run PPO as configured, continuing from a checkpoint per ``trainer.resume``; returns the
    run's final figures (also the W&B summary). Raises ``RunInterrupted`` after a stop signal."""
    validate(cfg)  # milliseconds
    return train_validated(cfg)


def train_validated(cfg: DictConfig) -> dict[str, float]:
    """``train`` of a config validated already (the job validates before torch is imported)."""
    started = time.perf_counter()
    run_dir = run_dir_of(cfg)
    with locked_run_dir(run_dir):  # one run at a time in a run dir, from before anything is read or written
        return _train(cfg, run_dir, started)


def _train(cfg: DictConfig, run_dir: Path, started: float) -> dict[str, float]:
    # Build the run, and restore it from the checkpoint trainer.resume picks (if any)...
    resume_from = find_resume_checkpoint(cfg, run_dir)
    trainer, train_prompts, eval_prompts = build_trainer(cfg)
    dist = trainer.dist
    # Every rank draws the same global batch of rollout.batch_size prompts per rank, and samples its share.
    sampler = PromptSampler(train_prompts, batch_size=cfg.rollout.batch_size * dist.world_size, seed=cfg.seed)
    health = HealthMonitor()
    run_id, last_step = None, None
    if resume_from is not None:
        run_id, last_step = restore_run(resume_from, cfg, trainer, sampler, health)
    tracker = open_tracker(cfg, run_dir, trainer, run_id=run_id, resume_step=last_step)
    exit_code, preempted = 1, False
    # From here on a stop signal is handled: the loop stops after its step; later, the run finishes.
    with StopSignals() as stop:
        try:
            # ...run the PPO loop (ppo_loop: its steps numbered there), then the summary, model and status.json.
            history = ppo_loop(cfg, trainer, sampler, health, tracker, eval_prompts, stop, run_dir)
            summary = finish_run(cfg, trainer, tracker, stop, history=history, run_dir=run_dir, started=started)
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


def open_tracker(
    cfg: DictConfig, run_dir: Path, trainer: PPOTrainer, *, run_id: str | None, resume_step: int | None
) -> Tracker | NullTracker:
    """Rank 0's ``Tracker`` (metrics.jsonl, W&B), resuming W&B run ``run_id``; a ``NullTracker`` elsewhere."""
    dist = trainer.dist
    if dist.is_main:  # rank 0 alone writes the run dir: metrics, W&B, checkpoints
        logged = loggable_config(cfg)
        wandb_cfg = logged["logging"]["wandb"]  # project, entity, tags with ${oc.env:...} as <env NAME> too
        settings = WandbSettings(
            mode=cfg.logging.wandb.mode,  # as set
            project=wandb_cfg["project"],
            name=run_name_of(cfg),
            entity=wandb_cfg["entity"],
            group=group_of(cfg),
            tags=tuple(wandb_cfg["tags"]),
        )
        tracker = Tracker(run_dir, config=logged, settings=settings, run_id=run_id, resume_step=resume_step)
    dist.barrier()  # rank 0 has cut metrics.jsonl back to the checkpoint's step: the others read it now
    return tracker if dist.is_main else NullTracker(run_dir)


def finish_run(
    cfg: DictConfig,
    trainer: PPOTrainer,
    tracker: Tracker | NullTracker,
    stop: StopSignals,
    *,
    history: list[dict[str, float]],
    run_dir: Path,
    started: float,
) -> dict[str, float]:
    """After the last step: the run's summary (W&B, status.json, the console) and its trained model."""
    seconds = time.perf_counter() - started
    summary = summarize(history[0], history[1:], seconds=seconds, kl_weight=cfg.trainer.objective_kl_weight)
    if cfg.trainer.save_model:
        save_model(trainer, run_dir / "model")
    tracker.summary(summary)
    if trainer.dist.is_main:
        with stop.protected():
            write_status(run_dir, "completed", summary=summary, world_size=trainer.dist.world_size)
        print_summary(summary, run_dir)
    return summary


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
    if not history:  # step 0: the initial policy, and what the reward's build measured (the proxy's accuracy)
        history.append({**evaluate(trainer, eval_prompts), **trainer.rollout.reward_figures})
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
                checkpoint = save_run_checkpoint(cfg, trainer, step=step, state=state, run_dir=run_dir)
        show_progress(bar, metrics, step=step, steps=steps, quiet=quiet)
        if stopping and step < steps:
            raise RunInterrupted(stop_signal, step, checkpoint)
    return history


def show_progress(bar: tqdm, metrics: dict[str, float], *, step: int, steps: int, quiet: bool) -> None:
    """The step's reward and KL on the progress bar; without a bar, one log line per evaluation."""
    gold = {"gold": f"{metrics['objective/gold_scores']:.3f}"} if "objective/gold_scores" in metrics else {}
    bar.set_postfix(reward=f"{metrics['objective/scores']:.3f}", kl=f"{metrics['objective/kl']:.3f}", **gold)
    if quiet and "eval/score" in metrics:
        figures = (metrics["objective/scores"], metrics["objective/kl"], metrics["eval/score"])
        gold = f", held-out gold {metrics['eval/gold_score']:.3f}" if "eval/gold_score" in metrics else ""
        log.info("step %d/%d: reward %.3f, KL %.3f, held-out reward %.3f%s", step, steps, *figures, gold)


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


def print_summary(summary: dict[str, float], run_dir: Path) -> None:
    gold = ""
    if "final/eval_gold_score" in summary:
        gold = (
            f"held-out gold score: {summary['initial/eval_gold_score']:.3f} -> {summary['final/eval_gold_score']:.3f} "
            f"(best {summary['best/eval_gold_score']:.3f}); "
        )
    print(
        f"held-out reward (sampled): {summary['initial/eval_score']:.3f} -> {summary['final/eval_score']:.3f}; {gold}"
        f"greedy: {summary['initial/eval_score_greedy']:.3f} -> {summary['final/eval_score_greedy']:.3f}; "
        f"KL to reference on the held-out prompts: {summary['final/eval_kl']:.3f} nats per response "
        f"(last training batch: {summary['final/kl']:.3f}); wall time {summary['time/total']:.1f} s; run dir {run_dir}"
    )
