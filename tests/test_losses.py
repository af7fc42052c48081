"""PPO losses: hand-computed clip cases from both sides, loops on ragged masks, masked positions inert."""

from __future__ import annotations

import math

import pytest
import torch

from rlhf.core.losses import bradley_terry_loss, entropy_from_logits, logprobs_from_logits, policy_loss, value_loss
from tests.reference import ragged_mask

EPS = 0.2


def one_token(ratio: float, advantage: float):
    logprobs = torch.tensor([[math.log(ratio)]], dtype=torch.float64)
    return policy_loss(logprobs, torch.zeros_like(logprobs), torch.tensor([[advantage]]), torch.tensor([[True]]), EPS)


@pytest.mark.parametrize(
    ("ratio", "advantage", "loss", "clipfrac"),
    [
        # A > 0, r = 1.5 > 1 + eps: min(1.5 * 2, 1.2 * 2) = 2.4 -> loss -2.4, clipped.
        (1.5, 2.0, -2.4, 1.0),
        # A < 0, r = 0.5 < 1 - eps: min(0.5 * -2, 0.8 * -2) = -1.6 -> loss 1.6, clipped.
        (0.5, -2.0, 1.6, 1.0),
        # A > 0, r = 0.5 < 1 - eps: min(0.5 * 2, 0.8 * 2) = 1.0 -> loss -1.0, not clipped (pessimistic side).
        (0.5, 2.0, -1.0, 0.0),
        # A < 0, r = 1.5 > 1 + eps: min(1.5 * -2, 1.2 * -2) = -3.0 -> loss 3.0, not clipped.
        (1.5, -2.0, 3.0, 0.0),
        # Inside the range: r = 1.1, A = 1 -> loss -1.1.
        (1.1, 1.0, -1.1, 0.0),
    ],
)
def test_clip_cases_by_hand(ratio, advantage, loss, clipfrac):
    value, stats = one_token(ratio, advantage)
    assert value.item() == pytest.approx(loss)
    assert stats["clipfrac"].item() == clipfrac


def test_policy_loss_matches_loop_on_ragged_mask():
    gen = torch.Generator().manual_seed(0)
    lengths = [0, 1, 6, 4]
    mask = ragged_mask(lengths, 6)
    logprobs = -torch.rand(4, 6, generator=gen, dtype=torch.float64)
    old = logprobs + 0.3 * torch.randn(4, 6, generator=gen, dtype=torch.float64)
    advantages = torch.randn(4, 6, generator=gen, dtype=torch.float64)
    loss, stats = policy_loss(logprobs, old, advantages, mask, EPS)
    terms, clipped, count = 0.0, 0, 0
    for row, n in enumerate(lengths):
        for t in range(n):
            r = math.exp(logprobs[row, t].item() - old[row, t].item())
            a = advantages[row, t].item()
            unclipped_obj, clipped_obj = r * a, min(max(r, 1 - EPS), 1 + EPS) * a
            terms += -min(unclipped_obj, clipped_obj)
            clipped += clipped_obj < unclipped_obj
            count += 1
    assert loss.item() == pytest.approx(terms / count, abs=1e-12)
    assert stats["clipfrac"].item() == pytest.approx(clipped / count)


def test_ratio_one_gives_minus_mean_advantage_and_no_clipping():
    gen = torch.Generator().manual_seed(1)
    mask = ragged_mask([3, 1, 5], 5)
    logprobs = -torch.rand(3, 5, generator=gen)
    advantages = torch.randn(3, 5, generator=gen)
    loss, stats = policy_loss(logprobs, logprobs.clone(), advantages, mask, EPS)
    assert loss.item() == pytest.approx(-advantages[mask].mean().item(), abs=1e-6)
    assert stats["ratio_max_dev"].item() == 0.0
    assert stats["clipfrac"].item() == 0.0
    assert stats["approx_kl"].item() == 0.0


def test_approx_kl_is_unbiased_for_kl_old_new_on_old_policy_samples():
    # The update's tokens were sampled from pi_old: the mean of approx_kl over them must estimate
    # KL(pi_old || pi) = sum_a p_old(a) log(p_old(a) / p_new(a)), here for a large change of policy:
    # 0.6 ln 3 + 0.3 ln 0.6 + 0.1 ln(1/3) = 0.3961. (The reversed k3, 1/r - 1 + log r, has mean
    # sum p_old^2 / p_new - 1 - KL = 2.0133 - 1 - 0.3961 = 0.617 here.)
    p_old = torch.tensor([0.6, 0.3, 0.1], dtype=torch.float64)
    p_new = torch.tensor([0.2, 0.5, 0.3], dtype=torch.float64)
    exact = (p_old * (p_old / p_new).log()).sum().item()
    assert exact == pytest.approx(0.3961, abs=1e-4)
    gen = torch.Generator().manual_seed(0)
    tokens = torch.multinomial(p_old, 200_000, replacement=True, generator=gen).view(400, 500)
    logprobs, old_logprobs = p_new.log()[tokens], p_old.log()[tokens]
    mask = torch.ones_like(tokens, dtype=torch.bool)
    _, stats = policy_loss(logprobs, old_logprobs, torch.zeros_like(logprobs), mask, EPS)
    assert stats["approx_kl"].item() == pytest.approx(exact, rel=0.02)


