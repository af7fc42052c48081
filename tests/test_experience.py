"""``make_experience`` against a slow, obvious float64 loop: KL-shaped rewards with the score on the
last action, GAE, returns, whitening on and off, padding zeroed; a row of one action included."""

from __future__ import annotations

import math

import pytest
import torch

from rlhf.core.types import Samples
from rlhf.ppo.experience import make_experience
from rlhf.ppo.settings import ExperienceSettings
from tests.reference import gae_loop, ragged_mask

LENGTHS = [3, 1]  # row 0: three actions then one of padding; row 1: a single action (its EOS)
WIDTH = 4
# (B, A) inputs; the values at padding positions are junk that must not leak anywhere.
LOGPROBS = [[-0.5, -1.2, -0.3, -9.0], [-1.0, -7.0, -7.0, -7.0]]
REF_LOGPROBS = [[-0.7, -1.0, -0.9, -3.0], [-1.5, -2.0, -2.0, -2.0]]
VALUES = [[0.2, -0.4, 0.6, 5.0], [0.5, 4.0, 4.0, 4.0]]
SCORES = [1.0, 2.0]
BETA = 0.1


def samples() -> Samples:
    mask = ragged_mask(LENGTHS, WIDTH)
    prompt = torch.ones(2, 2, dtype=torch.long)  # the fields make_experience passes through
    return Samples(
        sequences=torch.cat([prompt, torch.full((2, WIDTH), 7)], dim=1),
        attention_mask=torch.cat([prompt, mask.long()], dim=1),
        action_mask=mask,
        num_actions=WIDTH,
        response_length=torch.tensor(LENGTHS, dtype=torch.float),
        total_length=torch.tensor(LENGTHS, dtype=torch.float) + 2,
        truncated=torch.tensor([False, False]),
        prompts=["a", "b"],
        responses=["x", "y"],
    )


def whiten_loop(rows: list[list[float]], keep_mean: bool) -> list[list[float]]:
    """Whiten the real steps of every row together: unbiased variance, eps 1e-8."""
    flat = [x for row in rows for x in row]
    mean = sum(flat) / len(flat)
    var = sum((x - mean) ** 2 for x in flat) / (len(flat) - 1)
    return [[(x - mean) / math.sqrt(var + 1e-8) + (mean if keep_mean else 0.0) for x in row] for row in rows]


def reference_loop(settings: ExperienceSettings) -> dict[str, list[list[float]]]:
    """The experience's (B, A) fields, row by row over the real steps, padded with zeros."""
    kl, rewards = [], []
    for lp, ref, score, n in zip(LOGPROBS, REF_LOGPROBS, SCORES, LENGTHS, strict=True):
        log_ratio = [r - p for p, r in zip(lp[:n], ref[:n], strict=True)]
        row_kl = [-x if settings.kl_estimator == "k1" else math.expm1(x) - x for x in log_ratio]
        row_rewards = [-BETA * k for k in row_kl]
        row_rewards[-1] += score  # the score on the last action (the EOS)
        kl.append(row_kl)
        rewards.append(row_rewards)
    if settings.whiten_rewards:
        rewards = whiten_loop(rewards, keep_mean=True)
    advantages, returns = [], []
    for row_rewards, values, n in zip(rewards, VALUES, LENGTHS, strict=True):
        row_advantages, row_returns = gae_loop(row_rewards, values[:n], settings.gamma, settings.lam)
        advantages.append(row_advantages)
        returns.append(row_returns)
    if settings.whiten_advantages:
        advantages = whiten_loop(advantages, keep_mean=False)
    if settings.advantage_clip is not None:
        clip = settings.advantage_clip
        advantages = [[min(max(a, -clip), clip) for a in row] for row in advantages]
    fields = {
        "old_logprobs": [row[:n] for row, n in zip(LOGPROBS, LENGTHS, strict=True)],
        "ref_logprobs": [row[:n] for row, n in zip(REF_LOGPROBS, LENGTHS, strict=True)],
        "old_values": [row[:n] for row, n in zip(VALUES, LENGTHS, strict=True)],
        "kl": kl,
        "rewards": rewards,
        "advantages": advantages,
        "returns": returns,
    }
    return {name: [row + [0.0] * (WIDTH - len(row)) for row in rows] for name, rows in fields.items()}


def experience(settings: ExperienceSettings):
    return make_experience(
        samples(),
        scores=torch.tensor(SCORES, dtype=torch.float64),
        logprobs=torch.tensor(LOGPROBS, dtype=torch.float64),
        ref_logprobs=torch.tensor(REF_LOGPROBS, dtype=torch.float64),
        values=torch.tensor(VALUES, dtype=torch.float64),
        kl_coef=BETA,
        settings=settings,
    )


@pytest.mark.parametrize("whiten_rewards", [False, True])
@pytest.mark.parametrize("whiten_advantages", [False, True])
@pytest.mark.parametrize(("estimator", "gamma", "lam", "clip"), [("k1", 0.9, 0.8, None), ("k3", 1.0, 0.95, 0.5)])
def test_make_experience_matches_a_float64_loop(whiten_rewards, whiten_advantages, estimator, gamma, lam, clip):
    settings = ExperienceSettings(
        kl_estimator=estimator,
        gamma=gamma,
        lam=lam,
        whiten_rewards=whiten_rewards,
        whiten_advantages=whiten_advantages,
        advantage_clip=clip,
    )
    exp = experience(settings)
    for name, expected in reference_loop(settings).items():
        torch.testing.assert_close(getattr(exp, name), torch.tensor(expected, dtype=torch.float64), msg=name)
    torch.testing.assert_close(exp.scores, torch.tensor(SCORES, dtype=torch.float64))
    assert torch.equal(exp.action_mask, ragged_mask(LENGTHS, WIDTH))


def test_one_action_row_by_hand():
    # Row 1, gamma = lam = 1, no whitening: kl = -1.0 - (-1.5) = 0.5 (k1), reward = 2.0 - 0.1 * 0.5 = 1.95
    # on its only action; advantage = 1.95 - V 0.5 = 1.45; return = advantage + V = 1.95.
    settings = ExperienceSettings(kl_estimator="k1", gamma=1.0, lam=1.0, whiten_rewards=False, whiten_advantages=False)
    exp = experience(settings)
    assert exp.kl[1].tolist() == pytest.approx([0.5, 0.0, 0.0, 0.0])
    assert exp.rewards[1].tolist() == pytest.approx([1.95, 0.0, 0.0, 0.0])
    assert exp.advantages[1].tolist() == pytest.approx([1.45, 0.0, 0.0, 0.0])
    assert exp.returns[1].tolist() == pytest.approx([1.95, 0.0, 0.0, 0.0])


def test_make_experience_takes_its_settings_by_keyword():
    args = (samples(), torch.tensor(SCORES), torch.tensor(LOGPROBS), torch.tensor(REF_LOGPROBS), torch.tensor(VALUES))
    with pytest.raises(TypeError):
        make_experience(*args, BETA, ExperienceSettings("k1", 1.0, 0.95, False, True))
