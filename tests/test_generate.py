"""``python -m rlhf.generate``: samples from a real 2-step run's model/ or checkpoint and scores with its reward."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import FAST, REPO


def generate(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "rlhf.generate", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )


def rows(out: str) -> list[list[str]]:
    lines = out.splitlines()
    assert lines[0] == "prompt\tresponse\tscore", out
    return [line.split("\t") for line in lines[1:]]


@pytest.fixture(scope="module")
def run_dir(cli_run) -> Path:
    """The session's real 2-step command-line run (tests/conftest.py): its model/ and its one checkpoint."""
    path, done = cli_run
    assert done.returncode == 0, done.stderr
    return path


def test_given_prompt_gets_response_and_score(run_dir):
    done = generate(str(run_dir), "3+4=", "--greedy")
    assert done.returncode == 0, done.stderr
    [[prompt, response, score]] = rows(done.stdout)
    assert prompt == "'3+4='"
    assert response.strip("'")  # a non-empty response
    assert 0.0 <= float(score) <= 1.0  # the arithmetic task's exact-match reward


def test_held_out_prompts_from_checkpoint(run_dir):
    [checkpoint] = sorted((run_dir / "checkpoints").glob("step-*"))
    done = generate(str(run_dir), "--num", "3", "--checkpoint", str(checkpoint), "--temperature", "0.7")
    assert done.returncode == 0, done.stderr
    table = rows(done.stdout)
    assert len(table) == 3
    assert all(prompt.endswith("='") and len(row) == 3 for row in table for prompt in row[:1])


@pytest.mark.slow  # a third generate process; not slow: test_held_out_prompts_from_checkpoint
def test_held_out_mode_prints_num_rows(run_dir):
    done = generate(str(run_dir), "--num", "5")
    assert done.returncode == 0, done.stderr
    assert len(rows(done.stdout)) == 5


def test_dir_without_model_names_what_it_looked_for(tmp_path):
    done = generate(str(tmp_path))
    assert done.returncode == 1
    assert f"{tmp_path / 'model'}/config.json" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.slow
def test_lora_run_answers_from_its_adapters(tmp_path, tiny_cache):
    # model/ of a LoRA run holds the adapters only: they go onto the run's initial actor.
    done = subprocess.run(
        [
            sys.executable,
            "train.py",
            "model.lora.enabled=true",
            "model.shared_critic=true",
            *FAST,
            f"hydra.run.dir={tmp_path}",
            f"model.cache_dir={tiny_cache}",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "model" / "adapter_config.json").is_file()
    [checkpoint] = sorted((tmp_path / "checkpoints").glob("step-*"))
    from_adapters, from_checkpoint = (
        generate(str(tmp_path), "--num", "4", "--greedy", *extra) for extra in ((), ("--checkpoint", str(checkpoint)))
    )
    assert from_adapters.returncode == 0, from_adapters.stderr
    assert len(rows(from_adapters.stdout)) == 4
    assert from_adapters.stdout == from_checkpoint.stdout  # the same trained policy either way
