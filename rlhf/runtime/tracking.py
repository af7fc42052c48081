"""Where metrics go: ``metrics.jsonl`` in the run dir, Weights & Biases, and the console.

Reads the config group ``logging``. W&B runs offline when no API key is configured, writing under
``<run dir>/wandb/``; ``wandb sync`` uploads such runs later.
"""

from __future__ import annotations

import json
import logging
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import wandb

from rlhf.runtime.jsonl import read_rows

log = logging.getLogger(__name__)


def resolve_wandb_mode(mode: str | None) -> str:
    """The configured mode, else $WANDB_MODE, else online with an API key and offline without."""
    if mode is not None:
        return mode
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    has_key = bool(os.environ.get("WANDB_API_KEY")) or "api.wandb.ai" in _read(Path("~/.netrc").expanduser())
    return "online" if has_key else "offline"


def _read(path: Path) -> str:
    return path.read_text() if path.exists() else ""


# The files of the run dir a run owns (and may cut back or start anew): its metrics and the tables it logs,
# each appended to ``<name>.jsonl``. Any other file there (the user's prompts.jsonl...) is never touched.
METRICS_FILE = "metrics.jsonl"


TABLES = ("samples", "token_debug")


RUN_FILES = (METRICS_FILE, *(f"{name}.jsonl" for name in TABLES))


@dataclass(frozen=True)
class WandbSettings:
    """The W&B run's place and name (``logging.wandb``, with the job's run name and group filled in)."""

    mode: str | None  # online | offline | disabled; None: $WANDB_MODE, else offline without an API key
    project: str
    name: str
    entity: str | None = None
    group: str | None = None
    tags: tuple[str, ...] = ()


