"""Checkpoints and exact resume: 10 steps straight equal 5 steps plus a new process resuming for 5."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from rlhf.checkpoint import MANIFEST, complete_checkpoints, save_checkpoint
from tests.conftest import REPO

COMMON = [
    "rollout.batch_size=8", "ppo.minibatch_size=4", "kl=adaptive", "kl.target=0.5", "kl.horizon=100",
    "optimizer.scheduler.end_factor=1.0", "trainer.eval_every=3", "trainer.save_every=0",
    "logging.progress_bar=false", "logging.wandb.mode=offline",
]  # fmt: skip


def cli(run_dir: Path, *overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "train.py", *COMMON, *overrides, f"hydra.run.dir={run_dir}"],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )  # fmt: skip


def metrics(run_dir: Path) -> dict[int, dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {row["step"]: {k: v for k, v in row.items() if not k.startswith("time/")} for row in rows}


@pytest.mark.slow
def test_resume_is_exact(tmp_path, tiny_cache):
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert cli(straight, "trainer.steps=10").returncode == 0
    first = cli(split, "trainer.steps=5")
    assert first.returncode == 0, first.stderr[-2000:]
    second = cli(split, "trainer.steps=10", "trainer.resume=true")
    assert second.returncode == 0, second.stderr[-2000:]
    a, b = metrics(straight), metrics(split)
    assert sorted(b) == list(range(11)), "no duplicated or missing steps"
    for step in range(6, 11):
        assert a[step] == b[step], step
    assert a[10]["objective/kl_coef"] != a[1]["objective/kl_coef"]  # the adaptive controller moved
    weights_a, weights_b = (
        load_file(straight / "model" / "model.safetensors"),
        load_file(split / "model" / "model.safetensors"),
    )
    assert weights_a.keys() == weights_b.keys()
    assert all((weights_a[k] == weights_b[k]).all() for k in weights_a)
    # Both processes logged to one W&B run.
    runs = {p.name.rsplit("-", 1)[-1] for p in (split / "wandb").glob("offline-run-*")}
    assert len(runs) == 1


def test_resume_errors(tmp_path, tiny_cache):
    run_dir = tmp_path / "run"
    missing = cli(run_dir, "trainer.steps=1", "trainer.resume=true")
    assert missing.returncode != 0 and f"no complete checkpoint in {run_dir / 'checkpoints'}" in missing.stderr
    assert cli(run_dir, "trainer.steps=2").returncode == 0
    changed = cli(run_dir, "trainer.steps=3", "kl.target=0.7", "gae.lam=0.9")
    assert changed.returncode != 0
    assert "changed config: gae.lam: 0.95 -> 0.9; kl.target: 0.5 -> 0.7" in changed.stderr


def test_checkpoints_are_atomic_and_rotated(tmp_path):
    import torch

    root = tmp_path / "checkpoints"
    model = torch.nn.Linear(2, 2)
    for step in (1, 2, 3):
        save_checkpoint(root, step, {"m": model}, {"step": step}, "a: 1\n", keep_last=2)
    assert [p.name for p in complete_checkpoints(root)] == ["step-00000002", "step-00000003"]
    # A save that died before its manifest was written is not a checkpoint, and the last complete one stays.
    broken = root / ".staging-step-00000004"
    broken.mkdir()
    (broken / "m.safetensors").write_bytes(b"partial")
    assert complete_checkpoints(root)[-1].name == "step-00000003"
    assert (complete_checkpoints(root)[-1] / MANIFEST).exists()
    manifest = json.loads((root / "step-00000003" / MANIFEST).read_text())
    assert (
        manifest["step"] == 3 and manifest["versions"]["torch"] and set(manifest["files"]) == {"m", "state", "config"}
    )
