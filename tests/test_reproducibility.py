"""Same seed, same run; different seed, different samples; no secret from the environment in a run dir."""

from __future__ import annotations

import json
from pathlib import Path

from rlhf.run import train


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


def test_secrets_from_the_environment_stay_out_of_run_dirs(make_cfg, tmp_path, monkeypatch, server_factory):
    # The reward endpoint's token comes from the environment through the config, as a user would pass it.
    secrets = {"WANDB_API_KEY": "wandb-secret-0123456789abcdef", "HF_TOKEN": "hf_secretTOKEN987",
               "REWARD_API_TOKEN": "reward-token-5b0e7d"}  # fmt: skip
    for key, value in secrets.items():
        monkeypatch.setenv(key, value)
    server = server_factory()
    cfg = make_cfg(
        "reward=http", f"reward.url={server.url}", "+reward.headers.Authorization='Bearer ${oc.env:REWARD_API_TOKEN}'",
        "logging.wandb.mode=offline", "trainer.save_every=1", "trainer.steps=2",
        f"trainer.output_dir={tmp_path / 'run'}",
    )  # fmt: skip
    train(cfg)
    assert server.headers and all(h["Authorization"] == "Bearer reward-token-5b0e7d" for h in server.headers)
    files = [p for p in (tmp_path / "run").rglob("*") if p.is_file()]
    names = {p.name for p in files}
    assert {"metrics.jsonl", "config.yaml", "state.pt", "actor.safetensors"} <= names
    assert any(name.endswith(".wandb") for name in names)
    for path in files:
        content = path.read_bytes()
        for value in secrets.values():
            assert value.encode() not in content, f"{value} found in {path}"
