"""The critic-free advantage estimators (rlhf/core/advantages.py) and decoupled / length-adaptive GAE
(rlhf/core/gae.py) against slow float64 references written from the papers (Python loops over samples,
groups and tokens), on ragged masks with empty responses; and ``advantage=<estimator>`` end to end."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch

from rlhf.config import options
from rlhf.core.advantages import (
    ADVANTAGE_ESTIMATORS,
    CRITIC_FREE,
    grpo_advantages,
    outcome_advantages,
    reinforce_pp_advantages,
    returns_to_go,
    rloo_advantages,
)
from rlhf.core.gae import adaptive_lambda, compute_gae, decoupled_gae
from rlhf.core.kl import shape_rewards
from rlhf.core.types import Samples
from rlhf.ppo.experience import make_experience, training_scores
from rlhf.ppo.settings import ExperienceSettings
from tests.helpers import REPO

EPS = 1e-6  # grpo's eps in the denominator


def ragged(seed: int = 0, groups: int = 4, n: int = 3, width: int = 6):
    """(scores (B,), kl (B, A), action mask (B, A), group ids (B,)) with B = groups * n, lengths 0..width
    (at least one empty response), float64."""
    gen = torch.Generator().manual_seed(seed)
    batch = groups * n
    lengths = torch.randint(0, width + 1, (batch,), generator=gen)
    lengths[1] = 0
    lengths[2] = width
    mask = torch.arange(width)[None, :] < lengths[:, None]
    scores = torch.randn(batch, generator=gen, dtype=torch.float64)
    kl = torch.randn(batch, width, generator=gen, dtype=torch.float64).abs() * mask
    return scores, kl, mask, torch.arange(groups).repeat_interleave(n)


def members(group_ids, i):
    return [j for j in range(len(group_ids)) if group_ids[j] == group_ids[i]]


# ---- references, one sample and one token at a time -------------------------------------------------


def ref_grpo(scores, group_ids, std_normalize=True):
    """DeepSeekMath eq. (outcome supervision): A_i = (r_i - mean(r)) / std(r) over the group's rewards."""
    out = []
    for i in range(len(scores)):
        group = [float(scores[j]) for j in members(group_ids, i)]
        mean = sum(group) / len(group)
        if not std_normalize:
            out.append(float(scores[i]) - mean)
        elif len(group) == 1:
            out.append(0.0)
        else:
            std = math.sqrt(sum((x - mean) ** 2 for x in group) / (len(group) - 1))
            out.append((float(scores[i]) - mean) / (std + EPS))
    return torch.tensor(out, dtype=torch.float64)


def ref_rloo(scores, group_ids):
    """Ahmadian et al. 2024 eq. 7: r_i - 1/(n-1) sum_{j != i} r_j."""
    out = []
    for i in range(len(scores)):
        others = [float(scores[j]) for j in members(group_ids, i) if j != i]
        out.append(float(scores[i]) - sum(others) / len(others) if others else 0.0)
    return torch.tensor(out, dtype=torch.float64)


def ref_returns(rewards, mask, gamma):
    """G_t = sum_{t' >= t, t' an action} gamma^(t' - t) r_t'."""
    out = torch.zeros_like(rewards)
    for i in range(rewards.shape[0]):
        length = int(mask[i].sum())
        for t in range(length):
            out[i, t] = sum(gamma ** (k - t) * float(rewards[i, k]) for k in range(t, length))
    return out


def ref_whiten(values, mask):
    tokens = [float(values[i, t]) for i in range(values.shape[0]) for t in range(values.shape[1]) if mask[i, t]]
    mean = sum(tokens) / len(tokens)
    var = sum((x - mean) ** 2 for x in tokens) / (len(tokens) - 1)
    return torch.where(mask, (values - mean) / math.sqrt(var + 1e-8), torch.zeros_like(values))


