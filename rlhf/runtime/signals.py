"""Stopping a run cleanly on SIGTERM, SIGINT or SIGHUP (preemption, Ctrl-C, ``scancel``, a closed
terminal or SSH session).

The first signal asks the run to stop at its next safe point: the end of the current PPO step,
which is then logged and checkpointed, and the run exits with ``128 + signal number``. A second
signal stops at once (the last complete checkpoint stays), except inside a protected section, the
writing of a step's metrics and checkpoint, which always completes first. Before the PPO loop
(while models load) there is nothing to save, and ``stop_at_once`` makes a signal stop at once.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from types import FrameType

log = logging.getLogger(__name__)


SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


class RunInterrupted(Exception):
    """The run stopped on a signal after saving ``checkpoint`` at ``step``."""

    def __init__(self, signum: int, step: int, checkpoint: Path):
        name = signal.Signals(signum).name
        super().__init__(
            f"{name}: stopped after step {step} with a checkpoint in {checkpoint}; "
            "run the same command again (trainer.resume=auto or true) to continue"
        )
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        self.exit_code = 128 + signum  # the shell's convention for a process ended by a signal


class StoppedAtOnce(KeyboardInterrupt):
    """The run stopped at once on signal ``signum`` (a second signal, or one before the PPO loop)."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum = signum
        self.exit_code = 128 + signum


@contextlib.contextmanager
def stop_at_once() -> Iterator[None]:
    """While active, SIGTERM/SIGINT/SIGHUP raise ``StoppedAtOnce`` where the run is (main thread only)."""

    def handle(signum: int, frame: FrameType | None) -> None:
        raise StoppedAtOnce(signum, f"{signal.Signals(signum).name}: stopped at once, outside the PPO loop")

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, handle) for sig in SIGNALS}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


class StopSignals:
    """Context manager that turns SIGTERM/SIGINT/SIGHUP into a stop request while it is active.

    Handlers can only be installed from the main thread; elsewhere signals keep their default
    behaviour and ``requested`` stays False.
    """

    def __init__(self) -> None:
        self.signum: int | None = None  # the first signal received
        self._protected = False
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            self._previous = {sig: signal.signal(sig, self._handle) for sig in SIGNALS}
        return self

    def __exit__(self, *exc_info: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if self.signum is None:
            self.signum = signum
            log.warning("%s: stopping after this PPO step with a checkpoint (send it again to stop at once)", name)
        elif self._protected:
            log.warning("%s: a step's metrics and checkpoint are being written; stopping right after", name)
        else:
            raise StoppedAtOnce(signum, f"{name} received twice: stopped at once; the last complete checkpoint stays")

    @contextlib.contextmanager
    def protected(self) -> Iterator[None]:
        """A section a second signal does not cut short (writing metrics and a checkpoint)."""
        self._protected = True
        try:
            yield
        finally:
            self._protected = False
