"""Compare runs: a table of final figures and PNG plots of reward and KL.

    python -m rlhf.report multirun/<date>/<time>            # every job of a sweep
    python -m rlhf.report outputs/<date>/<a> outputs/<date>/<b> --out report/
    python -m rlhf.report multirun/<date>/<time> --smooth 0.9    # heavier smoothing of per-step curves

Each run dir is read as the run left it: ``metrics.jsonl`` (one object per step), ``status.json``
(completed with its summary, or failed with the error) and ``.hydra/overrides.yaml``. Runs that log a
gold score beside the proxy's (the reviews task) add gold columns and ``overoptimization.png``. The
reading and drawing live in rlhf/analysis; this module is the command line.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from rlhf.analysis.overoptimization import gold_curve, overoptimization_figure, plot_overoptimization
from rlhf.analysis.plots import DEFAULT_SMOOTH, MIN_SPAN, ema, pad_limits, plot, reward_label
from rlhf.analysis.runs import (
    NAME_DIGITS,
    Run,
    filter_runs,
    find_runs,
    flatten,
    has_gold,
    is_run_dir,
    load_run,
    load_runs,
    name_by_differences,
    short_override,
)
from rlhf.analysis.table import COLUMNS, GOLD_COLUMNS, format_table, table_rows

# What the report offered before rlhf/analysis existed, and the gold figure: tests/, notebooks/compare_runs.ipynb
# and users import these from here.
__all__ = [
    "COLUMNS",
    "DEFAULT_SMOOTH",
    "ema",
    "filter_runs",
    "find_runs",
    "flatten",
    "format_table",
    "GOLD_COLUMNS",
    "gold_curve",
    "has_gold",
    "is_run_dir",
    "load_run",
    "load_runs",
    "main",
    "MIN_SPAN",
    "name_by_differences",
    "NAME_DIGITS",
    "overoptimization_figure",
    "pad_limits",
    "plot",
    "plot_overoptimization",
    "reward_label",
    "Run",
    "short_override",
    "table_rows",
]


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
    written = plot(runs, out, smooth=args.smooth)
    if has_gold(runs):
        written.append(plot_overoptimization(runs, out / "overoptimization.png", smooth=args.smooth))
    for path in written:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