class Tracker:
    """Appends one JSON object per step to ``metrics.jsonl`` and logs the same keys to W&B.

    A run resuming from the checkpoint of step ``resume_step`` continues W&B run ``run_id`` and its
    own files (``RUN_FILES``): they are read and checked first (a damaged row stops the run naming
    the file and line, and nothing is changed), then rows of later steps (logged before the run
    stopped, and about to be logged again) are dropped. Steps up to ``resume_step`` that the W&B run
    lacks (a ``kill -9`` before W&B wrote them) are logged to it again from these files, and steps W&B
    has already are not logged to it twice. A fresh run (``resume_step=None``) starts its files anew.
    """

    def __init__(
        self,
        run_dir: Path,
        *,
        config: dict[str, Any],
        settings: WandbSettings,
        run_id: str | None = None,
        resume_step: int | None = None,
    ) -> None:
        run_dir.mkdir(parents=True, exist_ok=True)
        self.run_dir = run_dir
        self.metrics_path = run_dir / METRICS_FILE
        rows = self._restart_files(resume_step)
        self.mode = resolve_wandb_mode(settings.mode)
        # Steps the W&B run holds already, read before this process adds its own offline folder.
        offline_steps = wandb_offline_steps(run_dir / "wandb", run_id) if run_id and self.mode == "offline" else []
        self.run = wandb.init(
            project=settings.project,
            entity=settings.entity,
            group=settings.group,
            name=settings.name,
            tags=list(settings.tags),
            config=config,
            dir=str(run_dir),
            mode=self.mode,
            id=run_id,
            resume="allow" if run_id else None,
            settings=wandb.Settings(console="off", silent=True),
        )
        # W&B holds every step below this one (its history is written in order; online, the server says
        # where it stands): W&B steps must increase, so earlier ones are not logged to it again.
        self.wandb_next_step = max(max(offline_steps, default=-1) + 1, self.run.starting_step if run_id else 0)
        if resume_step is not None:
            self._relog(rows, resume_step)

    def _restart_files(self, resume_step: int | None) -> dict[Path, list[dict[str, Any]]]:
        """Cut the run's files back to steps ``0..resume_step`` (a fresh run: empty them); returns their rows."""
        paths = [self.run_dir / file for file in RUN_FILES]
        rows = {path: [] for path in paths}
        if resume_step is not None:
            # Everything is read and checked before anything is written: a failure leaves every file as it was.
            rows = {
                path: [row for row in read_rows(path, required_key="step") if row["step"] <= resume_step]
                for path in paths
            }
            logged = [row["step"] for row in rows[self.metrics_path]]
            if logged != list(range(resume_step + 1)):
                raise ValueError(
                    f"{self.metrics_path} should hold steps 0..{resume_step} to resume from the checkpoint of step "
                    f"{resume_step}, but holds {len(logged)} of them: restore it, or start a new run dir"
                )
        for path, kept in rows.items():
            if kept or path.exists():
                staged = path.with_suffix(".jsonl.tmp")  # replaced in one step: a kill here loses no row
                staged.write_text("".join(json.dumps(row) + "\n" for row in kept))
                staged.replace(path)
        return rows

    def _relog(self, rows: dict[Path, list[dict[str, Any]]], resume_step: int) -> None:
        """Log to W&B the rows of steps ``wandb_next_step..resume_step``, which it lacks."""
        missing = range(self.wandb_next_step, resume_step + 1)
        if not missing:
            return
        log.warning(
            "W&B run %s lacks steps %d..%d (the run was killed before W&B wrote them): logging them again from %s",
            self.run.id,
            missing[0],
            missing[-1],
            self.run_dir,
        )
        tables = {name: rows[self.run_dir / f"{name}.jsonl"] for name in TABLES}
        for row in rows[self.metrics_path]:
            step = row["step"]
            if step in missing:
                values = {key: value for key, value in row.items() if key != "step"}
                for name, table in tables.items():
                    step_rows = [{k: v for k, v in r.items() if k != "step"} for r in table if r["step"] == step]
                    if step_rows:
                        values[name] = _table(step_rows)
                self.run.log(values, step=step)
        self.wandb_next_step = resume_step + 1

    def history(self) -> list[dict[str, Any]]:
        """The rows of ``metrics.jsonl``, one per logged step, in order."""
        return read_rows(self.metrics_path, required_key="step")

    def log(self, metrics: dict[str, float], step: int) -> None:
        """One step's metrics, to the file and to W&B (unless W&B has the step from before a resume)."""
        with self.metrics_path.open("a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
        if step >= self.wandb_next_step:
            self.run.log(metrics, step=step)

    def log_table(self, name: str, step: int, rows: list[dict[str, Any]]) -> None:
        """Rows with the same keys, as the W&B table ``name`` (one of ``TABLES``) and appended to ``<name>.jsonl``."""
        if name not in TABLES:
            raise ValueError(f"table {name!r} is not one of the run's tables {list(TABLES)} (tracking.TABLES)")
        if not rows:
            return
        with (self.run_dir / f"{name}.jsonl").open("a") as f:
            for row in rows:
                f.write(json.dumps({"step": step, **row}) + "\n")
        if step >= self.wandb_next_step:
            self.run.log({name: _table(rows)}, step=step)

    def summary(self, values: dict[str, float]) -> None:
        """Final figures of the run (W&B run summary)."""
        for key, value in values.items():
            self.run.summary[key] = value

    def finish(self, exit_code: int = 0, preempted: bool = False) -> None:
        """Close the W&B run, marked failed on a non-zero exit code, and preempted (to be resumed) when
        it stopped on a signal."""
        if preempted:
            self.run.mark_preempting()
        self.run.finish(exit_code=exit_code)


def _table(rows: list[dict[str, Any]]) -> wandb.Table:
    columns = list(rows[0])
    return wandb.Table(columns=columns, data=[[row[c] for c in columns] for row in rows])


# W&B's offline transaction log (``run-<id>.wandb``): a 7-byte header, then LevelDB log records in
# 32 KiB blocks, each chunk ``crc32(kind + data) (4) | length (2) | kind (1) | data``; a record is one
# protobuf ``Record``. W&B 0.31 has no Python reader of it, and a process killed with SIGKILL leaves
# up to ``x_transaction_log_flush_interval`` (15 s) of records unwritten.
_WANDB_HEADER = b":W&B"


_BLOCK, _CHUNK_HEADER = 32768, 7


_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def wandb_offline_steps(wandb_dir: Path, run_id: str) -> list[int]:
    """Steps of the history records that the offline folders of W&B run ``run_id`` hold (in order of
    the folders, and in each as written); a file cut short by a kill is read up to its last whole record."""
    from wandb.proto import wandb_internal_pb2

    steps = []
    for path in sorted(wandb_dir.glob(f"offline-run-*-{run_id}/run-{run_id}.wandb")):
        for payload in _wandb_records(path.read_bytes()):
            record = wandb_internal_pb2.Record()
            try:
                record.ParseFromString(payload)
            except Exception:  # noqa: BLE001 - protobuf's DecodeError: the rest of the file is not readable
                break
            if record.HasField("history"):
                steps.append(record.history.step.num)
    return steps


def _wandb_records(data: bytes) -> list[bytes]:
    """The whole records of a W&B transaction log, up to the first incomplete or damaged chunk."""
    if not data.startswith(_WANDB_HEADER):
        return []
    records, pending, pos = [], b"", _CHUNK_HEADER  # the file header is as long as a chunk header
    while pos + _CHUNK_HEADER <= len(data):
        if _BLOCK - pos % _BLOCK < _CHUNK_HEADER:  # a block's tail too short for a chunk header is padding
            pos += _BLOCK - pos % _BLOCK
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos : pos + _CHUNK_HEADER])
        chunk = data[pos + _CHUNK_HEADER : pos + _CHUNK_HEADER + length]
        if len(chunk) < length or zlib.crc32(bytes([kind]) + chunk) != crc:
            break
        pos += _CHUNK_HEADER + length
        if kind in (_FULL, _FIRST):
            pending = chunk
        elif kind in (_MIDDLE, _LAST):
            pending += chunk
        else:
            break
        if kind in (_FULL, _LAST):
            records.append(pending)
    return records


class NullTracker:
    """What ranks other than 0 log to: nothing (rank 0's ``Tracker`` owns the run dir). It reads the
    history that rank 0's tracker keeps, so that every rank resumes at the same step."""

    class run:  # noqa: N801 - mirrors ``Tracker.run.id``
        id = None

    def __init__(self, run_dir: Path):
        self.metrics_path = run_dir / METRICS_FILE

    def history(self) -> list[dict[str, Any]]:
        return read_rows(self.metrics_path, required_key="step")

    def log(self, metrics: dict[str, float], step: int) -> None:
        pass

    def log_table(self, name: str, step: int, rows: list[dict[str, Any]]) -> None:
        pass

    def summary(self, values: dict[str, float]) -> None:
        pass

    def finish(self, exit_code: int = 0, preempted: bool = False) -> None:
        pass
