"""``overoptimization.png``: reward-model over-optimisation as in Gao, Schulman & Hilton (2022), "Scaling
Laws for Reward Model Overoptimization", drawn from runs that log a gold score beside the proxy's.

Left: per run, the proxy score it trained on (dashed) and the gold score of the same rollouts (solid)
against sqrt(KL to the reference), per PPO step. Both are centered at the initial policy (minus the first
logged rollout's value), as Gao et al. do: the proxy's offset is arbitrary (a Bradley-Terry model learns
score differences only); its differences estimate the gold's once scaled by the label-noise temperature,
which the proxy's build does (``rlhf.app.proxy.rescale``), so one axis shows where the two part. Runs that
differ only by ``seed`` share a colour: thin lines per seed, a thick line for their per-step mean. Right:
the held-out gold score at the last evaluation against the held-out KL (filled), and at the best
evaluation (hollow); the ``reward=gold`` run (no ``proxy/*`` keys) is the ceiling (star).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

from rlhf.analysis.plots import DEFAULT_SMOOTH, ema, save_figure
from rlhf.analysis.runs import GOLD_KEY, Run

# A rollout's mean proxy score, mean gold score and KL (nats per response) at each PPO step.
CURVE_KEYS = ("objective/scores", GOLD_KEY, "objective/kl")
_SEED = re.compile(r"(^|,)seed=-?\d+(?=,|$)")


@dataclass(frozen=True)
class GoldCurve:
    """One run's Gao et al. curve: per PPO step that logged all of CURVE_KEYS, EMA-smoothed."""

    steps: list[int]
    sqrt_kl: list[float]  # sqrt(max(objective/kl, 0)): KL may be slightly negative at the start (estimator noise)
    proxy: list[float]  # objective/scores minus its first logged value (the initial policy's rollout)
    gold: list[float]  # objective/gold_scores minus its first logged value


def gold_curve(run: Run, *, smooth: float = DEFAULT_SMOOTH) -> GoldCurve:
    """The run's proxy and gold scores, centered at the initial policy, against sqrt(KL); ``smooth`` as ``ema``."""
    rows = [row for row in run.metrics if all(key in row for key in CURVE_KEYS)]
    if not rows:
        return GoldCurve([], [], [], [])
    proxy0, gold0 = rows[0]["objective/scores"], rows[0][GOLD_KEY]
    return GoldCurve(
        steps=[row["step"] for row in rows],
        sqrt_kl=ema([math.sqrt(max(row["objective/kl"], 0.0)) for row in rows], smooth),
        proxy=ema([row["objective/scores"] - proxy0 for row in rows], smooth),
        gold=ema([row[GOLD_KEY] - gold0 for row in rows], smooth),
    )


def mean_curve(curves: list[GoldCurve]) -> GoldCurve:
    """The per-step mean of several runs' curves (seeds of one setting), over the runs that logged each step."""
    by_step: dict[int, list[tuple[float, float, float]]] = {}
    for curve in curves:
        for point in zip(curve.steps, curve.sqrt_kl, curve.proxy, curve.gold, strict=True):
            by_step.setdefault(point[0], []).append(point[1:])
    steps = sorted(by_step)
    means = [[sum(values) / len(values) for values in zip(*by_step[step], strict=True)] for step in steps]
    return GoldCurve(steps, [m[0] for m in means], [m[1] for m in means], [m[2] for m in means])


def setting(run: Run) -> str:
    """The run's name without its ``seed=`` override: the runs of one setting (a kl.beta, an N) share it."""
    return _SEED.sub("", run.name).strip(",") or "all runs"


def is_ceiling(run: Run) -> bool:
    """A run trained on the gold reward itself (``reward=gold``): gold keys and no proxy reward model."""
    return any(GOLD_KEY in row for row in run.metrics) and not run.series("proxy/eval_accuracy")[1]


def rm_accuracy(run: Run) -> tuple[float, float, float] | None:
    """(``proxy/num_pairs``, ``proxy/eval_accuracy``, ``proxy/gold_accuracy``) from the run's step 0, if any."""
    row = next((row for row in run.metrics if "proxy/eval_accuracy" in row), None)
    if row is None:
        return None
    return (row.get("proxy/num_pairs", math.nan), row["proxy/eval_accuracy"], row.get("proxy/gold_accuracy", math.nan))


def describe_rm(accuracies: list[tuple[float, float, float]], *, short: bool = False) -> str:
    """The proxy reward models' ``rm_accuracy`` in words (``short`` for a legend entry); several different
    ones (a model per seed) averaged."""
    pairs, on_labels, on_gold = (sum(values) / len(values) for values in zip(*accuracies, strict=True))
    several = f", mean of {len(set(accuracies))}" if len(set(accuracies)) > 1 else ""
    if short:
        return f"RM acc {on_labels:.3f}, {on_gold:.3f} vs gold{several}"
    count = f"{pairs:.0f} pairs, " if math.isfinite(pairs) else ""
    return f"proxy RM{several}: {count}held-out accuracy {on_labels:.3f} on its noisy labels, {on_gold:.3f} vs gold"


def final_and_peak(run: Run) -> tuple[tuple[float, float], tuple[float, float]] | None:
    """((KL, gold) at the last held-out evaluation, (KL, gold) at the best), or None without evaluations."""
    rows = [row for row in run.metrics if "eval/gold_score" in row and "eval/kl" in row]
    if not rows:
        return None
    peak = max(rows, key=lambda row: row["eval/gold_score"])
    return (rows[-1]["eval/kl"], rows[-1]["eval/gold_score"]), (peak["eval/kl"], peak["eval/gold_score"])


