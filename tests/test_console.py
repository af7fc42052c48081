"""What a user sees on the console of ``python train.py``: one config line (env values redacted), no
DeepSpeed line when DeepSpeed is not used, one bar and one line for the tiny actor's build, no
alembic lines in an Optuna sweep, no overlapping progress bars under the joblib launcher."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import REPO

SMALL = ["rollout.batch_size=8", "ppo.minibatch_size=4", "ppo.epochs=1", "logging.wandb.mode=disabled"]
DEEPSPEED_LINE = "Setting accelerator to"
SECRET = "0.0317"


def train(*overrides: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    done = subprocess.run(
        [sys.executable, "train.py", *overrides, *SMALL],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, **(env or {})},
    )
    assert done.returncode == 0, done.stderr
    return done


@pytest.mark.slow  # a CLI run; not slow: test_train's command-line run
def test_config_line_redacted_and_no_deepspeed_line(tmp_path, tiny_cache):
    done = train(
        "trainer.steps=1",
        "logging.progress_bar=false",
        "kl.beta=${oc.env:H8_SECRET_BETA}",
        "gae.lam=0.9",
        f"hydra.run.dir={tmp_path}",
        f"model.cache_dir={tiny_cache}",
        env={"H8_SECRET_BETA": SECRET},
    )
    output = done.stdout + done.stderr
    assert DEEPSPEED_LINE not in output  # transformers' save_pretrained imported DeepSpeed, which said so
    [line] = [line for line in (tmp_path / "train.log").read_text().splitlines() if "config: " in line]
    assert "model=tiny" in line and "kl=fixed" in line and "reward=arithmetic" in line
    assert "overrides: " in line and "kl.beta=<env H8_SECRET_BETA>" in line and "gae.lam=0.9" in line
    assert "hydra.run.dir" not in line
    assert SECRET not in output and SECRET not in line
    assert line.split(" - ", 1)[1] in done.stdout  # on the console too


@pytest.mark.slow
def test_cold_cache_build_shows_one_line(tmp_path):
    done = train("trainer.steps=1", f"hydra.run.dir={tmp_path / 'run'}", f"model.cache_dir={tmp_path / 'cache'}")
    output = done.stdout + done.stderr
    assert "tiny actor warm-up step" not in output  # was one INFO line per 25 steps
    assert output.count("tiny actor built in") == 1
    assert "building the tiny actor" in done.stderr  # the bar (logging.progress_bar=true)
    assert DEEPSPEED_LINE not in output


@pytest.mark.slow  # an optuna sweep; not slow: test_sweep's optuna test
def test_optuna_sweep_has_no_alembic_lines(tmp_path, tiny_cache):
    done = train(
        "-m",
        "sweep=optuna",
        "hydra.sweeper.n_trials=1",
        "trainer.steps=1",
        "logging.progress_bar=false",
        f"hydra.sweep.dir={tmp_path}",
        f"model.cache_dir={tiny_cache}",
    )
    assert "alembic" not in done.stdout + done.stderr
    assert "Best value" in done.stdout


@pytest.mark.slow  # a joblib sweep of real runs
def test_joblib_jobs_log_lines_instead_of_bars(tmp_path: Path, tiny_cache):
    done = train(
        "-m",
        "hydra/launcher=joblib",
        "hydra.launcher.n_jobs=2",
        "seed=0,1",
        "trainer.steps=2",
        "trainer.eval_every=1",
        f"hydra.sweep.dir={tmp_path}",
        f"model.cache_dir={tiny_cache}",
    )
    assert "ppo:" not in done.stderr  # logging.progress_bar=true, but two bars would overwrite each other
    assert done.stdout.count("step 2/2: reward") == 2


def test_only_deepspeeds_detection_line_is_dropped():
    from rlhf.runtime.distributed import quiet_deepspeed_detection

    quiet_deepspeed_detection()
    quiet_deepspeed_detection()  # once is enough: no second filter
    logger = logging.getLogger("DeepSpeed")
    assert len(logger.filters) == 1
    seen: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())  # DeepSpeed's logger does not propagate
    logger.addHandler(handler)
    try:
        logger.warning("Setting accelerator to CPU. If you have GPU or other accelerator, we were unable to detect it")
        logger.warning("ZeRO stage 2 optimizer")
    finally:
        logger.removeHandler(handler)
    assert seen == ["ZeRO stage 2 optimizer"]
