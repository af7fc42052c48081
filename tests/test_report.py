"""``python -m rlhf.report`` on hand-made run dirs (no training): run names, smoothing, axes, the PNGs,
and metrics files a kill cut short. The report on a real sweep is tested in tests/test_sweep.py."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from rlhf.analysis.overoptimization import describe_rm, gold_curve, setting
from rlhf.analysis.runs import Run
from rlhf.report import MIN_SPAN, ema, filter_runs, load_runs, pad_limits, short_override, table_rows
from rlhf.report import main as report_main
from rlhf.runtime.jsonl import read_rows
from tests.helpers import REPO

# What an Optuna trial writes to .hydra/overrides.yaml: 17-digit floats.
OPTUNA = [
    ["kl.beta=0.02504130762999893", "gae.lam=0.943037873274484", "ppo.epochs=4", "trainer.steps=20"],
    ["kl.beta=0.014070126180426093", "gae.lam=0.9292247147901223", "ppo.epochs=4", "trainer.steps=20"],
]


def make_run(run_dir: Path, overrides: list[str], *, final: float, status: str = "completed") -> Path:
    """A run dir as train.py leaves it: 10 steps, held-out reward every 5, and a cut-free metrics file."""
    (run_dir / ".hydra").mkdir(parents=True)
    (run_dir / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    config = {"kl": {"beta": float(overrides[0].split("=")[1])}, "reward": {"fn": {"_target_": "a.b.exact_match"}}}
    (run_dir / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))
    rows = [{"step": 0, "eval/score": 0.25}]
    for step in range(1, 11):
        row = {"step": step, "objective/scores": 0.3 + 0.02 * step, "objective/kl": 0.05 * step}
        if step % 5 == 0:
            row["eval/score"] = final if step == 10 else 0.5
        rows.append(row)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = {"final/eval_score": final, "final/kl": 0.5}
    (run_dir / "status.json").write_text(json.dumps({"status": status, "summary": summary}))
    return run_dir


@pytest.fixture
def optuna_sweep(tmp_path) -> Path:
    for job, (overrides, final) in enumerate(zip(OPTUNA, [0.70, 0.73], strict=True)):
        make_run(tmp_path / "sweep" / str(job), overrides, final=final)
    return tmp_path / "sweep"


def test_run_names_round_floats_to_4_significant_digits(optuna_sweep, capsys):
    runs, common = load_runs([optuna_sweep])
    assert [run.name for run in runs] == ["kl.beta=0.02504,gae.lam=0.943", "kl.beta=0.01407,gae.lam=0.9292"]
    assert common == ["ppo.epochs=4", "trainer.steps=20"]
    assert short_override("trainer.steps=20") == "trainer.steps=20"  # ints stay
    assert short_override("model.name=gpt2-1.5") == "model.name=gpt2-1.5"  # strings stay
    assert short_override("ppo.lr=1.23456e-05") == "ppo.lr=1.235e-05"
    assert short_override("kl.beta=1.0") == "kl.beta=1.0"  # as typed when rounding changes nothing
    assert report_main([str(optuna_sweep)]) == 0
    printed = capsys.readouterr().out
    # The run column is as wide as the longest rounded name (it was 55 characters with 17 digits).
    assert printed.splitlines()[1].startswith("run" + " " * 27 + "  status"), printed
    assert "0.02504130762999893" not in printed


def test_ema_matches_hand_computed_values():
    # a = 0.5: s0 = 1; s1 = 0.5*1 + 0.5*0 = 0.5; s2 = 0.5*0.5 + 0.5*1 = 0.75; s3 = 0.5*0.75 + 0.5*0 = 0.375
    assert ema([1.0, 0.0, 1.0, 0.0], 0.5) == pytest.approx([1.0, 0.5, 0.75, 0.375])
    # a = 0.9: s1 = 0.9*0 + 0.1*1 = 0.1; s2 = 0.9*0.1 + 0.1*1 = 0.19
    assert ema([0.0, 1.0, 1.0], 0.9) == pytest.approx([0.0, 0.1, 0.19])
    assert ema([3.0, 7.0], 0.0) == [3.0, 7.0]
    with pytest.raises(ValueError, match="smooth=1"):
        ema([1.0], 1.0)


def test_y_limits_have_a_minimum_span():
    # Rewards 0.70 and 0.73 (3 prompts of 100) must not fill the axis.
    low, high = pad_limits(0.70, 0.73, min_span=MIN_SPAN["reward"])
    assert high - low >= MIN_SPAN["reward"] and low < 0.70 and high > 0.73
    assert (low + high) / 2 == pytest.approx(0.715)
    # A wide range keeps its span plus margins on both sides.
    low, high = pad_limits(0.0, 1.0, min_span=0.2)
    assert low < 0.0 and high > 1.0


def test_cli_writes_both_pngs_with_smoothing(optuna_sweep, tmp_path):
    out = tmp_path / "report"
    result = subprocess.run(
        [sys.executable, "-m", "rlhf.report", str(optuna_sweep), "--smooth", "0.9", "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    for name in ("curves.png", "frontier.png"):
        png = (out / name).read_bytes()
        assert png.startswith(b"\x89PNG") and len(png) > 10_000
    bad = subprocess.run(
        [sys.executable, "-m", "rlhf.report", str(optuna_sweep), "--smooth", "1.5"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert bad.returncode == 2 and "--smooth 1.5: must be in [0, 1)" in bad.stderr


def test_a_metrics_file_cut_by_a_kill_is_reported(optuna_sweep, capsys):
    metrics = optuna_sweep / "1" / "metrics.jsonl"
    metrics.write_text(metrics.read_text() + '{"step": 11, "objective/sco')  # the write the kill interrupted
    (optuna_sweep / "1" / "status.json").unlink()  # a killed run leaves no status
    runs, _ = load_runs([optuna_sweep])
    assert runs[1].metrics[-1]["step"] == 10
    assert table_rows(runs)[1]["final reward"] == 0.73
    assert report_main([str(optuna_sweep)]) == 0
    assert "unknown" in capsys.readouterr().out


def test_a_damaged_middle_line_names_the_file_and_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 0}\n{"step": 1, oops\n{"step": 2}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl line 2 of 3 is not a JSON object: .*repair"):
        read_rows(path)
    path.write_text('{"step": 0}\n[1, 2]\n')
    with pytest.raises(ValueError, match=r"line 2 of 2 is not a JSON object: '\[1, 2\]'"):
        read_rows(path)


def test_filter_runs_by_config_key(optuna_sweep):
    runs, _ = load_runs([optuna_sweep])
    assert [run.path.name for run in filter_runs(runs, {"kl.beta": 0.014070126180426093})] == ["1"]
    assert filter_runs(runs, {"kl.beta": 0.5}) == []


# Held-out gold score at steps 0, 5, 10, 15, 20 of a proxy run: it peaks at step 10, then falls.
EVAL_GOLD = [0.0, 0.3, 0.5, 0.4, 0.2]


def make_gold_run(run_dir: Path, overrides: list[str], *, beta: float, seed: int, ceiling: bool = False) -> Path:
    """A reviews-task run dir: the proxy score rises with KL while the gold score peaks and falls (Gao et al.'s
    shape), held-out evaluations every 5 steps, the proxy RM's accuracy at step 0 (none for reward=gold)."""
    (run_dir / ".hydra").mkdir(parents=True)
    (run_dir / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    config = {"kl": {"beta": beta}, "seed": seed, "reward": {"proxy": {"num_pairs": 2000}}}
    (run_dir / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))
    rows = [{"step": 0, "eval/score": 0.1, "eval/gold_score": EVAL_GOLD[0], "eval/kl": 0.0}]
    if not ceiling:
        rows[0] |= {"proxy/eval_accuracy": 0.8, "proxy/gold_accuracy": 0.75, "proxy/num_pairs": 2000}
    for step in range(1, 21):
        d = 0.04 * step / (1 + 10 * beta) + 0.01 * seed  # sqrt(KL)
        gold = 2 * d - 3 * d * d  # peaks at sqrt(KL) = 1/3
        row = {"step": step, "objective/kl": d * d - 0.01, "objective/gold_scores": gold}
        row["objective/scores"] = gold if ceiling else 1.0 + 2 * d
        if step % 5 == 0:
            eval_gold = EVAL_GOLD[step // 5] + (0.3 if ceiling else 0.0)
            row |= {
                "eval/score": eval_gold if ceiling else 1.0 + 2 * d,
                "eval/gold_score": eval_gold,
                "eval/kl": d * d,
            }
        rows.append(row)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (run_dir / "status.json").write_text(json.dumps({"status": "completed", "summary": {}}))
    return run_dir


@pytest.fixture
def gold_sweep(tmp_path) -> Path:
    """kl.beta 0 and 0.1 x seeds 1 and 2 against the proxy, and one reward=gold run (the ceiling)."""
    sweep = tmp_path / "gold_sweep"
    jobs = [(beta, seed, "proxy") for beta in (0.0, 0.1) for seed in (1, 2)] + [(0.0, 1, "gold")]
    for job, (beta, seed, reward) in enumerate(jobs):
        overrides = [f"reward={reward}", f"kl.beta={beta}", f"seed={seed}", "trainer.steps=20"]
        make_gold_run(sweep / str(job), overrides, beta=beta, seed=seed, ceiling=reward == "gold")
    return sweep


def test_gold_columns_hold_the_held_out_gold_figures(gold_sweep, capsys):
    runs, _ = load_runs([gold_sweep])
    rows = {row["run"]: row for row in table_rows(runs)}
    # Held-out gold at steps 0, 5, 10, 15, 20 = 0.0, 0.3, 0.5, 0.4, 0.2: final 0.2 (step 20), peak 0.5 (step 10);
    # the proxy RM's accuracy on its own labels is step 0's proxy/eval_accuracy.
    proxy = rows["reward=proxy,kl.beta=0.0,seed=1"]
    assert (proxy["final gold"], proxy["peak gold"], proxy["proxy acc"]) == (0.2, 0.5, 0.8)
    # The ceiling's evaluations are 0.3 higher (0.3 ... 0.5): final 0.5, peak 0.8; it has no proxy RM.
    ceiling = rows["reward=gold,kl.beta=0.0,seed=1"]
    assert (ceiling["final gold"], ceiling["peak gold"]) == (0.5, 0.8) and math.isnan(ceiling["proxy acc"])
    assert report_main([str(gold_sweep)]) == 0
    header, _, first = capsys.readouterr().out.splitlines()[1:4]
    # Column names are at least as wide as their values, so the header reads as typed.
    assert "final KL  final gold  peak gold  proxy acc  clipfrac" in header, header
    assert first.split()[5:8] == ["0.200", "0.500", "0.800"], first
    assert (gold_sweep / "overoptimization.png").read_bytes().startswith(b"\x89PNG")


def test_runs_without_gold_keys_report_as_before(optuna_sweep, gold_sweep, capsys, tmp_path):
    assert report_main([str(optuna_sweep)]) == 0
    header = capsys.readouterr().out.splitlines()[1]
    assert "final KL  clipfrac" in header and "gold" not in header, header
    assert "final gold" not in table_rows(load_runs([optuna_sweep])[0])[0]
    assert sorted(p.name for p in optuna_sweep.glob("*.png")) == ["curves.png", "frontier.png"]
    # An arithmetic run beside gold runs: nan in the gold columns, and left out of the gold figure.
    runs, _ = load_runs([optuna_sweep / "0", gold_sweep / "0"])
    arithmetic = table_rows(runs)[0]
    assert arithmetic["final reward"] == 0.70 and math.isnan(arithmetic["final gold"])
    assert report_main([str(optuna_sweep / "0"), str(gold_sweep / "0"), "--out", str(tmp_path / "mixed")]) == 0
    assert (tmp_path / "mixed" / "overoptimization.png").exists()


def test_gold_curve_is_centered_at_the_first_step_against_sqrt_kl():
    rows = [
        {"step": 1, "objective/kl": -0.01, "objective/scores": 1.0, "objective/gold_scores": 0.5},
        {"step": 2, "objective/kl": 0.04, "objective/scores": 1.5, "objective/gold_scores": 0.7},
        {"step": 3, "objective/scores": 1.7},  # no KL or gold logged: not a point of the curve
        {"step": 4, "objective/kl": 0.09, "objective/scores": 2.0, "objective/gold_scores": 0.6},
    ]
    run = Run(path=Path("x"), name="kl.beta=0.0,seed=3", status="completed", metrics=rows)
    # Raw: sqrt(max(KL, 0)) = 0, 0.2, 0.3; proxy - 1.0 = 0, 0.5, 1.0; gold - 0.5 = 0, 0.2, 0.1.
    raw = gold_curve(run, smooth=0.0)
    assert raw.steps == [1, 2, 4]
    assert raw.sqrt_kl == pytest.approx([0.0, 0.2, 0.3])
    assert raw.proxy == pytest.approx([0.0, 0.5, 1.0]) and raw.gold == pytest.approx([0.0, 0.2, 0.1])
    # EMA 0.5: x = 0, 0.1, 0.5*0.1 + 0.5*0.3 = 0.2; proxy = 0, 0.25, 0.625; gold = 0, 0.1, 0.1.
    smoothed = gold_curve(run, smooth=0.5)
    assert smoothed.sqrt_kl == pytest.approx([0.0, 0.1, 0.2])
    assert smoothed.proxy == pytest.approx([0.0, 0.25, 0.625]) and smoothed.gold == pytest.approx([0.0, 0.1, 0.1])
    # Seeds of one setting share a colour and a legend entry.
    assert setting(run) == "kl.beta=0.0"
    assert setting(Run(path=Path("x"), name="seed=3,kl.beta=0.1", status="completed")) == "kl.beta=0.1"
    assert setting(Run(path=Path("x"), name="seed=3", status="completed")) == "all runs"


def test_cli_writes_the_overoptimization_png_for_a_gold_sweep(gold_sweep, optuna_sweep):
    for sweep, expected in [(gold_sweep, True), (optuna_sweep, False)]:
        result = subprocess.run(
            [sys.executable, "-m", "rlhf.report", str(sweep)], cwd=REPO, capture_output=True, text=True, timeout=120
        )
        assert result.returncode == 0, result.stderr[-3000:]
        assert ("final gold" in result.stdout) is expected
        assert (sweep / "overoptimization.png").exists() is expected
        assert (f"wrote {sweep / 'overoptimization.png'}" in result.stdout) is expected
    png = (gold_sweep / "overoptimization.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 20_000


@pytest.mark.parametrize("gold", [True, False])
def test_notebook_draws_the_overoptimization_figure_for_gold_runs_only(gold, gold_sweep, optuna_sweep, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    notebook = nbformat.read(REPO / "notebooks" / "compare_runs.ipynb", as_version=4)
    monkeypatch.setenv("RLHF_RUNS", str(gold_sweep if gold else optuna_sweep))
    client = nbclient.NotebookClient(
        notebook, timeout=180, kernel_name="python3", resources={"metadata": {"path": str(REPO / "notebooks")}}
    )
    client.execute()
    (cell,) = [cell for cell in notebook.cells if "overoptimization_figure(gold_runs" in cell.source]
    kinds = [kind for output in cell.outputs for kind in output.get("data", {})]
    text = "".join(output.get("text", "") for output in cell.outputs)
    if gold:
        assert "image/png" in kinds and "final gold" in cell.outputs[0]["data"]["text/html"], kinds
    else:
        assert "image/png" not in kinds and text.startswith("No run logged objective/gold_scores"), text


def test_the_proxy_rm_accuracy_is_named_or_averaged():
    one = describe_rm([(2000, 0.8, 0.75), (2000, 0.8, 0.75)])  # two seeds sharing one cached RM
    assert one == "proxy RM: 2000 pairs, held-out accuracy 0.800 on its noisy labels, 0.750 vs gold"
    # An RM per seed: (0.8 + 0.7) / 2 = 0.75 on their labels, (0.75 + 0.65) / 2 = 0.7 vs gold.
    assert describe_rm([(500, 0.8, 0.75), (500, 0.7, 0.65)], short=True) == "RM acc 0.750, 0.700 vs gold, mean of 2"
