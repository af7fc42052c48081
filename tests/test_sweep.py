"""Hydra multirun sweeps: job dirs, one W&B group, failures that do not stop a sweep, the report,
the joblib launcher and Optuna sweeper plugins, and the comparison notebook."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from rlhf.report import load_runs, table_rows
from rlhf.report import main as report_main
from tests.helpers import REPO, wandb_inspect

TINY = ["trainer.steps=2", "rollout.batch_size=8", "ppo.minibatch_size=4", "logging.progress_bar=false"]


def sweep(sweep_dir: Path, *overrides: str, expect: int = 0) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, "train.py", "-m", *overrides, f"hydra.sweep.dir={sweep_dir}"],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == expect, result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def grid_sweep(tmp_path_factory, tiny_cache) -> Path:
    """A 2 x 2 sweep over kl.beta and gae.lam on the default task, W&B offline."""
    sweep_dir = tmp_path_factory.mktemp("grid")
    sweep(sweep_dir, "kl.beta=0.01,0.1", "gae.lam=0.9,0.95", *TINY, "logging.wandb.mode=offline")
    return sweep_dir


def test_grid_sweep_makes_four_jobs_in_one_wandb_group(grid_sweep):
    jobs = sorted(p for p in grid_sweep.iterdir() if p.is_dir())
    assert [p.name for p in jobs] == ["0", "1", "2", "3"]
    groups, seen = set(), set()
    for job in jobs:
        assert json.loads((job / "status.json").read_text())["status"] == "completed"
        assert len((job / "metrics.jsonl").read_text().splitlines()) == 3  # steps 0, 1, 2
        info = wandb_inspect(job, "--summary")[0]
        run = next(r for r in wandb_inspect(job) if r.get("type") == "run")["run"]
        groups.add(run["run_group"])
        beta, lam = info["config"]["kl"]["beta"], info["config"]["gae"]["lam"]
        # The run is named by the job's overrides and its config holds exactly those values.
        assert run["display_name"].startswith(f"kl.beta={beta},gae.lam={lam}")
        assert info["summary"]["final/eval_score"] == pytest.approx(
            json.loads((job / "status.json").read_text())["summary"]["final/eval_score"]
        )
        seen.add((beta, lam))
    assert groups == {f"{grid_sweep.parent.name}_{grid_sweep.name}"}
    assert seen == {(0.01, 0.9), (0.01, 0.95), (0.1, 0.9), (0.1, 0.95)}


def test_report_has_a_row_per_job_and_writes_plots(grid_sweep, capsys):
    runs, common = load_runs([grid_sweep])
    rows = table_rows(runs)
    assert len(rows) == 4 and {row["status"] for row in rows} == {"completed"}
    assert {row["run"] for row in rows} == {
        "kl.beta=0.01,gae.lam=0.9", "kl.beta=0.01,gae.lam=0.95", "kl.beta=0.1,gae.lam=0.9", "kl.beta=0.1,gae.lam=0.95",
    }  # fmt: skip
    assert "trainer.steps=2" in common
    assert report_main([str(grid_sweep)]) == 0
    printed = capsys.readouterr().out
    assert printed.count("completed") == 4
    assert (grid_sweep / "curves.png").stat().st_size > 10_000
    assert (grid_sweep / "frontier.png").stat().st_size > 10_000


def test_report_reads_single_run_dirs(grid_sweep, tmp_path):
    runs, _ = load_runs([grid_sweep / "0", grid_sweep / "3"])
    assert [run.name for run in runs] == ["kl.beta=0.01,gae.lam=0.9", "kl.beta=0.1,gae.lam=0.95"]
    assert report_main([str(grid_sweep / "0"), str(grid_sweep / "3"), "--out", str(tmp_path)]) == 0
    assert (tmp_path / "curves.png").exists()


@pytest.mark.slow  # not slow: test_cli_status's sweep with a failed job [basic]
def test_a_failing_job_does_not_stop_the_sweep(tmp_path, tiny_cache):
    sweep_dir = tmp_path / "sweep"
    fns = "tests.sweep_helpers.nan_reward,rlhf.tasks.arithmetic.exact_match_reward"
    sweep(sweep_dir, f"reward.fn._target_={fns}", "--allow-target", "tests.sweep_helpers", *TINY,
          "logging.wandb.mode=offline", expect=1)  # fmt: skip
    failed, completed = sweep_dir / "0", sweep_dir / "1"
    status = json.loads((failed / "status.json").read_text())
    assert status["status"] == "failed" and "not finite" in status["error"]
    assert "ValueError" in (failed / "traceback.txt").read_text()
    assert wandb_inspect(failed, "--summary")[0]["state"] == "failed"
    assert json.loads((completed / "status.json").read_text())["status"] == "completed"
    rows = table_rows(load_runs([sweep_dir])[0])
    assert rows[0]["status"].startswith("failed: ValueError") and rows[1]["status"] == "completed"


@pytest.mark.slow  # a joblib sweep of real runs; sweeps not slow: the grid and optuna tests
def test_joblib_launcher_runs_jobs_in_parallel_processes(tmp_path, tiny_cache):
    sweep_dir = tmp_path / "sweep"
    sweep(sweep_dir, "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "kl.beta=0.01,0.1", *TINY,
          "logging.wandb.mode=disabled")  # fmt: skip
    for job in ("0", "1"):
        assert json.loads((sweep_dir / job / "status.json").read_text())["status"] == "completed"


@pytest.mark.slow  # an optuna sweep; not slow multiruns: the grid sweep and test_cli_status's failed job
def test_optuna_sweeper_maximises_what_train_returns(tmp_path, tiny_cache):
    sweep_dir = tmp_path / "sweep"
    result = sweep(sweep_dir, "sweep=optuna", "hydra.sweeper.n_trials=2", *TINY, "logging.wandb.mode=disabled")
    objectives = [json.loads((sweep_dir / j / "status.json").read_text())["summary"]["objective"] for j in "01"]
    # The sweep config weighs KL at 0.05: objective = final held-out reward - 0.05 * final held-out KL.
    for job, objective in zip("01", objectives, strict=True):
        summary = json.loads((sweep_dir / job / "status.json").read_text())["summary"]
        assert objective == pytest.approx(summary["final/eval_score"] - 0.05 * summary["final/eval_kl"])
    assert f"Best value: {max(objectives)}" in result.stdout + result.stderr


def test_notebook_executes_against_a_sweep(grid_sweep):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    notebook = nbformat.read(REPO / "notebooks" / "compare_runs.ipynb", as_version=4)
    assert all(not cell.get("outputs") for cell in notebook.cells if cell.cell_type == "code"), "strip outputs"
    # The filter cell, as a user would edit it: keep the two kl.beta=0.01 jobs.
    (filter_cell,) = [cell for cell in notebook.cells if cell.source.startswith("FILTER = {}")]
    filter_cell.source = filter_cell.source.replace("FILTER = {}", 'FILTER = {"kl.beta": 0.01}', 1)
    os.environ["RLHF_RUNS"] = str(grid_sweep)
    try:
        nbclient.NotebookClient(
            notebook, timeout=180, kernel_name="python3", resources={"metadata": {"path": str(REPO / "notebooks")}}
        ).execute()
    finally:
        del os.environ["RLHF_RUNS"]
    first = "".join(o.get("text", "") for o in notebook.cells[1].outputs)
    assert first.startswith("4 runs from")
    table_html = notebook.cells[3].outputs[0]["data"]["text/html"]
    assert table_html.count("completed") == 4
    filtered = "".join(o.get("text", "") for o in filter_cell.outputs)
    assert filtered.startswith("2 of 4 runs match {'kl.beta': 0.01}; swept keys: ['gae.lam', 'kl.beta']"), filtered


@pytest.mark.slow
def test_larger_beta_keeps_the_policy_closer(tmp_path, tiny_cache):
    sweep_dir = tmp_path / "sweep"
    sweep(
        sweep_dir, "kl.beta=0.0,1.0", "trainer.steps=60", "logging.progress_bar=false", "logging.wandb.mode=disabled"
    )
    runs, _ = load_runs([sweep_dir])
    late_kl = {run.name: sum(run.series("objective/kl")[1][-20:]) / 20 for run in runs}
    assert late_kl["kl.beta=1.0"] < 0.5 * late_kl["kl.beta=0.0"], late_kl
