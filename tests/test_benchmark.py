"""The benchmark script runs both systems on its workload and prints the figures it promises (a smoke
test: its numbers are measured by running it, never asserted here)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.helpers import REPO


@pytest.mark.slow
def test_ppo_vs_trl_benchmark_runs_both_systems():
    out = subprocess.run(
        [sys.executable, "benchmarks/ppo_vs_trl.py", "--repeats", "1", "--iterations", "1"],
        cwd=REPO, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    lines = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    by_system = {line.get("system"): line for line in lines}
    assert set(by_system) == {"rlhf", "trl", None}
    for system in ("rlhf", "trl"):
        figures = by_system[system]
        assert figures["iterations"] == 1 and figures["workload"] == "tiny" and figures["prompts_per_step"] == 64
        assert all(figures["phases_s"][phase] > 0 for phase in ("generation", "experience", "update"))
        assert figures["generated_tokens_per_s"] > 0 and figures["peak_rss_mb"] > 0
        assert 0 < figures["gflops_per_s"] < figures["matmul_peak_gflops_per_s"] * 2
    assert by_system[None]["speedup_rlhf_over_trl"] > 0
