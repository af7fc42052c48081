"""Same seed, same run; different seed, different samples. (Secrets in run dirs: tests/test_cli_status.py.)"""

from __future__ import annotations

import json
from pathlib import Path

from rlhf.app.run import train


def logged(run_dir: Path) -> tuple[list[dict], list[dict]]:
    """metrics.jsonl without wall-clock figures, and samples.jsonl."""
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    metrics = [{k: v for k, v in row.items() if not k.startswith("time/")} for row in metrics]
    samples = [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]
    return metrics, samples


def run(make_cfg, tmp_path, name, *overrides):
    cfg = make_cfg("trainer.steps=3", "logging.samples_every=1", f"trainer.output_dir={tmp_path / name}", *overrides)
    train(cfg)
    return logged(tmp_path / name)


def test_same_seed_same_run_different_seed_different_samples(make_cfg, tmp_path):
    first = run(make_cfg, tmp_path, "a", "seed=3")
    again = run(make_cfg, tmp_path, "b", "seed=3")
    other = run(make_cfg, tmp_path, "c", "seed=4")
    assert first == again  # every metric of every step and every sampled response, exactly
    assert [s["response"] for s in first[1]] != [s["response"] for s in other[1]]
