"""Training-health metrics with documented thresholds; crossing one warns once in the console.

Each check reads the step's metrics (see README, "Health metrics") and is logged as ``health/*``.
``health/explained_var`` pools the critic's residual and return variances over the last
``EXPLAINED_VAR_WINDOW`` rollouts: one rollout's ratio is ill-conditioned when its returns hardly vary
(on the default task, a batch where every answer is right leaves only the KL penalty: -99 for a
critic whose loss is 0.002), while a critic that is truly worse than a constant stays negative when
pooled.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger(__name__)


# Rollouts pooled by health/explained_var: enough that some of them hold wrong answers when the policy
# is right 97 % of the time on batches of 64 (a whole batch right happens every ~7 steps).
EXPLAINED_VAR_WINDOW = 10


def pooled_explained_variance(*, residual_vars: list[float], returns_vars: list[float]) -> float:
    """1 - sum Var[returns - values] / sum Var[returns] over rollouts, each variance about its own
    rollout's mean: the rollouts' explained variances averaged with weights Var[returns]."""
    return 1.0 - sum(residual_vars) / max(sum(returns_vars), 1e-8)


@dataclass(frozen=True)
class Check:
    key: str  # logged as this metric
    is_bad: Callable[[float], bool]
    threshold: str  # the rule, as documented
    hint: str  # what usually causes it


CHECKS = [
    Check(
        key="health/ratio_dev_first",
        is_bad=lambda v: v > 1e-3,
        threshold="> 1e-3",
        hint="the update's forward disagrees with the rollout's (dropout, padding, temperature or dtype mismatch)",
    ),
    Check(
        key="health/neg_kl_frac",
        is_bad=lambda v: v > 0.5,
        threshold="> 0.5",
        hint="most sampled tokens are likelier under the reference: sampling may not follow the policy",
    ),
    Check(
        key="health/truncation_rate",
        is_bad=lambda v: v > 0.5,
        threshold="> 0.5",
        hint="most responses hit rollout.max_new_tokens without EOS: raise it or add reward.missing_eos_penalty",
    ),
    Check(
        key="health/length_drift",
        is_bad=lambda v: abs(v) > 0.5,
        threshold="|drift| > 0.5",
        hint="mean response length moved by more than half since step 1 (length hacking or collapse)",
    ),
    Check(
        key="health/explained_var",
        is_bad=lambda v: v < -0.5,
        threshold="< -0.5",
        hint=(
            f"over the last {EXPLAINED_VAR_WINDOW} rollouts the critic predicts returns worse than a constant: "
            "lower its learning rate or check value targets"
        ),
    ),
    Check(
        key="health/clipfrac",
        is_bad=lambda v: v > 0.3,
        threshold="> 0.3",
        hint="many tokens are clipped: the policy moves too far per step (lower the LR, epochs or mini-batches)",
    ),
]


class HealthMonitor:
    """Derives ``health/*`` metrics from a step's metrics and warns once per crossed threshold."""

    def __init__(self) -> None:
        self.first_length: float | None = None
        self.warned: set[str] = set()
        self.value_variances: list[tuple[float, float]] = []  # (residual, returns) of the last rollouts

    def state_dict(self) -> dict:
        return {
            "first_length": self.first_length,
            "warned": sorted(self.warned),
            "value_variances": [list(pair) for pair in self.value_variances],
        }

    def load_state_dict(self, state: dict) -> None:
        self.first_length, self.warned = state["first_length"], set(state["warned"])
        # checkpoints written before the pooled explained variance start a new window
        self.value_variances = [tuple(pair) for pair in state.get("value_variances", [])]

    def __call__(self, metrics: dict[str, float], step: int) -> dict[str, float]:
        length = metrics["rollout/response_length"]
        if self.first_length is None:
            self.first_length = length
        health = {
            "health/ratio_dev_first": metrics["policy/ratio_dev_first"],
            "health/neg_kl_frac": metrics["objective/neg_kl_frac"],
            "health/truncation_rate": 1.0 - metrics["rollout/eos_rate"],
            "health/length_drift": length / max(self.first_length, 1e-9) - 1.0,
        }
        if "val/residual_var" in metrics:  # a critic-free estimator (advantage=grpo...) has no values
            self.value_variances.append((metrics["val/residual_var"], metrics["val/returns_var"]))
            self.value_variances = self.value_variances[-EXPLAINED_VAR_WINDOW:]
            health["health/explained_var"] = pooled_explained_variance(
                residual_vars=[residual for residual, _ in self.value_variances],
                returns_vars=[returns for _, returns in self.value_variances],
            )
        health["health/clipfrac"] = metrics["policy/clipfrac"]
        for check in CHECKS:
            if check.key not in health:
                continue
            value = health[check.key]
            if check.key not in self.warned and check.is_bad(value):
                self.warned.add(check.key)
                log.warning(
                    "step %d: %s = %.4g (threshold %s): %s", step, check.key, value, check.threshold, check.hint
                )
        return health
