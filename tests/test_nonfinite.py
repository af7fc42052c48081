"""Non-finite rewards, losses and gradients: stop before any update, or mask / skip and count."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch

from rlhf.app.build import build_trainer
from rlhf.rewards.scorers import FunctionReward
from tests.helpers import REPO, wandb_inspect
from tests.stand_ins import nan_reward


def snapshot(module):
    return {n: p.detach().clone() for n, p in module.named_parameters()}


def test_masked_nonfinite_rewards_drop_their_samples(make_cfg):
    trainer, train_prompts, _ = build_trainer(make_cfg("reward.on_nonfinite=mask"))
    trainer.rollout.reward = FunctionReward(nan_reward)
    before = snapshot(trainer.actor)
    result = trainer.step(train_prompts[:8])
    metrics = result.metrics
    exp = result.experience
    assert metrics["objective/nonfinite_scores"] == 1
    assert not exp.action_mask[1].any() and exp.advantages[1].abs().sum() == 0 and exp.rewards[1].abs().sum() == 0
    assert all(exp.action_mask[i].any() for i in (0, 2, 3))
    assert math.isfinite(metrics["objective/scores"]) and math.isfinite(metrics["loss/policy"])
    assert any(not torch.equal(before[n], p) for n, p in trainer.actor.named_parameters())


def optimizer_steps(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [state["step"].clone() for state in optimizer.state.values()]


# A NaN in the advantages makes the policy loss non-finite, a NaN in the returns the value loss. The
# other model's loss stays finite, and its separate optimizer still steps (at the learning rate of
# the schedule's end, 0 in this one-step run).
@pytest.mark.parametrize(
    ("field", "skipped", "stepping"), [("advantages", "actor", "critic"), ("returns", "critic", "actor")]
)
def test_nonfinite_loss_skips_that_models_step_and_leaves_its_weights_bitwise(make_cfg, field, skipped, stepping):
    trainer, train_prompts, _ = build_trainer(make_cfg("ppo.epochs=2"))
    result = trainer.step(train_prompts[:8])
    exp = result.experience
    setattr(exp, field, torch.full_like(getattr(exp, field), math.nan))
    models, optimizers = {"actor": trainer.actor, "critic": trainer.critic}, trainer.optimizers()
    before = snapshot(models[skipped])
    steps = {name: optimizer_steps(optimizer) for name, optimizer in optimizers.items()}
    stats = trainer.ppo_update(exp)
    assert stats[f"optim/{skipped}_skipped_steps"] == 4  # 2 epochs x 2 mini-batches of 4
    assert stats[f"optim/{stepping}_skipped_steps"] == 0
    assert all(torch.equal(before[n], p) for n, p in models[skipped].named_parameters())
    assert optimizer_steps(optimizers[skipped]) == steps[skipped]
    assert optimizer_steps(optimizers[stepping]) == [n + 4 for n in steps[stepping]]


def test_too_many_skips_in_a_row_stop_the_run(make_cfg):
    trainer, train_prompts, _ = build_trainer(make_cfg("ppo.epochs=2", "ppo.max_consecutive_skips=3"))
    result = trainer.step(train_prompts[:8])
    exp = result.experience
    exp.advantages = torch.full_like(exp.advantages, math.inf)
    with pytest.raises(
        FloatingPointError, match=r"\(actor\): 3 optimizer steps in a row were skipped .*max_consecutive_skips=3"
    ):
        trainer.ppo_update(exp)


@pytest.mark.slow  # a CLI run; not slow: the in-process tests above
def test_a_nan_reward_stops_the_run_before_any_update_and_finishes_wandb_as_failed(tmp_path, tiny_cache):
    result = subprocess.run(
        [sys.executable, "train.py", "reward.fn._target_=tests.stand_ins.nan_reward",
         "--allow-target", "tests.stand_ins", "trainer.steps=3", "rollout.batch_size=8",
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
