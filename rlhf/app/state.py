"""A run's state apart from its loop: what a checkpoint holds (weights, DeepSpeed engines, counters,
sampler, health, RNG), how it is written after a step and read back for an exact resume, and the
trained actor written at the end (``model/``).

``rlhf.runtime.checkpoint`` knows the checkpoint's files; this module knows which objects of the run
go into them.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import torch
import yaml
from omegaconf import DictConfig

from rlhf.app.optimizers import make_schedulers
from rlhf.config.redact import loggable_config
from rlhf.data.prompts import PromptSampler
from rlhf.ppo.trainer import PPOTrainer
from rlhf.runtime.checkpoint import (
    capture_rng,
    checkpoint_path,
    load_checkpoint,
    restore_rng,
    retied,
    save_checkpoint,
    untied,
)
from rlhf.runtime.health import HealthMonitor

log = logging.getLogger(__name__)


ENGINES = "deepspeed"  # a checkpoint's folder of DeepSpeed engine checkpoints


def trained_models(trainer: PPOTrainer) -> dict[str, torch.nn.Module]:
    models = {"actor": trainer.actor, "critic": trainer.critic}
    return {name: model for name, model in models.items() if model is not None}  # no critic: critic-free


def trained_engines(trainer: PPOTrainer) -> dict[str, torch.nn.Module]:
    engines = {"actor": trainer.train_actor, "critic": trainer.train_critic}
    return {name: engine for name, engine in engines.items() if engine is not None}


def save_engines(trainer: PPOTrainer, folder: Path) -> dict[str, Path]:
    """With DeepSpeed, every rank writes its engines' checkpoints (its shards of the optimizer state)
    to ``folder``, which the checkpoint then takes in as its ``deepspeed/``; nothing otherwise."""
    dist = trainer.dist
    if not dist.saves_engines:
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


def save_run_checkpoint(cfg: DictConfig, trainer: PPOTrainer, *, step: int, state: dict, run_dir: Path) -> Path:
    """Checkpoint ``step`` of the run under ``<run dir>/checkpoints``: every rank takes part (gathering
    weights, writing DeepSpeed engine shards), rank 0 writes the checkpoint; returns its path."""
    root = run_dir / "checkpoints"
    config_yaml = yaml.safe_dump(loggable_config(cfg), sort_keys=False)
    checkpoint = checkpoint_path(root, step)
    weights = model_weights(trainer)  # gathered on rank 0 from every rank's shard
    engines = save_engines(trainer, root / f".engines-{checkpoint.name}")
    if trainer.dist.is_main:
        checkpoint = save_checkpoint(
            root,
            step,
            weights=weights,
            state=state,
            config_yaml=config_yaml,
            keep_last=cfg.trainer.keep_last,
            folders=engines,
        )
    return checkpoint


def restore_run(
    path: Path, cfg: DictConfig, trainer: PPOTrainer, sampler: PromptSampler, health: HealthMonitor
) -> tuple[str, int]:
    """Load checkpoint ``path`` into the run's objects; returns (W&B run id, step of the checkpoint)."""
    engines = trainer.dist.saves_engines  # the engines' own checkpoints hold the weights
    weights, state = load_checkpoint(path, [] if engines else list(trained_models(trainer)))
    rngs, world = state["rng"], trainer.dist.world_size
    if len(rngs) != world:
        raise ValueError(
            f"{path} was written by a run of {len(rngs)} process(es): resume it with as many (this one has {world})"
        )
    if engines:  # weights and optimizer state: each rank its shard
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