def ref_gae(rewards, values, mask, gamma, lams):
    """Schulman et al. 2016: A_t = sum_l (gamma lam)^l delta_{t+l}, V after the last action = 0; one
    lambda per row (``lams``)."""
    adv = torch.zeros_like(rewards)
    for i in range(rewards.shape[0]):
        length = int(mask[i].sum())
        for t in range(length):
            total = 0.0
            for k in range(t, length):
                next_value = float(values[i, k + 1]) if k + 1 < length else 0.0
                delta = float(rewards[i, k]) + gamma * next_value - float(values[i, k])
                total += (gamma * lams[i]) ** (k - t) * delta
            adv[i, t] = total
    return adv, (adv + values) * mask


# ---- the formulas -----------------------------------------------------------------------------------


@pytest.mark.parametrize("std_normalize", [True, False])
@pytest.mark.parametrize("seed", [0, 1])
def test_grpo_matches_the_paper(seed, std_normalize):
    scores, _, _, group_ids = ragged(seed)
    got = grpo_advantages(scores, group_ids, std_normalize=std_normalize)
    torch.testing.assert_close(got, ref_grpo(scores, group_ids, std_normalize), rtol=1e-12, atol=1e-12)


def test_grpo_by_hand_and_equal_scores_give_zero_not_nan():
    # group 0: scores 1, 3 -> mean 2, unbiased std sqrt(2) -> -/+ 1/sqrt(2); group 1: all 5 -> 0 (std 0)
    scores = torch.tensor([1.0, 3.0, 5.0, 5.0, 5.0], dtype=torch.float64)
    group_ids = torch.tensor([0, 0, 1, 1, 1])
    got = grpo_advantages(scores, group_ids)
    expected = torch.tensor([-1 / (math.sqrt(2) + EPS), 1 / (math.sqrt(2) + EPS), 0.0, 0.0, 0.0], dtype=torch.float64)
    torch.testing.assert_close(got, expected)
    assert torch.equal(grpo_advantages(torch.full((4,), 0.7), torch.tensor([3, 3, 3, 3])), torch.zeros(4))


def test_rloo_matches_the_paper():
    for seed in range(3):
        scores, _, _, group_ids = ragged(seed, n=4)
        torch.testing.assert_close(rloo_advantages(scores, group_ids), ref_rloo(scores, group_ids))
    # by hand: 1 - (2 + 6) / 2 = -3, 2 - (1 + 6) / 2 = -1.5, 6 - (1 + 2) / 2 = 4.5
    got = rloo_advantages(torch.tensor([1.0, 2.0, 6.0]), torch.tensor([7, 7, 7]))
    torch.testing.assert_close(got, torch.tensor([-3.0, -1.5, 4.5]))


def test_groups_of_one_sample_get_zero():
    # n = 1 is refused by validation for grpo/rloo (tests/test_bad_inputs.py); the math still defines it.
    scores, ids = torch.tensor([0.3, -2.0]), torch.tensor([0, 1])
    assert torch.equal(grpo_advantages(scores, ids), torch.zeros(2))
    assert torch.equal(rloo_advantages(scores, ids), torch.zeros(2))


@pytest.mark.parametrize("gamma", [1.0, 0.9, 0.0])
def test_reinforce_pp_matches_the_paper(gamma):
    scores, kl, mask, _ = ragged(2)
    rewards = shape_rewards(scores, kl, 0.1, mask)
    advantages, returns = reinforce_pp_advantages(rewards, mask, gamma=gamma)
    expected_returns = ref_returns(rewards, mask, gamma)
    torch.testing.assert_close(returns, expected_returns)
    torch.testing.assert_close(advantages, ref_whiten(expected_returns, mask))
    assert not mask[1].any() and not advantages[1].any()  # the empty response


