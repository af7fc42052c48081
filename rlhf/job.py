"""What a Hydra job knows about itself: its run dir, W&B name and group, and its status marker.

``run_job`` is what ``train.py`` runs. In a multirun sweep a job that fails writes its traceback and
a ``status.json`` marked failed, and returns NaN, so the other jobs of the sweep still run (Hydra
would otherwise stop the sweep at the first exception). A single run re-raises. A run stopped by
SIGTERM/SIGINT exits with 128 + the signal's number, ending a sweep too.
"""

from __future__ import annotations

import json
import logging
import math
import traceback
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from rlhf.signals import RunInterrupted

log = logging.getLogger(__name__)

STATUS_FILE = "status.json"
TRACEBACK_FILE = "traceback.txt"
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
    """``logging.wandb.name`` if set, else the job's overrides (less logging/Hydra/sweep ones), else "default"."""
    if cfg.logging.wandb.name:
        return cfg.logging.wandb.name
    if HydraConfig.initialized():
        overrides = [o for o in HydraConfig.get().overrides.task if not o.startswith(_NOT_EXPERIMENT)]
        if overrides:
            return ",".join(overrides)
    return "default"


def group_of(cfg: DictConfig) -> str | None:
    """``logging.wandb.group`` if set, else the sweep's dir (``<date>_<time>``) for multirun jobs."""
    if cfg.logging.wandb.group:
        return cfg.logging.wandb.group
    if is_multirun():
        sweep_dir = Path(HydraConfig.get().sweep.dir)
        return f"{sweep_dir.parent.name}_{sweep_dir.name}"
    return None


def launch_overrides(argv: list[str], environ: Mapping[str, str]) -> list[str]:
    """Overrides to add for one process of a multi-process launch (torchrun and accelerate launch set
    ``WORLD_SIZE`` and ``RANK``): every rank must use the one run dir given on the command line,
    and only rank 0 writes Hydra's files and log there."""
    if int(environ.get("WORLD_SIZE", "1")) == 1:
        return []
    if not any(arg.startswith(("hydra.run.dir=", "trainer.output_dir=")) for arg in argv):
        raise SystemExit(
            "a launch of several processes needs one run dir for all of them: add hydra.run.dir=DIR "
            "(otherwise each rank picks its own timestamped dir)"
        )
    if environ.get("RANK", "0") != "0":
        return ["hydra.output_subdir=null", "hydra/job_logging=disabled", "hydra/hydra_logging=disabled"]
    return []


def write_status(run_dir: Path, status: str, **fields: Any) -> None:
    """``status.json`` in the run dir: "completed" with the summary, or "failed" with the error."""
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / STATUS_FILE).write_text(json.dumps({"status": status, **fields}, indent=1))


def run_job(cfg: DictConfig) -> float:
    """Train and return the sweep objective; in a multirun, record a failure instead of raising."""
    from rlhf.run import train

    try:
        return train(cfg)["objective"]
    except RunInterrupted as stopped:
        # A stop signal ends the process (and a sweep) with 128 + its number, as the shell expects.
        log.error("%s", stopped)
        raise SystemExit(stopped.exit_code) from stopped
    except Exception as error:
        if not is_multirun():
            raise
        run_dir = run_dir_of(cfg)
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / TRACEBACK_FILE).write_text(traceback.format_exc())
        write_status(run_dir, "failed", error=f"{type(error).__name__}: {error}")
        log.error("job failed (%s: %s); traceback in %s; the sweep goes on", type(error).__name__, error, run_dir)
        return math.nan