def test_masked_positions_do_not_affect_the_losses():
    gen = torch.Generator().manual_seed(2)
    mask = ragged_mask([2, 4, 0], 4)
    logprobs = -torch.rand(3, 4, generator=gen)
    old = -torch.rand(3, 4, generator=gen)
    advantages = torch.randn(3, 4, generator=gen)
    values, returns = torch.randn(3, 4, generator=gen), torch.randn(3, 4, generator=gen)
    base_pg, _ = policy_loss(logprobs, old, advantages, mask, EPS)
    base_vf, _ = value_loss(values, values * 0.5, returns, mask, 0.2)

    def junk(x, fill):
        return torch.where(mask, x, torch.full_like(x, fill))

    # Masked-out ratio exp(50 - 10) is astronomically large: it must still not count.
    pg, _ = policy_loss(junk(logprobs, 50.0), junk(old, 10.0), junk(advantages, 50.0), mask, EPS)
    vf, _ = value_loss(junk(values, 50.0), junk(values * 0.5, -3.0), junk(returns, 1e4), mask, 0.2)
    assert pg.item() == base_pg.item() and vf.item() == base_vf.item()


def test_value_loss_unclipped_is_half_mse():
    gen = torch.Generator().manual_seed(3)
    mask = ragged_mask([1, 3, 2], 3)
    values, returns = torch.randn(3, 3, generator=gen), torch.randn(3, 3, generator=gen)
    loss, stats = value_loss(values, torch.zeros_like(values), returns, mask, None)
    assert loss.item() == pytest.approx(0.5 * ((values - returns)[mask] ** 2).mean().item(), abs=1e-6)
    assert stats["clipfrac"].item() == 0.0


def test_value_loss_clipped_by_hand():
    # eps = 0.2. Token 1: V = 1.0, old = 0.0, R = 0.5 -> V_clip = 0.2; errors (0.5)^2 = 0.25 vs (-0.3)^2 = 0.09:
    #   the unclipped one is larger, max = 0.25, not counted as clipped.
    # Token 2: V = 1.0, old = 0.0, R = 2.0 -> V_clip = 0.2; errors 1.0 vs 3.24: clipped, max = 3.24.
    # loss = 0.5 * mean(0.25, 3.24) = 0.8725, clipfrac = 0.5.
    values = torch.tensor([[1.0, 1.0]])
    loss, stats = value_loss(values, torch.zeros(1, 2), torch.tensor([[0.5, 2.0]]), torch.tensor([[True, True]]), 0.2)
    assert loss.item() == pytest.approx(0.8725)
    assert stats["clipfrac"].item() == 0.5


def test_logprobs_and_entropy_against_loops():
    gen = torch.Generator().manual_seed(4)
    logits = torch.randn(2, 3, 7, generator=gen, dtype=torch.float64)
    tokens = torch.randint(0, 7, (2, 3), generator=gen)
    logprobs = logprobs_from_logits(logits, tokens)
    entropy = entropy_from_logits(logits)
    for b in range(2):
        for t in range(3):
            row = logits[b, t].tolist()
            log_z = math.log(sum(math.exp(x) for x in row))
            assert logprobs[b, t].item() == pytest.approx(row[tokens[b, t]] - log_z, abs=1e-12)
            probs = [math.exp(x - log_z) for x in row]
            assert entropy[b, t].item() == pytest.approx(-sum(p * math.log(p) for p in probs), abs=1e-12)


def test_bradley_terry_loss_by_hand():
    # Margins 0 and ln 3: -log sigmoid(0) = ln 2 = 0.693147; -log sigmoid(ln 3) = -log(3/4) = 0.287682.
    # Mean = (0.693147 + 0.287682) / 2 = 0.490415.
    chosen = torch.tensor([1.0, math.log(3.0) + 0.5])
    rejected = torch.tensor([1.0, 0.5])
    expected = (math.log(2.0) - math.log(0.75)) / 2
    assert bradley_terry_loss(chosen, rejected).item() == pytest.approx(expected, abs=1e-6)


def test_bradley_terry_loss_matches_a_float64_loop_and_stays_finite():
    torch.manual_seed(0)
    chosen, rejected = torch.randn(17, dtype=torch.float64) * 5, torch.randn(17, dtype=torch.float64) * 5
    margins = (chosen - rejected).tolist()
    reference = sum(-math.log(1 / (1 + math.exp(-m))) for m in margins)
    assert bradley_terry_loss(chosen, rejected).item() == pytest.approx(reference / 17, rel=1e-12)
    # A margin of -200: log(sigmoid(-200)) underflows to -inf in float32; logsigmoid gives 200.
    far = bradley_terry_loss(torch.tensor([-100.0]), torch.tensor([100.0]))
    assert far.item() == pytest.approx(200.0)