def test_outcome_estimators_put_the_kl_where_the_readme_says():
    scores, kl, mask, group_ids = ragged(3, n=4)
    beta = 0.05
    rewards = shape_rewards(scores, kl, beta, mask)
    penalty_to_go = ref_returns(-beta * kl * mask, mask, 1.0)
    has_action = mask.any(dim=1)
    fmask = mask.double()

    def run(estimator, **kwargs):
        args = dict(rewards=rewards, scores=scores, action_mask=mask, group_ids=group_ids)
        return outcome_advantages(estimator, **args, **kwargs)[0]

    # grpo: the group-normalised score on every token plus the KL penalty still to come
    expected = ref_grpo(scores, group_ids)[:, None] * fmask + penalty_to_go
    torch.testing.assert_close(run("grpo"), expected)
    # rloo: leave-one-out on the KL-penalised sequence reward R = score - beta * sum kl (0 for no action)
    sequence_reward = torch.where(has_action, scores, torch.zeros_like(scores)) - beta * kl.sum(dim=1)
    torch.testing.assert_close(run("rloo"), ref_rloo(sequence_reward, group_ids)[:, None] * fmask)
    # remax: the returns of the KL-shaped rewards minus the greedy response's score
    baseline = torch.randn(len(scores), dtype=torch.float64)
    expected = (ref_returns(rewards, mask, 1.0) - baseline[:, None]) * fmask
    torch.testing.assert_close(run("remax", baseline_scores=baseline), expected)
    for estimator in ("grpo", "rloo", "remax"):
        out = run(estimator, baseline_scores=baseline)
        assert out.isfinite().all() and not out[~mask].any(), estimator


def test_returns_to_go_resets_at_the_end_of_each_response():
    # lengths 2 and 3 in width 4, gamma 0.5: [1 + 0.5*2, 2, 0, 0], [3 + 0.5*(0 + 0.5*4), 0 + 0.5*4, 4, 0]
    rewards = torch.tensor([[1.0, 2.0, 9.0, 9.0], [3.0, 0.0, 4.0, 9.0]])
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 0]], dtype=torch.bool)
    expected = torch.tensor([[2.0, 2.0, 0.0, 0.0], [4.0, 2.0, 4.0, 0.0]])
    torch.testing.assert_close(returns_to_go(rewards, mask, gamma=0.5), expected)


def test_the_core_and_the_validator_name_the_same_estimators():
    assert tuple(options.AdvantageEstimator) == ADVANTAGE_ESTIMATORS
    assert set(CRITIC_FREE) == set(ADVANTAGE_ESTIMATORS) - {"gae"}
    with pytest.raises(ValueError, match="advantage.estimator='ppo2'"):
        zeros = torch.zeros(1, 1)
        outcome_advantages("ppo2", rewards=zeros, scores=zeros[0], action_mask=zeros.bool(), group_ids=zeros[0])


# ---- decoupled and length-adaptive GAE --------------------------------------------------------------


def test_adaptive_lambda_by_hand():
    # alpha 0.05: length 40 -> 1 - 1/2 = 0.5, 100 -> 0.8, 20 -> 0 (1 - 1/1), 10 -> clamped to 0, 0 -> 0
    got = adaptive_lambda(torch.tensor([40.0, 100.0, 20.0, 10.0, 0.0]), alpha=0.05)
    torch.testing.assert_close(got, torch.tensor([0.5, 0.8, 0.0, 0.0, 0.0]))


@pytest.mark.parametrize("lam_critic", [1.0, 0.0, 0.7])
def test_decoupled_gae_matches_the_reference(lam_critic):
    scores, kl, mask, _ = ragged(4)
    rewards = shape_rewards(scores, kl, 0.1, mask)
    values = torch.randn(mask.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64) * mask
    lam_policy = adaptive_lambda(mask.sum(dim=1).double(), alpha=0.3).double()
    advantages, returns = decoupled_gae(
        rewards, values, mask, gamma=0.99, lam_policy=lam_policy, lam_critic=lam_critic
    )
    expected_adv, _ = ref_gae(rewards, values, mask, 0.99, [float(lam) for lam in lam_policy])
    _, expected_returns = ref_gae(rewards, values, mask, 0.99, [lam_critic] * len(scores))
    torch.testing.assert_close(advantages, expected_adv)
    torch.testing.assert_close(returns, expected_returns)


