"""Rewards: the built-in task's scorer, non-finite scores, and the missing-EOS penalty."""

from __future__ import annotations

import math

import pytest
import torch

from rlhf.reward import FunctionReward, check_finite
from rlhf.run import build_trainer
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
    check_finite(torch.tensor([0.0, 1.0]), step=1)
    with pytest.raises(ValueError, match=r"step 7: the reward is not finite for sample\(s\) \[1, 3\]"):
        check_finite(torch.tensor([0.0, math.nan, 1.0, math.inf]), step=7)


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
