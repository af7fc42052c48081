"""Non-finite rewards, losses and gradients: stop before any update, or mask / skip and count."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch

from rlhf.build import build_trainer
from rlhf.reward import FunctionReward
from tests.conftest import REPO, wandb_inspect
from tests.stand_ins import nan_reward


def snapshot(module):
    return {n: p.detach().clone() for n, p in module.named_parameters()}


def test_masked_nonfinite_rewards_drop_their_samples(make_cfg):
    trainer, train_prompts, _ = build_trainer(make_cfg("reward.on_nonfinite=mask"))
    trainer.reward = FunctionReward(nan_reward)
    before = snapshot(trainer.actor)
    metrics = trainer.step(train_prompts[:8])
    exp = trainer.last_experience
    assert metrics["objective/nonfinite_scores"] == 1
    assert not exp.action_mask[1].any() and exp.advantages[1].abs().sum() == 0 and exp.rewards[1].abs().sum() == 0
    assert all(exp.action_mask[i].any() for i in (0, 2, 3))
    assert math.isfinite(metrics["objective/scores"]) and math.isfinite(metrics["loss/policy"])
    assert any(not torch.equal(before[n], p) for n, p in trainer.actor.named_parameters())


def test_nonfinite_loss_skips_the_step_and_leaves_weights_bitwise(make_cfg):
    trainer, train_prompts, _ = build_trainer(make_cfg("ppo.epochs=2"))
    trainer.step(train_prompts[:8])
    exp = trainer.last_experience
    exp.advantages = torch.full_like(exp.advantages, math.nan)
    actor = snapshot(trainer.actor)
    adam_steps = [s["step"].clone() for s in trainer.actor_optimizer.state.values()]
    critic_steps = [s["step"].clone() for s in trainer.critic_optimizer.state.values()]
    stats = trainer.ppo_update(exp)
    assert stats["optim/actor_skipped_steps"] == 4  # 2 epochs x 2 mini-batches of 4
    assert all(torch.equal(actor[n], p) for n, p in trainer.actor.named_parameters())
    assert [s["step"] for s in trainer.actor_optimizer.state.values()] == adam_steps
    # The critic's loss (returns and values) is finite: its separate optimizer still steps (at the
    # learning rate of the schedule's end, 0 in this one-step run).
    assert stats["optim/critic_skipped_steps"] == 0
    assert [s["step"] for s in trainer.critic_optimizer.state.values()] == [n + 4 for n in critic_steps]


def test_a_nonfinite_value_loss_skips_the_critic_step_only(make_cfg):
    trainer, train_prompts, _ = build_trainer(make_cfg("ppo.epochs=2"))
    trainer.step(train_prompts[:8])
    exp = trainer.last_experience
    exp.returns = torch.full_like(exp.returns, math.nan)
    critic = snapshot(trainer.critic)
    actor_steps = [s["step"].clone() for s in trainer.actor_optimizer.state.values()]
    stats = trainer.ppo_update(exp)
    assert stats["optim/critic_skipped_steps"] == 4 and stats["optim/actor_skipped_steps"] == 0
    assert all(torch.equal(critic[n], p) for n, p in trainer.critic.named_parameters())
    assert [s["step"] for s in trainer.actor_optimizer.state.values()] == [n + 4 for n in actor_steps]


def test_too_many_skips_in_a_row_stop_the_run(make_cfg):
    trainer, train_prompts, _ = build_trainer(make_cfg("ppo.epochs=2", "ppo.max_consecutive_skips=3"))
    trainer.step(train_prompts[:8])
    exp = trainer.last_experience
    exp.advantages = torch.full_like(exp.advantages, math.inf)
    with pytest.raises(
        FloatingPointError, match=r"\(actor\): 3 optimizer steps in a row were skipped .*max_consecutive_skips=3"
    ):
        trainer.ppo_update(exp)


def test_a_nan_reward_stops_the_run_before_any_update_and_finishes_wandb_as_failed(tmp_path, tiny_cache):
    result = subprocess.run(
        [sys.executable, "train.py", "reward.fn._target_=tests.stand_ins.nan_reward",
         "trainer.allowed_targets=[tests.stand_ins.]", "trainer.steps=3", "rollout.batch_size=8",
         "ppo.minibatch_size=4", "logging.wandb.mode=offline", "logging.progress_bar=false",
         f"hydra.run.dir={tmp_path}"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 1
    assert "held-out evaluation after step 0: the reward is not finite for sample(s) [1]" in result.stderr
    assert "last complete checkpoint: none" in result.stdout
    (state,) = wandb_inspect(tmp_path, "--summary")
    assert state["state"] == "failed" and state["exit_code"] == 1
    assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "model").exists()
