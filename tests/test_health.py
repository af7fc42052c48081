"""Health metrics warn once past their thresholds; the token debug table lines up with the experience."""

from __future__ import annotations

import logging

import pytest
import torch

from rlhf.build import build_trainer
from rlhf.health import CHECKS, HealthMonitor
from rlhf.trainer import token_debug_rows

HEALTHY = {
    "policy/ratio_dev_first": 0.0, "objective/neg_kl_frac": 0.2, "rollout/eos_rate": 1.0,
    "rollout/response_length": 3.0, "val/explained_var": 0.3, "policy/clipfrac": 0.05,
}  # fmt: skip


def test_healthy_metrics_do_not_warn(caplog):
    monitor = HealthMonitor()
    with caplog.at_level(logging.WARNING, logger="rlhf.health"):
        health = monitor(HEALTHY, step=1)
    assert caplog.records == []
    assert set(health) == {check.key for check in CHECKS}
    assert health["health/length_drift"] == 0.0 and health["health/truncation_rate"] == 0.0


@pytest.mark.parametrize(
    ("key", "value", "health_key"),
    [
        ("policy/ratio_dev_first", 0.01, "health/ratio_dev_first"),
        ("objective/neg_kl_frac", 0.7, "health/neg_kl_frac"),
        ("rollout/eos_rate", 0.2, "health/truncation_rate"),
        ("rollout/response_length", 6.0, "health/length_drift"),
        ("val/explained_var", -2.0, "health/explained_var"),
        ("policy/clipfrac", 0.5, "health/clipfrac"),
    ],
)
def test_each_threshold_warns_once(caplog, key, value, health_key):
    monitor = HealthMonitor()
    monitor(HEALTHY, step=1)  # sets the reference response length
    with caplog.at_level(logging.WARNING, logger="rlhf.health"):
        monitor({**HEALTHY, key: value}, step=2)
        monitor({**HEALTHY, key: value}, step=3)
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 1 and messages[0].startswith(f"step 2: {health_key}")


def test_token_debug_rows_line_up_with_the_experience(make_cfg):
    trainer, train_prompts, _ = build_trainer(make_cfg())
    trainer.step(train_prompts[:8])
    samples, exp = trainer.last_samples, trainer.last_experience
    rows = token_debug_rows(samples, exp, trainer.tokenizer, num_samples=3)
    for i in range(3):
        mine = [row for row in rows if row["sample"] == i]
        assert len(mine) == int(samples.action_mask[i].sum())
        # The score sits on the last row (the EOS when there is one); every row pays beta * kl.
        beta = trainer.kl_controller.value
        assert sum(row["reward"] for row in mine) == pytest.approx(
            exp.scores[i].item() - beta * sum(row["kl"] for row in mine), abs=1e-5
        )
        if not samples.truncated[i]:
            assert mine[-1]["token"] == trainer.tokenizer.eos_token
        assert torch.isclose(torch.tensor(mine[0]["return"]), exp.returns[i, 0])
