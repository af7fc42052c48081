"""One run at a time in a run dir: an exclusive lock on ``<run dir>/.lock``.

Two runs writing one run dir would interleave their metrics and checkpoints (and one would trip on
the other's staging folders). The lock is an ``fcntl.flock`` on the file, which holds the holder's
pid for the error message; the OS releases it when the holder exits, however it exits (a
``kill -9`` too), so a stale file never blocks a later run. Under several processes rank 0 alone,
which writes the run dir, takes it.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

LOCK_FILE = ".lock"


# Run dirs this process holds: the job wrapper takes the lock before it writes status.json, and
# train() (also called directly) takes it again; a second flock from the same process would block.
_HELD: set[Path] = set()


class RunDirLocked(RuntimeError):
    """Another process holds the run dir's lock."""


@contextlib.contextmanager
def locked_run_dir(run_dir: Path) -> Iterator[Path]:
    """Hold the run dir's lock for the block (rank 0 of a multi-process launch, or the only process);
    raises ``RunDirLocked`` naming the holder's pid at once if another process holds it."""
    # torchrun and accelerate launch set these; read from the environment, before any process group exists.
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and int(os.environ.get("RANK", "0")) != 0:
        yield run_dir
        return
    key = run_dir.resolve()
    if key in _HELD:
        yield run_dir
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            raise RunDirLocked(
                f"run dir {run_dir} is in use by another run (pid {holder}, lock {path}): wait for that run to end, "
                "or give this one its own hydra.run.dir (or trainer.output_dir)"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        _HELD.add(key)
        try:
            yield run_dir
        finally:
            _HELD.discard(key)
            os.ftruncate(fd, 0)  # still held here: no other run's pid is erased
    finally:
        os.close(fd)  # releases the lock
