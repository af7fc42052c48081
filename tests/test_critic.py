"""Critic initialisation: a copy of the actor, the reward model's trunk, a checkpoint, or shared."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModel

from rlhf.app.build import build_trainer
from tests.stand_ins import save_tiny_deberta_reward_model


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    pb = dict(b.named_parameters())
    return all(torch.equal(p, pb[name]) for name, p in a.named_parameters())


def test_default_critic_is_a_copy_of_the_actor_trunk(make_cfg):
    trainer, _, _ = build_trainer(make_cfg())
    assert trainer.critic.backbone is not trainer.actor.base_model
    assert same_weights(trainer.critic.backbone, trainer.actor.base_model)
    hidden = trainer.actor.config.hidden_size
    assert trainer.critic.value_head.weight.std().item() == pytest.approx(1 / (hidden + 1), rel=0.3)


def test_critic_from_the_reward_model_trunk_with_a_zero_head(make_cfg, reward_model_dir):
    trainer, train_prompts, _ = build_trainer(make_cfg(
        "reward=classifier", f"reward.path={reward_model_dir}", "model.critic_init=reward_model",
        "model.value_head_std=0",
    ))  # fmt: skip
    assert same_weights(trainer.critic.backbone, AutoModel.from_pretrained(reward_model_dir))
    assert trainer.critic.backbone is not trainer.rollout.reward.model.base_model
    result = trainer.step(train_prompts[:8])
    # A zero head gives V = 0 everywhere before the first update.
    assert result.experience.old_values.abs().max().item() == 0.0


def test_critic_from_a_checkpoint_path(make_cfg, reward_model_dir):
    trainer, _, _ = build_trainer(make_cfg("model.critic_init=path", f"model.critic_path={reward_model_dir}"))
    assert same_weights(trainer.critic.backbone, AutoModel.from_pretrained(reward_model_dir))


def test_critic_on_another_vocabulary_is_refused(make_cfg, tmp_path):
    # (critic_init=reward_model falls back to the actor instead: tests/test_presets.py)
    rm = save_tiny_deberta_reward_model(tmp_path / "rm", tmp_path / "work")
    cfg = make_cfg("model.critic_init=path", f"model.critic_path={rm}")
    with pytest.raises(ValueError, match="does not share the actor's vocabulary"):
        build_trainer(cfg)
