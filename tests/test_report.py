"""``python -m rlhf.report`` on hand-made run dirs (no training): run names, smoothing, axes, the PNGs,
and metrics files a kill cut short. The report on a real sweep is tested in tests/test_sweep.py."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

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