def overoptimization_figure(runs: list[Run], *, smooth: float = DEFAULT_SMOOTH):  # noqa: ANN201 - a Figure
    """The two panels (module docstring) with one legend entry per setting; the caller saves or shows it."""
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    ema([], smooth)  # checks smooth before anything is drawn
    runs = [run for run in runs if any(GOLD_KEY in row for row in run.metrics)]
    settings = list(dict.fromkeys(setting(run) for run in runs))
    colors = {
        name: plt.get_cmap("tab10" if len(settings) <= 10 else "tab20")(i % 20) for i, name in enumerate(settings)
    }
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5))
    # One proxy RM for all runs: its accuracy in the title; several (a sweep over N): in each setting's label.
    shared = len({rm_accuracy(run) for run in runs if not is_ceiling(run)}) <= 1
    labels = []
    for name in settings:
        group = [run for run in runs if setting(run) == name]
        _draw_curves(left, group, color=colors[name], smooth=smooth)
        _draw_frontier(right, group, color=colors[name])
        labels.append(_label(name, group, with_rm=not shared))
    handles = [Line2D([], [], color=colors[name], linewidth=2) for name in settings]
    handles += [Line2D([], [], color="black", linestyle="--"), Line2D([], [], color="black")]
    labels += ["proxy score (left)", "gold score (left)"]
    # The initial policy's held-out gold score (step 0's evaluation, the same policy in every run).
    initial = [row["eval/gold_score"] for run in runs for row in run.metrics[:1] if "eval/gold_score" in row]
    if initial:
        handles.append(right.axhline(sum(initial) / len(initial), color="grey", linestyle=":", linewidth=1.2))
        labels.append("initial policy (right)")
    _style_axes(left, right, smooth=smooth)
    accuracies = [acc for run in runs if (acc := rm_accuracy(run))]
    title = f"Reward-model over-optimisation{f' ({describe_rm(accuracies)})' if shared and accuracies else ''}"
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()  # before the legend, which goes right of the axes (as save_figure places it)
    fig.legend(handles, labels, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8, frameon=False)
    return fig


def _label(name: str, group: list[Run], *, with_rm: bool) -> str:
    """A setting's legend entry: its overrides, the ceiling's mark, and its proxy RM's accuracy if asked."""
    if all(map(is_ceiling, group)):
        return f"{name} (ceiling: trained on the gold)"
    accuracies = [acc for run in group if (acc := rm_accuracy(run))]
    return f"{name} ({describe_rm(accuracies, short=True)})" if with_rm and accuracies else name


def _draw_curves(ax, group: list[Run], *, color: tuple, smooth: float) -> None:  # noqa: ANN001 - an Axes
    curves = [curve for run in group if (curve := gold_curve(run, smooth=smooth)).steps]
    ceiling = all(map(is_ceiling, group))  # trained on the gold: its proxy curve is the gold curve
    if not curves:
        return
    # Several seeds: each thin and faint, their mean on top; one run: its own curve.
    styles = [(curves[0], 1.8, 1.0)]
    if len(curves) > 1:
        styles = [*((curve, 0.8, 0.35) for curve in curves), (mean_curve(curves), 1.8, 1.0)]
    for curve, width, alpha in styles:
        ax.plot(curve.sqrt_kl, curve.gold, color=color, linewidth=width, alpha=alpha)
        if not ceiling:
            ax.plot(curve.sqrt_kl, curve.proxy, color=color, linewidth=width, alpha=alpha, linestyle="--")


def _draw_frontier(ax, group: list[Run], *, color: tuple) -> None:  # noqa: ANN001 - an Axes
    marker = "*" if all(map(is_ceiling, group)) else "o"
    for run in group:
        if (points := final_and_peak(run)) is None:
            continue
        (kl, gold), (peak_kl, peak_gold) = points
        if (peak_kl, peak_gold) != (kl, gold):
            ax.plot([peak_kl, kl], [peak_gold, gold], color=color, linewidth=0.8, alpha=0.6)
            ax.scatter(peak_kl, peak_gold, facecolors="none", edgecolors=[color], marker=marker, s=60)
        ax.scatter(kl, gold, color=color, marker=marker, s=120 if marker == "*" else 45, zorder=3)


def _style_axes(left, right, *, smooth: float) -> None:  # noqa: ANN001 - two Axes
    left.axhline(0.0, color="grey", linewidth=0.8)
    left.set_title(f"proxy (dashed) and gold (solid) per step{f', EMA {smooth:g}' if smooth > 0 else ''}", fontsize=10)
    left.set_xlabel("√KL to reference (√nats per response)")
    left.set_ylabel("score − initial policy's score (gold units; the proxy is scaled to them)", fontsize=9)
    right.set_title("held-out gold vs KL: last evaluation (filled), best (hollow)", fontsize=10)
    right.set_xlabel("held-out KL to reference (nats per response)")
    right.set_ylabel("held-out gold score (gold units)")
    right.margins(x=0.12, y=0.12)
    for ax in (left, right):
        ax.grid(alpha=0.3)


def plot_overoptimization(runs: list[Run], path: Path, *, smooth: float = DEFAULT_SMOOTH) -> Path:
    """Write ``overoptimization.png`` (the module docstring's two panels) at ``path``."""
    fig = overoptimization_figure(runs, smooth=smooth)
    return save_figure(fig, [], [], path)
