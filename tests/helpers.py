"""Plain functions and constants shared by test modules and the torchrun workers (fixtures live in
tests/conftest.py, which holds nothing else).

Test modules import from here, never from each other nor from conftest.py: a test module is collected
once, and its fixtures and globals are not an interface.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONF_DIR = REPO / "conf"


def set_test_environment() -> None:
    """Offline, quiet and one torch thread: called by tests/conftest.py for the pytest process and by the
    torchrun workers (tests/ddp_worker.py, skip_worker.py) for theirs, where conftest.py is not loaded."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("WANDB_SILENT", "true")
    import torch  # here, not at the top: config-only tests import this module without torch

    torch.set_num_threads(1)


def compose(overrides: list[str]):
    """The run config ``python train.py <overrides>`` would get (without Hydra's runtime)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from rlhf.config.schema import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra_compose(config_name="train", overrides=overrides)


# A run small enough for tests: few prompts, one short PPO step, W&B off unless a test turns it on.
FAST = [
    "trainer.steps=1",
    "rollout.batch_size=8",
    "ppo.minibatch_size=4",
    "ppo.epochs=1",
    "logging.wandb.mode=disabled",
    "logging.progress_bar=false",
]

# The quick loop's one successful ``python train.py`` run (~6 s), shared by tests that only read it:
# tests/test_train.py checks its output, tests/test_generate.py samples from it, tests/test_data_safety.py
# reads a copy of its metrics.jsonl.
CLI_RUN_OVERRIDES = ["trainer.steps=2", "rollout.batch_size=8", "ppo.minibatch_size=4", "kl.beta=0.07", "gae.lam=0.9"]


# The over-optimisation testbed at its smallest: a proxy reward model of 100 pairs and one epoch, a few
# PPO steps (tests/test_reviews.py; the tiny actor and the proxy are built once into the session's cache).
TESTBED = [
    "experiment=overoptimization",
    "reward.proxy.num_pairs=100",
    "reward.proxy.epochs=1",
    "trainer.steps=2",
    "trainer.eval_every=2",
    "rollout.batch_size=8",
    "ppo.minibatch_size=4",
    "ppo.epochs=1",
    "logging.wandb.mode=disabled",
    "logging.progress_bar=false",
]


def wandb_inspect(run_dir: Path, *flags: str) -> list[dict]:
    """The records of the run dir's one offline W&B run (``--summary``: its state), read by ``wandb leet inspect``."""
    (offline_run,) = (run_dir / "wandb").glob("offline-run-*")
    wandb_cli = Path(sys.executable).with_name("wandb")
    out = subprocess.run(
        [str(wandb_cli), "leet", "inspect", "--json", *flags, str(offline_run)],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    if "--summary" in flags:
        return [json.loads(out)]
    return [json.loads(line) for line in out.splitlines() if line.strip()]


# A one-step command-line run, for refusals (tests/test_cli_security.py, test_attacks.py, test_bad_inputs.py).
SHORT = [
    "trainer.steps=1",
    "rollout.batch_size=8",
    "ppo.minibatch_size=4",
    "ppo.epochs=1",
    "logging.progress_bar=false",
]


def short_run(tmp_path: Path, tiny_cache: Path, *args: str) -> tuple[subprocess.CompletedProcess, float, Path]:
    """``(result, seconds, run_dir)`` of ``python train.py <args> <SHORT>`` with W&B off, run dir ``tmp_path/run``."""
    run_dir = tmp_path / "run"
    started = time.perf_counter()
    result = subprocess.run(
        [
            sys.executable,
            "train.py",
            *args,
            *SHORT,
            "logging.wandb.mode=disabled",
            f"model.cache_dir={tiny_cache}",
            f"hydra.run.dir={run_dir}",
            f"hydra.sweep.dir={run_dir}",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    return result, time.perf_counter() - started, run_dir


# Runs that checkpoint and resume (tests/test_resume.py, test_data_safety.py): adaptive KL and a flat LR
# schedule so that a resumed run has state to restore; evaluation at step 3.
RESUME_RUN = [
    "rollout.batch_size=8",
    "ppo.minibatch_size=4",
    "kl=adaptive",
    "kl.target=0.5",
    "kl.horizon=100",
    "optimizer.scheduler.end_factor=1.0",
    "trainer.eval_every=3",
    "trainer.save_every=0",
    "logging.progress_bar=false",
    "logging.wandb.mode=offline",
]


def resume_cli(run_dir: Path, *overrides: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """``python train.py <RESUME_RUN> <overrides>`` in ``run_dir`` (``env`` added to the environment)."""
    return subprocess.run(
        [sys.executable, "train.py", *RESUME_RUN, *overrides, f"hydra.run.dir={run_dir}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, **(env or {})},
    )


def metrics_by_step(run_dir: Path) -> dict[int, dict]:
    """The run dir's metrics.jsonl rows by step, without the ``time/*`` keys (which differ run to run)."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {row["step"]: {k: v for k, v in row.items() if not k.startswith("time/")} for row in rows}
