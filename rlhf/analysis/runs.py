"""Run dirs as a run leaves them, read without torch or Hydra: the loader of ``python -m rlhf.report`` and
notebooks/compare_runs.ipynb.

Each run dir is read as the run left it: ``metrics.jsonl`` (one object per step), ``status.json``
(completed with its summary, or failed with the error) and ``.hydra/overrides.yaml`` / ``config.yaml``.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from rlhf.runtime.jsonl import read_rows
from rlhf.runtime.status import STATUS_FILE

# The per-step gold score a run on a task with a hidden gold reward logs beside the score it trains on.
GOLD_KEY = "objective/gold_scores"
# Significant digits of float values in run names: Optuna samples 17-digit floats.
NAME_DIGITS = 4


@dataclass
class Run:
    path: Path
    name: str  # the job's overrides that differ from the other runs', or the dir name
    status: str  # completed | failed | unknown (no status.json: still running, or killed)
    error: str = ""
    summary: dict[str, float] = field(default_factory=dict)
    metrics: list[dict[str, float]] = field(default_factory=list)  # one dict per logged step
    overrides: list[str] = field(default_factory=list)  # the job's command-line overrides
    config: dict[str, object] = field(default_factory=dict)  # the job's composed config, dotted keys

    def series(self, key: str) -> tuple[list[int], list[float]]:
        """(steps, values) of a metric over the steps that logged it."""
        rows = [row for row in self.metrics if key in row]
        return [row["step"] for row in rows], [row[key] for row in rows]


def is_run_dir(path: Path) -> bool:
    return (path / "metrics.jsonl").exists() or (path / STATUS_FILE).exists()


def find_runs(paths: list[Path]) -> list[Path]:
    """Run dirs among ``paths``: a path that is a run, or the run dirs right under it (a sweep)."""
    found = []
    for path in paths:
        if is_run_dir(path):
            found.append(path)
            continue
        jobs = [p for p in path.iterdir() if p.is_dir() and is_run_dir(p)] if path.is_dir() else []
        if not jobs:
            raise FileNotFoundError(f"{path} is neither a run dir (metrics.jsonl, status.json) nor a sweep of them")
        found.extend(sorted(jobs, key=lambda p: (not p.name.isdigit(), int(p.name) if p.name.isdigit() else p.name)))
    return found


def load_run(path: Path) -> Run:
    overrides_file = path / ".hydra" / "overrides.yaml"
    overrides = yaml.safe_load(overrides_file.read_text()) if overrides_file.exists() else None
    experiment = [o for o in overrides or [] if not o.startswith(("hydra.", "hydra/", "logging.", "sweep="))]
    run = Run(path=path, name=",".join(experiment) or path.name, status="unknown", overrides=experiment)
    config_file = path / ".hydra" / "config.yaml"
    if config_file.exists():
        run.config = flatten(yaml.safe_load(config_file.read_text()) or {})
    metrics_file = path / "metrics.jsonl"
    if metrics_file.exists():
        run.metrics = read_rows(metrics_file)
    status_file = path / STATUS_FILE
    if status_file.exists():
        status = json.loads(status_file.read_text())
        run.status, run.error, run.summary = status["status"], status.get("error", ""), status.get("summary", {})
    return run


def flatten(config: dict, prefix: str = "") -> dict[str, object]:
    """``{"kl": {"beta": 0.1}}`` -> ``{"kl.beta": 0.1}`` (the keys overrides and W&B use)."""
    flat: dict[str, object] = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


_FLOAT = re.compile(r"[-+]?(\d+\.\d*|\.\d+|\d+(\.\d*)?[eE][-+]?\d+)")


def short_override(override: str) -> str:
    """``kl.beta=0.02504130762999893`` -> ``kl.beta=0.02504``: floats to NAME_DIGITS significant digits.

    Only values that are a single float literal with more digits are rounded; ints, strings, lists and
    short floats stay as typed (``kl.beta=1.0`` stays ``kl.beta=1.0``).
    """
    key, sep, value = override.partition("=")
    if sep and _FLOAT.fullmatch(value):
        rounded = f"{float(value):.{NAME_DIGITS}g}"
        if float(rounded) != float(value):
            return f"{key}={rounded}"
    return override


def name_by_differences(runs: list[Run]) -> list[str]:
    """Name each run by the overrides that are not shared by all runs; returns the shared ones."""
    for run in runs:
        run.name = ",".join(short_override(o) for o in run.overrides) or run.path.name
    if len(runs) < 2:
        return []
    common = set.intersection(*(set(run.overrides) for run in runs))
    for run in runs:
        run.name = ",".join(short_override(o) for o in run.overrides if o not in common) or run.path.name
    return sorted(common)


def load_runs(paths: list[Path]) -> tuple[list[Run], list[str]]:
    """The runs under ``paths``, named by what differs between them, and the overrides they share."""
    runs = [load_run(p) for p in find_runs(paths)]
    return runs, name_by_differences(runs)


def filter_runs(runs: list[Run], where: dict[str, object]) -> list[Run]:
    """The runs whose config has every ``key: value`` of ``where`` (dotted keys, e.g. ``{"kl.beta": 0.01}``)."""
    return [run for run in runs if all(run.config.get(key) == value for key, value in where.items())]


def has_gold(runs: list[Run]) -> bool:
    """Whether some run logged a gold score (the reviews task): the report then adds its gold figures."""
    return any(GOLD_KEY in row for run in runs for row in run.metrics)
