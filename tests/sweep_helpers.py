"""Reward functions for sweep tests, importable by ``reward.fn._target_`` from ``python train.py``."""

from __future__ import annotations

import math


def nan_reward(prompts: list[str], responses: list[str]) -> list[float]:
    """A diverging reward: every score is NaN, so the job must fail before any update."""
    return [math.nan] * len(prompts)
