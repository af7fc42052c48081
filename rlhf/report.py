"""Compare runs: a table of final figures and PNG plots of reward and KL.

    python -m rlhf.report multirun/<date>/<time>            # every job of a sweep
    python -m rlhf.report outputs/<date>/<a> outputs/<date>/<b> --out report/
    python -m rlhf.report multirun/<date>/<time> --smooth 0.9    # heavier smoothing of per-step curves

Each run dir is read as the run left it: ``metrics.jsonl`` (one object per step), ``status.json``
(completed with its summary, or failed with the error) and ``.hydra/overrides.yaml``.
"""

from __future__ import annotations

import argparse
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from rlhf.runtime.jsonl import read_rows
from rlhf.runtime.status import STATUS_FILE

COLUMNS = ["run", "status", "final reward", "best reward", "final KL", "clipfrac", "value loss", "seconds"]
# Mild by default: per-step training reward and KL of a small batch are noisy, but a heavy default
# would hide what a short run did. 0 = raw curves only.
DEFAULT_SMOOTH = 0.6
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


def ema(values: list[float], smooth: float) -> list[float]:
    """Exponential moving average, started at the first value: s_0 = v_0, s_t = a s_{t-1} + (1 - a) v_t.

    ``smooth`` = a in [0, 1): 0 returns the values unchanged, 0.9 averages over roughly the last 10.
    """
    if not 0 <= smooth < 1:
        raise ValueError(f"smooth={smooth}: must be in [0, 1) (0 = no smoothing)")
    out: list[float] = []
    for value in values:
        out.append(value if not out else smooth * out[-1] + (1 - smooth) * value)
    return out


def table_rows(runs: list[Run]) -> list[dict[str, object]]:
    """One row per run; figures of unfinished runs come from whatever steps they logged."""
    rows = []
    for run in runs:
        evals = run.series("eval/score")[1]
        clip = run.series("policy/clipfrac")[1]
        s = run.summary
        rows.append(
            {
                "run": run.name,
                "status": run.status if not run.error else f"{run.status}: {run.error}",
                "final reward": s.get("final/eval_score", evals[-1] if evals else math.nan),
                "best reward": s.get("best/eval_score", max(evals) if evals else math.nan),
                "final KL": _final_kl(run),
                "clipfrac": s.get("mean/policy_clipfrac", sum(clip) / len(clip) if clip else math.nan),
                "value loss": s.get("final/value_loss", _last(run, "loss/value")),
                "seconds": s.get("time/total", math.nan),
            }
        )
    return rows


def _final_kl(run: Run) -> float:
    """KL to the reference on the held-out prompts (beside the held-out reward, as in the sweep
    objective); runs logged before ``eval/kl`` existed give their last training batch's KL."""
    if "final/eval_kl" in run.summary:
        return run.summary["final/eval_kl"]
    if run.series("eval/kl")[1]:
        return _last(run, "eval/kl")
    return run.summary.get("final/kl", _last(run, "objective/kl"))


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


def reward_label(runs: list[Run]) -> str:
    """What the reward is measured in: the reward function or model the runs were scored with."""
    sources = {
        str(
            run.config.get("reward.fn._target_") or run.config.get("reward.path") or run.config.get("reward.url") or ""
        )
        for run in runs
    } - {""}
    if len(sources) == 1:
        return f"{sources.pop().rsplit('.', 1)[-1].rsplit('/', 1)[-1]}, mean per response"
    return "score, mean per response"


def pad_limits(low: float, high: float, *, min_span: float, margin: float = 0.08) -> tuple[float, float]:
    """Axis limits around [low, high] at least ``min_span`` wide, plus ``margin`` of the span each side.

    Without a minimum span matplotlib zooms on the data: rewards between 0.70 and 0.73 (3 prompts out
    of 128) would fill the whole axis and look like a large effect.
    """
    span = max(high - low, min_span)
    middle = (low + high) / 2
    return middle - span / 2 - margin * span, middle + span / 2 + margin * span


# Smallest y span drawn, so that noise does not fill the axis. Rewards of the built-in tasks are
# fractions in [0, 1] over 128 held-out prompts: at p = 0.6 one eval's standard error is
# sqrt(0.6 * 0.4 / 128) = 0.043, so 0.2 (about +-2 standard errors) keeps noise-sized gaps visibly
# small. KL in nats per response: 0.1 nats is below what changes the samples.
MIN_SPAN = {"reward": 0.2, "kl": 0.1}


def _set_ylim(ax, values: list[float], kind: str) -> None:  # noqa: ANN001 - a matplotlib Axes
    finite = [v for v in values if math.isfinite(v)]
    if finite:
        ax.set_ylim(*pad_limits(min(finite), max(finite), min_span=MIN_SPAN[kind]))


