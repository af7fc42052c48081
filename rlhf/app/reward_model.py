"""Reward-model training, a stage of its own: ``python -m rlhf.reward_model model.path=... data.path=...``.

A sequence classifier (``num_labels=1``) learns from preference pairs with the Bradley-Terry loss
(``rlhf.core.losses.bradley_terry_loss``); inputs are encoded exactly as the PPO run's
``ClassifierReward`` encodes them (``reward.input_format`` pair or chat), so ``<run dir>/model`` (the
best checkpoint by held-out pair accuracy, with its tokenizer) loads with
``reward=classifier reward.path=<run dir>/model`` unchanged. ``status.json`` in the run dir follows the
job (running, completed, failed); a bad config value or input file prints one ``error:`` line and exits 2.
"""

from __future__ import annotations

import datetime
import logging
import os
import sys
import traceback
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from rlhf.config.errors import ConfigError, InputError
from rlhf.config.reward_model_schema import validate_reward_model_run
from rlhf.data.pairs import load_rows, split_pairs, to_pairs
from rlhf.runtime.rundir import RunDirLocked, locked_run_dir
from rlhf.runtime.status import TRACEBACK_FILE, write_status

log = logging.getLogger(__name__)

# The run config is named ``rm_cfg`` here and in rlhf.app.reward_model_loop: its groups (model, data) are
# those of rlhf.config.reward_model_schema, not the PPO run's of the same names (README's "read by" table).


def run_dir_of(rm_cfg: DictConfig) -> Path:
    """``output_dir`` if set, else Hydra's output dir of this job."""
    if rm_cfg.output_dir:
        return Path(rm_cfg.output_dir)
    if HydraConfig.initialized():
        return Path(HydraConfig.get().runtime.output_dir)
    raise ValueError("output_dir is not set and there is no Hydra run dir: set output_dir=DIR")


def run_reward_model_job(rm_cfg: DictConfig) -> float:
    """Validate, read the pairs, train; returns the best held-out accuracy. Exit 2 on a bad config or
    input (``error: ...``), 1 on a run dir in use or any other failure (traceback in ``traceback.txt``)."""
    run_dir = run_dir_of(rm_cfg)
    try:
        with locked_run_dir(run_dir):
            return _run_locked(rm_cfg, run_dir)
    except RunDirLocked as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(1) from None


def _run_locked(rm_cfg: DictConfig, run_dir: Path) -> float:
    try:
        validate_reward_model_run(rm_cfg)  # before torch is imported: a bad value fails in a second
        pairs = to_pairs(
            load_rows(rm_cfg.data.path, split=rm_cfg.data.split, cache_dir=rm_cfg.data.cache_dir), rm_cfg.data.path
        )
        train_pairs, eval_pairs = split_pairs(pairs, eval_fraction=rm_cfg.data.eval_fraction, seed=rm_cfg.seed)
        started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        write_status(run_dir, "running", pid=os.getpid(), started=started)
        from rlhf.app.reward_model_loop import train_reward_model  # torch and transformers: seconds

        results = train_reward_model(rm_cfg, run_dir, train_pairs=train_pairs, eval_pairs=eval_pairs)
    except (ConfigError, InputError) as error:
        write_status(run_dir, "failed", error=f"{type(error).__name__}: {error}")
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    except Exception as error:
        (run_dir / TRACEBACK_FILE).write_text(traceback.format_exc())
        write_status(run_dir, "failed", error=f"{type(error).__name__}: {error}")
        print(traceback.format_exc(), file=sys.stderr, end="")
        raise SystemExit(1) from None
    write_status(run_dir, "completed", **results)
    print(f"best held-out pair accuracy {results['best/eval_accuracy']:.3f}; model in {run_dir / 'model'}")
    return results["best/eval_accuracy"]
