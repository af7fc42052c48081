"""Compare runs: a table of final figures and PNG plots of reward and KL.

    python -m rlhf.report multirun/<date>/<time>            # every job of a sweep
    python -m rlhf.report outputs/<date>/<a> outputs/<date>/<b> --out report/

Each run dir is read as the run left it: ``metrics.jsonl`` (one object per step), ``status.json``
(completed with its summary, or failed with the error) and ``.hydra/overrides.yaml``.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from rlhf.job import STATUS_FILE

COLUMNS = ["run", "status", "final reward", "best reward", "final KL", "clipfrac", "value loss", "seconds"]


@dataclass
class Run:
    path: Path
    name: str  # the job's overrides that differ from the other runs', or the dir name
    status: str  # completed | failed | unknown (no status.json: still running, or killed)
    error: str = ""
    summary: dict[str, float] = field(default_factory=dict)
    metrics: list[dict[str, float]] = field(default_factory=list)  # one dict per logged step
    overrides: list[str] = field(default_factory=list)  # the job's command-line overrides

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
    metrics_file = path / "metrics.jsonl"
    if metrics_file.exists():
        run.metrics = [json.loads(line) for line in metrics_file.read_text().splitlines() if line.strip()]
    status_file = path / STATUS_FILE
    if status_file.exists():
        status = json.loads(status_file.read_text())
        run.status, run.error, run.summary = status["status"], status.get("error", ""), status.get("summary", {})
    return run


def name_by_differences(runs: list[Run]) -> list[str]:
    """Name each run by the overrides that are not shared by all runs; returns the shared ones."""
    if len(runs) < 2:
        return []
    common = set.intersection(*(set(run.overrides) for run in runs))
    for run in runs:
        run.name = ",".join(o for o in run.overrides if o not in common) or run.path.name
    return sorted(common)


def load_runs(paths: list[Path]) -> tuple[list[Run], list[str]]:
    """The runs under ``paths``, named by what differs between them, and the overrides they share."""
    runs = [load_run(p) for p in find_runs(paths)]
    return runs, name_by_differences(runs)


def table_rows(runs: list[Run]) -> list[dict[str, object]]:
    """One row per run; figures of unfinished runs come from whatever steps they logged."""
    rows = []
    for run in runs:
        evals = run.series("eval/score")[1]
        clip = run.series("policy/clipfrac")[1]
        s = run.summary
        rows.append({
            "run": run.name,
            "status": run.status if not run.error else f"{run.status}: {run.error}",
            "final reward": s.get("final/eval_score", evals[-1] if evals else math.nan),
            "best reward": s.get("best/eval_score", max(evals) if evals else math.nan),
            "final KL": s.get("final/kl", _last(run, "objective/kl")),
            "clipfrac": s.get("mean/policy_clipfrac", sum(clip) / len(clip) if clip else math.nan),
            "value loss": s.get("final/value_loss", _last(run, "loss/value")),
            "seconds": s.get("time/total", math.nan),
        })  # fmt: skip
    return rows


def _last(run: Run, key: str) -> float:
    values = run.series(key)[1]
    return values[-1] if values else math.nan


def format_table(rows: list[dict[str, object]]) -> str:
    """A plain-text table, numbers with 3 decimals."""
    cells = [[f"{row[c]:.3f}" if isinstance(row[c], float) else str(row[c]) for c in COLUMNS] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(COLUMNS)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(COLUMNS, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)) for r in cells]
    return "\n".join(lines)


def plot(runs: list[Run], out_dir: Path) -> list[Path]:
    """curves.png (held-out reward, training reward and KL per step) and frontier.png (final reward vs KL)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    panels = [
        ("eval/score", "held-out reward"),
        ("objective/scores", "training reward"),
        ("objective/kl", "KL to ref"),
    ]
    for ax, (key, title) in zip(axes, panels, strict=True):
        for run in runs:
            steps, values = run.series(key)
            if steps:
                ax.plot(steps, values, marker="o" if key == "eval/score" else None, markersize=3, label=run.name)
        ax.set_title(title)
        ax.set_xlabel("PPO step")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    curves = out_dir / "curves.png"
    fig.savefig(curves, dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6.5, 5))
    for row in table_rows(runs):
        if not math.isnan(row["final KL"]) and not math.isnan(row["final reward"]):
            ax.scatter(row["final KL"], row["final reward"])
            ax.annotate(row["run"], (row["final KL"], row["final reward"]), fontsize=7)
    ax.set_xlabel("final KL to reference (nats per response)")
    ax.set_ylabel("final held-out reward")
    ax.set_title("reward-KL frontier")
    fig.tight_layout()
    frontier = out_dir / "frontier.png"
    fig.savefig(frontier, dpi=110)
    plt.close(fig)
    return [curves, frontier]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rlhf.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("paths", nargs="+", type=Path, help="a sweep dir, or run dirs")
    parser.add_argument("--out", type=Path, help="where the PNGs go (default: the sweep dir, or ./report)")
    args = parser.parse_args(argv)
    runs, common = load_runs(args.paths)
    if common:
        print("all runs: " + " ".join(common))
    print(format_table(table_rows(runs)))
    out = args.out or (args.paths[0] if len(args.paths) == 1 and not is_run_dir(args.paths[0]) else Path("report"))
    for path in plot(runs, out):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