def test_decoupled_gae_with_one_lambda_is_plain_gae_bitwise():
    scores, kl, mask, _ = ragged(6)
    rewards, values = shape_rewards(scores, kl, 0.1, mask).float(), torch.randn(mask.shape) * mask
    plain = compute_gae(rewards, values, mask, gamma=1.0, lam=0.95)
    decoupled = decoupled_gae(rewards, values, mask, gamma=1.0, lam_policy=0.95, lam_critic=0.95)
    assert all(torch.equal(a, b) for a, b in zip(plain, decoupled, strict=True))


# ---- in the experience and the rollout ---------------------------------------------------------------


def as_samples(mask: torch.Tensor, group_ids: torch.Tensor, baseline: torch.Tensor | None = None) -> Samples:
    batch, width = mask.shape
    prompt = torch.ones(batch, 2, dtype=torch.long)
    return Samples(
        sequences=torch.cat([prompt, torch.full((batch, width), 7)], dim=1),
        attention_mask=torch.cat([prompt, mask.long()], dim=1),
        action_mask=mask.clone(),
        num_actions=width,
        response_length=mask.sum(dim=1).float(),
        total_length=mask.sum(dim=1).float() + 2,
        truncated=torch.zeros(batch, dtype=torch.bool),
        prompts=["p"] * batch,
        responses=["r"] * batch,
        group_ids=group_ids,
        baseline_scores=baseline,
    )


def settings_of(**changes) -> ExperienceSettings:
    base = dict(kl_estimator="k1", gamma=0.99, lam=0.9, whiten_rewards=False, whiten_advantages=False)
    return ExperienceSettings(**{**base, **changes})


def experience_of(settings: ExperienceSettings, samples: Samples, scores: torch.Tensor, values: torch.Tensor):
    gen = torch.Generator().manual_seed(9)
    logprobs = -torch.rand(samples.action_mask.shape, generator=gen, dtype=torch.float64)
    ref_logprobs = -torch.rand(samples.action_mask.shape, generator=gen, dtype=torch.float64)
    args = dict(scores=scores, logprobs=logprobs, ref_logprobs=ref_logprobs, values=values, kl_coef=0.1)
    return make_experience(samples, **args, settings=settings)


