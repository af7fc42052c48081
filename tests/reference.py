"""Slow, obvious references in plain Python floats, and random ragged prefix masks."""

from __future__ import annotations

import torch


def ragged_mask(lengths: list[int], width: int) -> torch.Tensor:
    """(B, A) bool prefix mask: row i has its first lengths[i] positions True."""
    return torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]


def random_case(seed: int, batch: int = 6, width: int = 7):
    """Random float64 rewards and values with ragged lengths that include 0, 1 and full rows."""
    gen = torch.Generator().manual_seed(seed)
    lengths = [0, 1, width] + torch.randint(0, width + 1, (batch - 3,), generator=gen).tolist()
    mask = ragged_mask(lengths, width)
    rewards = torch.randn(batch, width, generator=gen, dtype=torch.float64)
    values = torch.randn(batch, width, generator=gen, dtype=torch.float64)
    return rewards, values, mask, lengths


def gae_loop(rewards: list[float], values: list[float], gamma: float, lam: float) -> tuple[list[float], list[float]]:
    """Textbook GAE over one episode's real steps; V after the last step is 0."""
    n = len(rewards)
    advantages = [0.0] * n
    running = 0.0
    for t in reversed(range(n)):
        next_value = values[t + 1] if t + 1 < n else 0.0
        delta = rewards[t] + gamma * next_value - values[t]
        running = delta + gamma * lam * running
        advantages[t] = running
    return advantages, [a + v for a, v in zip(advantages, values, strict=True)]
