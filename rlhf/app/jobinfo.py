"""What a Hydra job knows about itself: its run dir, its W&B name and group, its console."""

from __future__ import annotations

from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from rlhf.config.redact import loggable_config, redact_env

# Overrides that do not define the experiment stay out of run names.
_NOT_EXPERIMENT = ("hydra.", "hydra/", "logging.", "sweep=")


def is_multirun() -> bool:
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def run_dir_of(cfg: DictConfig) -> Path:
    """``trainer.output_dir`` if set, else Hydra's output dir of this job."""
    if cfg.trainer.output_dir:
        return Path(cfg.trainer.output_dir)
    if HydraConfig.initialized():
        return Path(HydraConfig.get().runtime.output_dir)
    raise ValueError("trainer.output_dir is not set and there is no Hydra run dir: set trainer.output_dir=DIR")


def run_name_of(cfg: DictConfig) -> str:
    """``logging.wandb.name`` if set, else the job's overrides (less logging/Hydra/sweep ones), else
    "default"; a value read from the environment shows as ``<env NAME>``."""
    if cfg.logging.wandb.name:
        return loggable_config(cfg)["logging"]["wandb"]["name"]
    if HydraConfig.initialized():
        # Raw strings: iterating Hydra's override list would resolve ${oc.env:...} inside them.
        task = OmegaConf.to_container(HydraConfig.get().overrides.task, resolve=False)
        overrides = [redact_env(o) for o in task if not o.startswith(_NOT_EXPERIMENT)]
        if overrides:
            return ",".join(overrides)
    return "default"


def group_of(cfg: DictConfig) -> str | None:
    """``logging.wandb.group`` if set, else the sweep's dir (``<date>_<time>``) for multirun jobs."""
    if cfg.logging.wandb.group:
        return loggable_config(cfg)["logging"]["wandb"]["group"]
    if is_multirun():
        sweep_dir = Path(HydraConfig.get().sweep.dir)
        return f"{sweep_dir.parent.name}_{sweep_dir.name}"
    return None


def config_line() -> str | None:
    """The job's config in one line: the option chosen in each config group, then the overrides of
    single keys (as typed, a value read from the environment shown as ``<env NAME>``); None outside
    Hydra. ``config: data=arithmetic kl=fixed model=tiny ... | overrides: kl.beta=0.05 gae.lam=0.9``"""
    if not HydraConfig.initialized():
        return None
    hydra_cfg = HydraConfig.get()
    choices = {group: option for group, option in hydra_cfg.runtime.choices.items() if not group.startswith("hydra/")}
    # Raw strings: iterating Hydra's override list would resolve ${oc.env:...} inside them.
    task = OmegaConf.to_container(hydra_cfg.overrides.task, resolve=False)
    keys = [o for o in task if o.split("=", 1)[0].lstrip("+~") not in choices and not o.startswith("hydra")]
    groups = " ".join(f"{group}={option}" for group, option in sorted(choices.items()) if option is not None)
    return f"config: {groups} | overrides: {' '.join(redact_env(o) for o in keys) or 'none'}"


def shares_console() -> bool:
    """Whether other jobs of the sweep write to this console at the same time (the joblib launcher
    running more than one job at once), where their progress bars would overwrite each other."""
    if not is_multirun():
        return False
    launcher = HydraConfig.get().launcher
    return "joblib" in str(launcher.get("_target_", "")) and launcher.get("n_jobs", 1) != 1
