"""What a Hydra job knows about itself: its run dir, W&B name and group, and its status marker.

``run_job`` is what ``train.py`` runs. It validates the config before torch is imported (a bad value
fails in about a second: ``error: <message>``, exit code 2), then keeps ``status.json`` in the run
dir true at every exit: ``running`` (pid, start time), then ``completed``, ``failed`` (the error; the
traceback in ``traceback.txt``) or ``interrupted``. A failed single run exits with 1. In a multirun
sweep a failed job returns NaN so that the other jobs still run (Hydra would otherwise stop the
sweep at the first exception), and ``SweepStatus`` (a Hydra callback in ``conf/train.yaml``) makes
the sweep exit with 1 after its last job, naming the failed jobs' dirs. A run stopped by
SIGTERM/SIGINT/SIGHUP exits with 128 + the signal's number, ending a sweep too. No value read from
the environment with ``${oc.env:...}`` reaches any of these files, the W&B run name or the logs.
"""

from __future__ import annotations

import datetime
import json
import logging
import math
import os
import sys
import time
import traceback
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from rlhf.app.jobinfo import config_line, is_multirun, run_dir_of
from rlhf.config.errors import ConfigError, InputError
from rlhf.config.redact import Redactor, env_names
from rlhf.config.validate import validate
from rlhf.data.prompts import load_prompts, local_prompt_files
from rlhf.runtime.rundir import RunDirLocked, locked_run_dir
from rlhf.runtime.signals import RunInterrupted, StoppedAtOnce, stop_at_once
from rlhf.runtime.status import STATUS_FILE, TRACEBACK_FILE, read_status, write_status

log = logging.getLogger(__name__)


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


def is_main_process(environ: Mapping[str, str] = os.environ) -> bool:
    """Rank 0 of a multi-process launch (torchrun and accelerate launch set ``RANK``), or the one process."""
    return environ.get("RANK", "0") == "0"


def run_job(cfg: DictConfig) -> float:
    """Validate, train and return the sweep objective, keeping ``status.json`` true; a failed job of
    a multirun returns NaN instead of raising. Nothing it writes or logs holds a value read from the
    environment."""
    redactor = Redactor(env_names(cfg))
    handlers = redactor.install()
    if is_main_process() and (line := config_line()):
        log.info("%s", line)  # at the top of the console and of train.log
    try:
        with stop_at_once():  # a signal before the PPO loop has nothing to save: stop now
            return _run(cfg, redactor)
    finally:
        redactor.uninstall(handlers)


def _run(cfg: DictConfig, redactor: Redactor) -> float:
    run_dir = run_dir_of(cfg)
    try:
        # Before status.json is written: a second run in a run dir in use must not touch the first's files.
        with locked_run_dir(run_dir):
            return _run_locked(cfg, run_dir, redactor)
    except RunDirLocked as error:
        if is_multirun():
            log.error("job failed: %s; the sweep goes on", error)
            return math.nan
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(1) from None
    except OSError as error:  # the run dir cannot be made or locked (trainer.output_dir names a file...)
        # Its path may hold a value read from the environment: Hydra would print it unscrubbed.
        message = redactor.scrub(f"run dir {run_dir} cannot be used ({error})")
        if is_multirun():
            log.error("job failed: %s; the sweep goes on", message)
            return math.nan
        print(f"error: {message}: give another hydra.run.dir or trainer.output_dir", file=sys.stderr)
        raise SystemExit(1) from None


def _run_locked(cfg: DictConfig, run_dir: Path, redactor: Redactor) -> float:
    main = is_main_process()
    try:
        validate(cfg)  # before torch and transformers are imported: a bad value fails in a second
        if local_prompt_files(cfg.data):
            load_prompts(cfg.data)  # an empty or unreadable prompt file too (read again by the run: cheap)
    except (ConfigError, InputError) as error:
        return _refuse(error, run_dir, main, redactor)
    if main:
        started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        write_status(run_dir, "running", pid=os.getpid(), started=started)

    try:
        from rlhf.app.run import train_validated  # torch and transformers: seconds

        return train_validated(cfg)["objective"]
    except RunInterrupted as stopped:
        # A stop signal ends the process (and a sweep) with 128 + its number, as the shell expects.
        # train() has written status.json ("interrupted", with the step and the checkpoint).
        log.error("%s", stopped)
        raise SystemExit(stopped.exit_code) from stopped
    except KeyboardInterrupt as stopped:  # a second signal, a signal before the loop, or Ctrl-C
        exit_code = stopped.exit_code if isinstance(stopped, StoppedAtOnce) else 128 + 2
        # A signal after train() wrote "interrupted" (with its step and checkpoint) keeps that status.
        if main and read_status(run_dir) != "interrupted":
            write_status(run_dir, "interrupted", error=redactor.scrub(str(stopped) or "KeyboardInterrupt"))
        log.error("%s", stopped)
        raise SystemExit(exit_code) from stopped
    except (ConfigError, InputError) as error:  # found once a tokenizer or model config is read
        return _refuse(error, run_dir, main, redactor)
    except Exception as error:
        trace = redactor.scrub(traceback.format_exc())
        message = redactor.scrub(f"{type(error).__name__}: {error}")
        if main:
            (run_dir / TRACEBACK_FILE).write_text(trace)
            write_status(run_dir, "failed", error=message)
        if is_multirun():
            log.error("job failed (%s); traceback in %s; the sweep goes on", message, run_dir)
            return math.nan
        print(trace, file=sys.stderr, end="")
        raise SystemExit(1) from None


def _refuse(error: ConfigError | InputError, run_dir: Path, main: bool, redactor: Redactor) -> float:
    """A bad config value or input: ``error: ...`` in one line and exit 2 (no traceback: the message
    names the key, file or prompt); a job of a multirun fails and the sweep goes on."""
    message = redactor.scrub(str(error))
    if main:
        write_status(run_dir, "failed", error=f"{type(error).__name__}: {message}")
    if is_multirun():
        log.error("job failed: %s; the sweep goes on", message)
        return math.nan
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2) from None


class SweepStatus(Callback):
    """Hydra callback (``hydra.callbacks`` in ``conf/train.yaml``): after a multirun, count the jobs
    whose ``status.json`` says failed and exit with 1 if there is any, naming their dirs. Jobs may run
    in other processes (joblib launcher), so their status files are what counts; only those written
    since this sweep started (a sweep dir can be reused to resume a sweep)."""

    def __init__(self) -> None:
        self.started = time.time()

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self.started = time.time()

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        statuses = sorted(sweep_dir.glob(f"**/{STATUS_FILE}"), key=lambda p: (len(p.parts), len(str(p)), str(p)))
        failed = [
            path.parent
            for path in statuses
            if path.stat().st_mtime >= self.started - 1 and json.loads(path.read_text())["status"] == "failed"
        ]
        if failed:
            dirs = "".join(f"\n  {job}" for job in failed)
            print(
                f"{len(failed)} job(s) of the sweep failed (status.json and traceback.txt there):{dirs}",
                file=sys.stderr,
            )
            raise SystemExit(1)
