"""The report's table: one row of final figures per run, and its plain-text form."""

from __future__ import annotations

import math

from rlhf.analysis.runs import Run, has_gold

COLUMNS = ["run", "status", "final reward", "best reward", "final KL", "clipfrac", "value loss", "seconds"]
# Printed after "final KL" when some run logged a gold score (the reviews task): the held-out gold score
# at the last evaluation and its best evaluation (a peak above the final one is over-optimisation), and the
# proxy reward model's held-out pair accuracy on its own (noisy) labels. Runs without them show nan.
GOLD_COLUMNS = ["final gold", "peak gold", "proxy acc"]


def table_rows(runs: list[Run]) -> list[dict[str, object]]:
    """One row per run; figures of unfinished runs come from whatever steps they logged. The GOLD_COLUMNS
    are there only when some run logged ``objective/gold_scores``."""
    rows = []
    gold = has_gold(runs)
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
        if gold:
            rows[-1].update(gold_figures(run))
    return rows


def gold_figures(run: Run) -> dict[str, float]:
    """The GOLD_COLUMNS of one run: its held-out gold score at the last and at the best evaluation (step 0,
    the initial policy, included), and ``proxy/eval_accuracy`` (logged at step 0; none for reward=gold)."""
    evals = run.series("eval/gold_score")[1]
    accuracy = run.series("proxy/eval_accuracy")[1]
    return {
        "final gold": evals[-1] if evals else math.nan,
        "peak gold": max(evals) if evals else math.nan,
        "proxy acc": accuracy[0] if accuracy else math.nan,
    }


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
    """A plain-text table, numbers with 3 decimals; the GOLD_COLUMNS after "final KL" when the rows have them."""
    columns = COLUMNS
    if rows and GOLD_COLUMNS[0] in rows[0]:
        after = COLUMNS.index("final KL") + 1
        columns = [*COLUMNS[:after], *GOLD_COLUMNS, *COLUMNS[after:]]
    cells = [[f"{row[c]:.3f}" if isinstance(row[c], float) else str(row[c]) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)) for r in cells]
    return "\n".join(lines)
