"""``status.json`` in the run dir: written atomically, read back by the job and the report."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

STATUS_FILE = "status.json"


TRACEBACK_FILE = "traceback.txt"


def write_status(run_dir: Path, status: str, **fields: Any) -> None:
    """``status.json`` in the run dir: "running", "completed" with the summary, "failed" with the
    error, or "interrupted". Replaced in one step: a reader or a kill never sees half a file."""
    run_dir.mkdir(parents=True, exist_ok=True)
    staged = run_dir / f".{STATUS_FILE}.tmp"
    staged.write_text(json.dumps({"status": status, **fields}, indent=1))
    os.replace(staged, run_dir / STATUS_FILE)


def read_status(run_dir: Path) -> str | None:
    """The run's status ("running", "completed", ...), or None before its ``status.json`` is written."""
    path = run_dir / STATUS_FILE
    return json.loads(path.read_text())["status"] if path.exists() else None