def plot(runs: list[Run], out_dir: Path, *, smooth: float = DEFAULT_SMOOTH) -> list[Path]:
    """curves.png (held-out reward, training reward and KL per step) and frontier.png (final reward vs KL).

    Per-step curves (training reward, KL) are drawn faint raw and EMA-smoothed on top (``smooth``);
    the held-out reward is already a mean over the fixed eval prompts, logged every few steps, and is
    drawn raw with markers.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ema([], smooth)  # checks smooth before anything is drawn
    out_dir.mkdir(parents=True, exist_ok=True)
    colors = [plt.get_cmap("tab10" if len(runs) <= 10 else "tab20")(i % 20) for i in range(len(runs))]
    unit = reward_label(runs)
    curves = _plot_curves(runs, out_dir / "curves.png", colors=colors, unit=unit, smooth=smooth)
    frontier = _plot_frontier(runs, out_dir / "frontier.png", colors=colors, unit=unit)
    return [curves, frontier]


def _plot_curves(runs: list[Run], path: Path, *, colors: list, unit: str, smooth: float) -> Path:
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    panels = [
        ("eval/score", "held-out reward", f"held-out reward ({unit})", "reward", False),
        ("objective/scores", "training reward", f"training reward ({unit})", "reward", True),
        ("objective/kl", "KL to reference", "KL to reference (nats per response)", "kl", True),
    ]
    handles, labels = [], []
    for ax, (key, title, ylabel, kind, smoothed) in zip(axes, panels, strict=True):
        shown: list[float] = []
        for run, color in zip(runs, colors, strict=True):
            steps, values = run.series(key)
            if not steps:
                continue
            if smoothed and smooth > 0:
                ax.plot(steps, values, color=color, alpha=0.25, linewidth=0.8)
                values = ema(values, smooth)
                line = ax.plot(steps, values, color=color, linewidth=1.6)[0]
            else:
                line = ax.plot(steps, values, color=color, marker="o" if not smoothed else None, markersize=3)[0]
            shown += run.series(key)[1]  # raw values too: the faint curves stay inside the axes
            if run.name not in labels:
                handles.append(line)
                labels.append(run.name)
        _set_ylim(ax, shown, kind)
        ax.set_title(title + (f" (EMA {smooth:g}, raw faint)" if smoothed and smooth > 0 else ""), fontsize=10)
        ax.set_xlabel("PPO step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(ylabel, fontsize=9)
        ax.grid(alpha=0.3)
    return _save(fig, handles, labels, path)


def _plot_frontier(runs: list[Run], path: Path, *, colors: list, unit: str) -> Path:
    import matplotlib.pyplot as plt

    # Points are numbered and the legend maps numbers to run names: names next to the points overlap.
    fig, ax = plt.subplots(figsize=(6.5, 5))
    handles, labels, rewards = [], [], []
    for number, (row, color) in enumerate(zip(table_rows(runs), colors, strict=True)):
        if math.isnan(row["final KL"]) or math.isnan(row["final reward"]):
            continue
        handles.append(ax.scatter(row["final KL"], row["final reward"], color=color, s=40))
        ax.annotate(str(number), (row["final KL"], row["final reward"]), xytext=(4, 4), textcoords="offset points")
        labels.append(f"{number}: {row['run']}")
        rewards.append(row["final reward"])
    _set_ylim(ax, rewards, "reward")
    ax.margins(x=0.15)
    ax.set_xlabel("final KL to reference (nats per response)")
    ax.set_ylabel(f"final held-out reward ({unit})")
    ax.set_title("reward-KL frontier (up and left is better)")
    ax.grid(alpha=0.3)
    return _save(fig, handles, labels, path)


def _save(fig, handles: list, labels: list[str], path: Path) -> Path:  # noqa: ANN001 - a matplotlib Figure
    """The figure with its legend outside the axes, as a PNG at ``path``; the figure is closed."""
    import matplotlib.pyplot as plt

    # Run names can be long: put the legend right of the axes; savefig(bbox_inches="tight") keeps it.
    if handles:
        fig.legend(handles, labels, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rlhf.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("paths", nargs="+", type=Path, help="a sweep dir, or run dirs")
    parser.add_argument("--out", type=Path, help="where the PNGs go (default: the sweep dir, or ./report)")
    parser.add_argument(
        "--smooth",
        type=float,
        default=DEFAULT_SMOOTH,
        help=f"EMA weight in [0, 1) for per-step curves, raw drawn faint behind (default {DEFAULT_SMOOTH}; 0 = off)",
    )
    args = parser.parse_args(argv)
    if not 0 <= args.smooth < 1:
        parser.error(f"--smooth {args.smooth}: must be in [0, 1) (0 = no smoothing)")
    runs, common = load_runs(args.paths)
    if common:
        print("all runs: " + " ".join(common))
    print(format_table(table_rows(runs)))
    out = args.out or (args.paths[0] if len(args.paths) == 1 and not is_run_dir(args.paths[0]) else Path("report"))
    for path in plot(runs, out, smooth=args.smooth):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
