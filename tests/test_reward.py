"""Rewards: the built-in task's scorer, non-finite scores, and the missing-EOS penalty."""

from __future__ import annotations

import math

import pytest
import torch

from rlhf.build import build_trainer
from rlhf.reward import FunctionReward, HTTPReward, RewardNormalizer, check_finite
from rlhf.tasks.arithmetic import exact_match_reward, solve, split_prompts


def test_exact_match_reward():
    assert solve("12+7=") == "19"
    assert exact_match_reward(["12+7=", "3+4=", "0+0="], ["19", " 7 ", "00"]) == [1.0, 1.0, 0.0]
    with pytest.raises(ValueError, match="not an addition prompt"):
        solve("hello")


def test_split_is_disjoint_and_covers_every_prompt():
    train, held_out = split_prompts(max_operand=9, num_eval=20, seed=3)
    assert len(held_out) == 20 and len(train) == 80
    assert not set(train) & set(held_out)


def test_non_finite_scores_stop_the_step_naming_the_samples():
    check_finite(torch.tensor([0.0, 1.0]), "step 1")
    with pytest.raises(ValueError, match=r"step 7: the reward is not finite for sample\(s\) \[1, 3\]"):
        check_finite(torch.tensor([0.0, math.nan, 1.0, math.inf]), "step 7")


def nan_for_second(prompts, responses):
    return [math.nan if i == 1 else 1.0 for i in range(len(prompts))]


def test_nan_reward_fails_before_any_update(make_cfg):
    trainer, train_prompts, _ = build_trainer(make_cfg())
    trainer.reward = FunctionReward(nan_for_second)
    before = {n: p.detach().clone() for n, p in trainer.actor.named_parameters()}
    with pytest.raises(ValueError, match=r"sample\(s\) \[1\]"):
        trainer.step(train_prompts[:8])
    assert all(torch.equal(before[n], p) for n, p in trainer.actor.named_parameters())


def test_missing_eos_penalty_replaces_truncated_scores(make_cfg):
    # One new token: every response is cut before it can end, except a lone EOS.
    trainer, train_prompts, _ = build_trainer(make_cfg("rollout.max_new_tokens=1", "reward.missing_eos_penalty=-1"))
    samples = trainer.generate(train_prompts[:8])
    scores = trainer.score(samples)
    assert samples.truncated.any()
    assert (scores[samples.truncated] == -1).all()
    assert (scores[~samples.truncated] != -1).all()


def test_http_reward_batches_and_retries(server_factory):
    server = server_factory(failures=2)
    reward = HTTPReward(server.url, timeout=5, retries=2, batch_size=2)
    scores = reward(["p1", "p2", "p3"], ["a", "bbb", "cc"])
    assert scores.tolist() == [1.0, 3.0, 2.0]
    # Two failed attempts, then the two batches: ["a", "bbb"] and ["cc"].
    assert [r["responses"] for r in server.requests] == [["a", "bbb"]] * 3 + [["cc"]]
    assert server.requests[-1]["prompts"] == ["p3"]


def test_http_reward_errors_name_the_url(server_factory):
    failing = server_factory(failures=10)
    with pytest.raises(RuntimeError, match=rf"reward.url='{failing.url}' failed 2 time"):
        HTTPReward(failing.url, timeout=5, retries=1, batch_size=8)(["p"], ["a"])
    miscounting = server_factory(wrong_count=True)
    with pytest.raises(RuntimeError, match="returned 2 scores for 1 responses"):
        HTTPReward(miscounting.url, timeout=5, retries=0, batch_size=8)(["p"], ["a"])


def test_training_with_an_http_reward(make_cfg, server_factory):
    server = server_factory()
    trainer, train_prompts, _ = build_trainer(make_cfg("reward=http", f"reward.url={server.url}"))
    metrics = trainer.step(train_prompts[:8])
    assert metrics["objective/scores"] == pytest.approx(sum(len(r) for r in trainer.last_samples.responses) / 8)
    assert server.requests[0]["prompts"] == trainer.last_samples.prompts


def test_running_normalizer_matches_numpy_over_all_batches():
    import numpy as np

    normalizer = RewardNormalizer("running")
    gen = torch.Generator().manual_seed(0)
    seen = []
    for size in (5, 1, 9):
        batch = 3 + 2 * torch.randn(size, generator=gen)
        seen.append(batch)
        out = normalizer(batch)
        everything = torch.cat(seen).double().numpy()
        expected = (batch.double().numpy() - everything.mean()) / everything.std(ddof=1)
        np.testing.assert_allclose(out.numpy(), expected, rtol=1e-5, atol=1e-5)


def test_fixed_normalizer_and_clip():
    out = RewardNormalizer("fixed", gain=2.0, bias=-1.0, clip=2.5)(torch.tensor([0.0, 1.0, 3.0, -4.0]))
    # 2 * [0, 1, 3, -4] - 1 = [-1, 1, 5, -9] -> clipped to [-2.5, 2.5]
    assert out.tolist() == [-1.0, 1.0, 2.5, -2.5]
    assert RewardNormalizer("none")(torch.tensor([7.0])).tolist() == [7.0]


def test_normalized_training_rewards_keep_raw_scores_in_metrics(make_cfg):
    trainer, train_prompts, _ = build_trainer(make_cfg("reward.normalize=fixed", "reward.gain=10", "reward.bias=1"))
    metrics = trainer.step(train_prompts[:8])
    raw = metrics["objective/scores"]
    assert 0.0 <= raw <= 1.0
    assert metrics["objective/scores_normalized"] == pytest.approx(10 * raw + 1)
