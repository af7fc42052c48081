"""GAE against a plain-Python loop on ragged masks, edge cases of lambda and gamma, and a hand example."""

from __future__ import annotations

import pytest
import torch

from rlhf.core.gae import compute_gae
from tests.reference import gae_loop, random_case


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize(("gamma", "lam"), [(1.0, 0.95), (0.99, 0.9), (1.0, 0.0), (1.0, 1.0), (0.9, 1.0), (0.5, 0.3)])
def test_matches_python_loop_on_ragged_masks(seed, gamma, lam):
    rewards, values, mask, lengths = random_case(seed)
    advantages, returns = compute_gae(rewards, values, mask, gamma=gamma, lam=lam)
    for row, n in enumerate(lengths):
        adv, ret = gae_loop(rewards[row, :n].tolist(), values[row, :n].tolist(), gamma, lam)
        assert advantages[row, :n].tolist() == pytest.approx(adv, abs=1e-12)
        assert returns[row, :n].tolist() == pytest.approx(ret, abs=1e-12)
        # Padding after the last action gives exactly 0.
        assert advantages[row, n:].abs().sum() == 0 and returns[row, n:].abs().sum() == 0


def test_lambda_zero_is_one_step_td_error():
    rewards, values, mask, lengths = random_case(7)
    advantages, _ = compute_gae(rewards, values, mask, gamma=0.9, lam=0.0)
    for row, n in enumerate(lengths):
        for t in range(n):
            next_value = values[row, t + 1].item() if t + 1 < n else 0.0
            expected = rewards[row, t].item() + 0.9 * next_value - values[row, t].item()
            assert advantages[row, t].item() == pytest.approx(expected, abs=1e-12)


def test_lambda_one_is_discounted_return_minus_value():
    rewards, values, mask, lengths = random_case(8)
    advantages, returns = compute_gae(rewards, values, mask, gamma=0.95, lam=1.0)
    for row, n in enumerate(lengths):
        for t in range(n):
            discounted = sum(0.95 ** (k - t) * rewards[row, k].item() for k in range(t, n))
            assert returns[row, t].item() == pytest.approx(discounted, abs=1e-12)
            assert advantages[row, t].item() == pytest.approx(discounted - values[row, t].item(), abs=1e-12)


def test_hand_computed_example():
    # One row, 3 actions then padding; gamma = 1, lam = 0.5.
    # rewards r = [0, 0, 1], values V = [0.5, 0.25, 0.75], V after the last action = 0.
    # delta_2 = 1 + 0 - 0.75 = 0.25                 A_2 = 0.25
    # delta_1 = 0 + 0.75 - 0.25 = 0.5               A_1 = 0.5 + 0.5 * 0.25 = 0.625
    # delta_0 = 0 + 0.25 - 0.5 = -0.25              A_0 = -0.25 + 0.5 * 0.625 = 0.0625
    # returns = A + V = [0.5625, 0.875, 1.0]
    rewards = torch.tensor([[0.0, 0.0, 1.0, 9.0]])
    values = torch.tensor([[0.5, 0.25, 0.75, 9.0]])
    mask = torch.tensor([[True, True, True, False]])
    advantages, returns = compute_gae(rewards, values, mask, gamma=1.0, lam=0.5)
    assert advantages.tolist() == [[0.0625, 0.625, 0.25, 0.0]]
    assert returns.tolist() == [[0.5625, 0.875, 1.0, 0.0]]


def test_garbage_in_masked_positions_does_not_leak():
    rewards, values, mask, _ = random_case(3)
    noisy_rewards = torch.where(mask, rewards, torch.full_like(rewards, 1e6))
    noisy_values = torch.where(mask, values, torch.full_like(values, -1e6))
    a1, r1 = compute_gae(rewards, values, mask, gamma=1.0, lam=0.95)
    a2, r2 = compute_gae(noisy_rewards, noisy_values, mask, gamma=1.0, lam=0.95)
    assert torch.equal(a1, a2) and torch.equal(r1, r2)
