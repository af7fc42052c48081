"""Health metrics warn once past their thresholds; the token debug table lines up with the experience."""

from __future__ import annotations

import logging

import pytest
import torch

from rlhf.app.build import build_trainer
from rlhf.ppo.metrics import explained_variance, token_debug_rows, value_metrics
from rlhf.runtime.health import CHECKS, EXPLAINED_VAR_WINDOW, HealthMonitor
from tests.reference import ragged_mask

HEALTHY = {
    "policy/ratio_dev_first": 0.0, "objective/neg_kl_frac": 0.2, "rollout/eos_rate": 1.0,
    "rollout/response_length": 3.0, "val/explained_var": 0.3, "val/returns_var": 0.1, "val/residual_var": 0.07,
    "policy/clipfrac": 0.05,
}  # fmt: skip


def test_healthy_metrics_do_not_warn(caplog):
    monitor = HealthMonitor()
    with caplog.at_level(logging.WARNING, logger="rlhf.runtime.health"):
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
        # pooled over the window: 1 - (0.07 + 0.3) / (0.1 + 0.1) = -0.85
        ("val/residual_var", 0.3, "health/explained_var"),
        ("policy/clipfrac", 0.5, "health/clipfrac"),
    ],
)
def test_each_threshold_warns_once(caplog, key, value, health_key):
    monitor = HealthMonitor()
    monitor(HEALTHY, step=1)  # sets the reference response length
    with caplog.at_level(logging.WARNING, logger="rlhf.runtime.health"):
        monitor({**HEALTHY, key: value}, step=2)
        monitor({**HEALTHY, key: value}, step=3)
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 1 and messages[0].startswith(f"step 2: {health_key}")


def test_explained_variance_constant_perfect_and_masked():
    # Values equal to the returns explain all of their variance; a constant explains none (Var[R - c] = Var[R]);
    # masked-out positions count for nothing, whatever they hold.
    gen = torch.Generator().manual_seed(0)
    mask = ragged_mask([3, 1, 0, 2], 3)
    returns = torch.randn(4, 3, generator=gen, dtype=torch.float64)
    assert explained_variance(returns, returns, mask) == pytest.approx(1.0)
    assert explained_variance(torch.full_like(returns, 0.7), returns, mask) == pytest.approx(0.0, abs=1e-12)
    values = returns + 0.5 * torch.randn(4, 3, generator=gen, dtype=torch.float64)
    junk = torch.where(mask, values, torch.full_like(values, 1e3))
    junk_returns = torch.where(mask, returns, torch.full_like(returns, -1e3))
    assert explained_variance(junk, junk_returns, mask) == pytest.approx(explained_variance(values, returns, mask))


def rollout(*, wrong: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(values, returns, mask) of 64 three-token responses of a policy right 97 % of the time, under the
    critic that knows the odds: V = 0.97 before the answer, then the outcome; each return is the 0/1
    score minus a small KL penalty that no state predicts (std 0.005)."""
    outcome = torch.ones(64, 1, dtype=torch.float64)
    outcome[:wrong] = 0.0
    returns = outcome.expand(64, 3) - 0.005 * torch.randn(64, 3, generator=gen, dtype=torch.float64)
    values = torch.cat([torch.full((64, 1), 0.97, dtype=torch.float64), outcome.expand(64, 2)], dim=1)
    return values, returns, torch.ones(64, 3, dtype=torch.bool)


def test_explained_variance_pools_rollouts_where_every_answer_was_right(caplog):
    # On the default task late in a run the policy is right 97 % of the time, and about one batch of 64
    # in 7 has every answer right: its returns vary only by the KL penalty, and the critic that knows the
    # odds (off by 0.03 before every answer) "explains" -9.8 and -6.4 of that variance here. Pooled over
    # the window, the same critic explains two thirds of the returns' variance: no warning.
    gen = torch.Generator().manual_seed(0)
    monitor = HealthMonitor()
    with caplog.at_level(logging.WARNING, logger="rlhf.runtime.health"):
        for step, wrong in enumerate([2, 3, 1, 2, 0, 2, 1, 3, 2, 0], start=1):
            values, returns, mask = rollout(wrong=wrong, gen=gen)
            metrics = value_metrics(values=values, returns=returns, mask=mask)
            if wrong == 0:
                assert metrics["val/explained_var"] < -5
            health = monitor({**HEALTHY, **metrics}, step=step)
            assert health["health/explained_var"] > 0.6
    assert caplog.records == []
    # A critic worse than a constant still warns once pooled: values that swap right and wrong.
    for step in range(11, 11 + EXPLAINED_VAR_WINDOW):
        values, returns, mask = rollout(wrong=2, gen=gen)
        health = monitor({**HEALTHY, **value_metrics(values=1 - values, returns=returns, mask=mask)}, step=step)
    assert health["health/explained_var"] < -0.5
    assert "health/explained_var" in monitor.warned


def test_token_debug_rows_line_up_with_the_experience(make_cfg):
    trainer, train_prompts, _ = build_trainer(make_cfg())
    result = trainer.step(train_prompts[:8])
    samples, exp = result.samples, result.experience
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
