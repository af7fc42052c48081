"""Where metrics go: ``metrics.jsonl`` in the run dir, Weights & Biases, and the console.

Reads the config group ``logging``. W&B runs offline when no API key is configured, writing under
``<run dir>/wandb/``; ``wandb sync`` uploads such runs later.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import wandb


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


class Tracker:
    """Appends one JSON object per step to ``metrics.jsonl`` and logs the same keys to W&B.

    A run resuming from the checkpoint of step ``resume_step`` continues W&B run ``run_id`` and its
    own files: rows of later steps (logged before the run stopped, and about to be logged again)
    are dropped from every ``*.jsonl`` of the run dir. A fresh run (``resume_step=None``) starts
    them anew.
    """

    def __init__(
        self,
        run_dir: Path,
        config: dict[str, Any],
        mode: str | None,
        project: str,
        entity: str | None,
        group: str | None,
        name: str,
        tags: list[str],
        run_id: str | None = None,
        resume_step: int | None = None,
    ):
        run_dir.mkdir(parents=True, exist_ok=True)
        self.run_dir = run_dir
        self.metrics_path = run_dir / "metrics.jsonl"
        for path in run_dir.glob("*.jsonl"):
            kept = [] if resume_step is None else [row for row in _read_rows(path) if row["step"] <= resume_step]
            staged = path.with_suffix(".jsonl.tmp")  # replaced in one step: a kill here loses no row
            staged.write_text("".join(json.dumps(row) + "\n" for row in kept))
            staged.replace(path)
        logged = [row["step"] for row in self.history()]
        if resume_step is not None and logged != list(range(resume_step + 1)):
            raise ValueError(
                f"{self.metrics_path} should hold steps 0..{resume_step} to resume from the checkpoint of step "
                f"{resume_step}, but holds {len(logged)} rows: restore it, or start a new run dir"
            )
        self.mode = resolve_wandb_mode(mode)
        self.run = wandb.init(
            project=project,
            entity=entity,
            group=group,
            name=name,
            tags=tags,
            config=config,
            dir=str(run_dir),
            mode=self.mode,
            id=run_id,
            resume="allow" if run_id else None,
            settings=wandb.Settings(console="off", silent=True),
        )

    def history(self) -> list[dict[str, Any]]:
        """The rows of ``metrics.jsonl``, one per logged step, in order."""
        return _read_rows(self.metrics_path) if self.metrics_path.exists() else []

    def log(self, metrics: dict[str, float], step: int) -> None:
        """One step's metrics, to the file and to W&B."""
        with self.metrics_path.open("a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
        self.run.log(metrics, step=step)

    def log_table(self, name: str, step: int, rows: list[dict[str, Any]]) -> None:
        """Rows with the same keys, as the W&B table ``name`` and appended to ``<name>.jsonl``."""
        if not rows:
            return
        with (self.run_dir / f"{name}.jsonl").open("a") as f:
            for row in rows:
                f.write(json.dumps({"step": step, **row}) + "\n")
        columns = list(rows[0])
        table = wandb.Table(columns=columns, data=[[row[c] for c in columns] for row in rows])
        self.run.log({name: table}, step=step)

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


def _read_rows(path: Path) -> list[dict[str, Any]]:
    """JSON rows of a ``.jsonl`` file; a last line cut short by a kill is left out."""
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return rows


class NullTracker:
    """What ranks other than 0 log to: nothing (rank 0's ``Tracker`` owns the run dir). It reads the
    history that rank 0's tracker keeps, so that every rank resumes at the same step."""

    class run:  # noqa: N801 - mirrors ``Tracker.run.id``
        id = None

    def __init__(self, run_dir: Path):
        self.metrics_path = run_dir / "metrics.jsonl"

    def history(self) -> list[dict[str, Any]]:
        return _read_rows(self.metrics_path) if self.metrics_path.exists() else []

    def log(self, metrics: dict[str, float], step: int) -> None:
        pass

    def log_table(self, name: str, step: int, rows: list[dict[str, Any]]) -> None:
        pass

    def summary(self, values: dict[str, float]) -> None:
        pass

    def finish(self, exit_code: int = 0, preempted: bool = False) -> None:
        pass
