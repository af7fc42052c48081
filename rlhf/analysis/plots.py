"""The report's PNGs: ``curves.png`` (held-out reward, training reward and KL per step) and
``frontier.png`` (final reward against final KL), and the axis helpers the other figures share."""

from __future__ import annotations

import math
from pathlib import Path

from rlhf.analysis.runs import Run
from rlhf.analysis.table import table_rows

# Mild by default: per-step training reward and KL of a small batch are noisy, but a heavy default
# would hide what a short run did. 0 = raw curves only.
DEFAULT_SMOOTH = 0.6


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


def set_ylim(ax, values: list[float], kind: str) -> None:  # noqa: ANN001 - a matplotlib Axes
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
        set_ylim(ax, shown, kind)
        ax.set_title(title + (f" (EMA {smooth:g}, raw faint)" if smoothed and smooth > 0 else ""), fontsize=10)
        ax.set_xlabel("PPO step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(ylabel, fontsize=9)
        ax.grid(alpha=0.3)
    return save_figure(fig, handles, labels, path)


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
    set_ylim(ax, rewards, "reward")
    ax.margins(x=0.15)
    ax.set_xlabel("final KL to reference (nats per response)")
    ax.set_ylabel(f"final held-out reward ({unit})")
    ax.set_title("reward-KL frontier (up and left is better)")
    ax.grid(alpha=0.3)
    return save_figure(fig, handles, labels, path)


def save_figure(fig, handles: list, labels: list[str], path: Path) -> Path:  # noqa: ANN001 - a matplotlib Figure
    """The figure with its legend outside the axes, as a PNG at ``path``; the figure is closed."""
    import matplotlib.pyplot as plt

    # Run names can be long: put the legend right of the axes; savefig(bbox_inches="tight") keeps it.
    if handles:
        fig.legend(handles, labels, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path