def test_make_experience_decouples_the_lambdas():
    scores, _, mask, group_ids = ragged(7)
    values = torch.randn(mask.shape, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    plain = experience_of(settings_of(), as_samples(mask, group_ids), scores, values)
    critic_lam = experience_of(settings_of(lam_critic=1.0), as_samples(mask, group_ids), scores, values)
    monte_carlo = experience_of(settings_of(lam=1.0), as_samples(mask, group_ids), scores, values)
    assert torch.equal(critic_lam.advantages, plain.advantages)  # the policy keeps gae.lam
    assert torch.equal(critic_lam.returns, monte_carlo.returns)  # the critic's targets use lam_critic
    assert not torch.equal(critic_lam.returns, plain.returns)
    adaptive = experience_of(settings_of(lam_adaptive_alpha=0.25), as_samples(mask, group_ids), scores, values)
    lams = [float(lam) for lam in adaptive_lambda(mask.sum(dim=1), alpha=0.25)]
    expected_adv, _ = ref_gae(adaptive.rewards, adaptive.old_values, mask, 0.99, lams)
    torch.testing.assert_close(adaptive.advantages, expected_adv)
    assert torch.equal(adaptive.returns, plain.returns)


@pytest.mark.parametrize("estimator", CRITIC_FREE)
def test_make_experience_of_a_critic_free_estimator(estimator):
    scores, _, mask, group_ids = ragged(8, n=2)
    baseline = torch.randn(len(scores), dtype=torch.float64)
    samples = as_samples(mask, group_ids, baseline)
    exp = experience_of(
        settings_of(estimator=estimator, whiten_advantages=True), samples, scores, torch.zeros(mask.shape)
    )
    expected, _ = outcome_advantages(
        estimator,
        rewards=exp.rewards,
        scores=scores,
        action_mask=mask,
        group_ids=group_ids,
        baseline_scores=baseline,
        gamma=0.99,
    )
    # gae.whiten_advantages is gae's: the critic-free advantages are the estimator's own
    torch.testing.assert_close(exp.advantages, expected)


def test_remax_baselines_are_normalised_with_the_scores_and_a_nonfinite_one_drops_the_sample():
    _, _, mask, group_ids = ragged(9, groups=2, n=2)
    raw, baseline = torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor([0.5, 0.5, float("nan"), float("nan")])
    samples = as_samples(mask, group_ids, baseline)
    scores = training_scores(samples, raw, normalize=lambda x: 2 * x)
    assert scores.tolist() == [2.0, 4.0, 0.0, 0.0]
    assert samples.baseline_scores.tolist() == [1.0, 1.0, 0.0, 0.0]
    assert not samples.action_mask[2:].any()


def test_the_rollout_samples_each_prompt_n_times_in_groups(make_cfg):
    from rlhf.app.build import build_trainer

    trainer, _, _ = build_trainer(make_cfg("advantage=remax", "rollout.n=3"))
    assert trainer.critic is None and trainer.critic_optimizer is None  # no critic built
    samples = trainer.rollout.sample(["1+2=", "3+4="])
    assert samples.prompts == ["1+2="] * 3 + ["3+4="] * 3
    assert samples.group_ids.tolist() == [0, 0, 0, 1, 1, 1]
    greedy = trainer.rollout.score(trainer.rollout.generate(["1+2=", "3+4="], do_sample=False), where="test")
    assert samples.baseline_scores.tolist() == greedy.repeat_interleave(3).tolist()


# ---- end to end -------------------------------------------------------------------------------------


@pytest.mark.slow
def test_every_estimator_runs_and_the_critic_free_ones_build_no_critic(tmp_path, tiny_cache):
    # One multirun over the five estimators, two samples per prompt each (~40 s).
    overrides = ["-m", "advantage=" + ",".join(ADVANTAGE_ESTIMATORS), "rollout.n=2", "trainer.steps=2"]
    overrides += ["trainer.eval_every=2", "rollout.batch_size=4", "ppo.minibatch_size=4", "ppo.epochs=1"]
    overrides += ["logging.progress_bar=false", "logging.wandb.mode=disabled", f"model.cache_dir={tiny_cache}"]
    result = subprocess.run(
        [sys.executable, "train.py", *overrides, f"hydra.sweep.dir={tmp_path}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    for job, estimator in enumerate(ADVANTAGE_ESTIMATORS):
        run_dir = tmp_path / str(job)
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        assert [row["step"] for row in rows] == [0, 1, 2], estimator
        assert all(math.isfinite(rows[-1][key]) for key in ("adv/mean", "loss/policy", "eval/score")), estimator
        value_keys = {key for row in rows for key in row if key.startswith("val/") or key == "loss/value"}
        weights = {path.name for path in (run_dir / "checkpoints" / "step-00000002").glob("*.safetensors")}
        status = json.loads((run_dir / "status.json").read_text())
        assert status["status"] == "completed", estimator
        if estimator == "gae":
            assert "val/explained_var" in value_keys and weights == {"actor.safetensors", "critic.safetensors"}
        else:
            assert not value_keys and weights == {"actor.safetensors"}, (estimator, value_keys, weights)
            assert "optim/critic_lr" not in rows[-1], estimator
