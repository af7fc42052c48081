"""The seed's presets (model=qwen2.5-0.5b-instruct, reward=deberta-v3-large-v2) through their exact
code path, with tiny models of the same architectures saved locally in place of the hub weights."""

from __future__ import annotations

import json

import pytest
import torch

from rlhf.build import build_trainer
from tests.stand_ins import save_tiny_deberta_reward_model, save_tiny_qwen
from tests.test_train import reward_model_dir  # noqa: F401 (fixture: Qwen2 classifier on the tiny tokenizer)

QUESTIONS = ["What is 2+3?", "Name a colour.", "Say hi.", "What is 10-4?", "Count to three.", "Is ice cold?"] * 2


@pytest.fixture(scope="module")
def stand_ins(tmp_path_factory):
    root = tmp_path_factory.mktemp("stand-ins")
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": q}) + "\n" for q in QUESTIONS))
    return {
        "actor": save_tiny_qwen(root / "qwen"),
        "reward": save_tiny_deberta_reward_model(root / "rm", root / "spm-work"),
        "prompts": prompts,
        "root": root,
    }


def preset_cfg(make_cfg, stand_ins, *extra):
    return make_cfg(
        "model=qwen2.5-0.5b-instruct", f"model.path={stand_ins['actor']}", "model.dtype=float32",
        "reward=deberta-v3-large-v2", f"reward.path={stand_ins['reward']}",
        "data=dataset", f"data.path={stand_ins['prompts']}", "data.num_eval=2", "data.max_prompt_length=64",
        f"data.cache_dir={stand_ins['root'] / 'datasets-cache'}", "rollout.max_new_tokens=8", *extra,
    )  # fmt: skip


def test_presets_train_with_the_reward_model_reading_its_own_tokens(make_cfg, stand_ins):
    trainer, train_prompts, _ = build_trainer(preset_cfg(make_cfg, stand_ins))
    assert type(trainer.tokenizer).__name__ == "Qwen2Tokenizer"
    assert type(trainer.reward.tokenizer).__name__ == "DebertaV2Tokenizer"
    seen = []
    trainer.reward.model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["input_ids"].clone()), with_kwargs=True
    )
    weights = {n: p.detach().clone() for n, p in trainer.actor.named_parameters()}
    trainer.step(train_prompts[:8])
    samples = trainer.last_samples
    # The RM saw "[CLS] question [SEP] answer [SEP]" built from the decoded actor response.
    texts = trainer.reward.tokenizer.batch_decode(torch.cat(seen), skip_special_tokens=False)
    rm_tok = trainer.reward.tokenizer
    for text, prompt, response in zip(texts, samples.prompts, samples.responses, strict=True):
        expected = rm_tok.decode(rm_tok(prompt, response)["input_ids"])
        assert text.replace(rm_tok.pad_token, "").strip() == expected
        assert text.startswith(f"[CLS] {prompt}[SEP]")
    # The text the RM scored is exactly the sampled actions, decoded without special tokens, and
    # nothing after the EOS (padding) made it in.
    for i, response in enumerate(samples.responses):
        tokens = samples.sequences[i, -samples.num_actions :][samples.action_mask[i]]
        assert response == trainer.tokenizer.decode(tokens, skip_special_tokens=True)
    assert any(not torch.equal(weights[n], p) for n, p in trainer.actor.named_parameters())


def test_actor_without_pad_token_gets_one_and_trains(make_cfg, stand_ins, tmp_path):
    actor_dir = save_tiny_qwen(tmp_path / "qwen-no-pad", pad_token=None)
    cfg = preset_cfg(make_cfg, {**stand_ins, "actor": actor_dir}, "reward=arithmetic")
    trainer, train_prompts, _ = build_trainer(cfg)
    pad = trainer.tokenizer.pad_token_id
    assert trainer.tokenizer.pad_token == "<|pad|>" and pad != trainer.tokenizer.eos_token_id
    assert trainer.actor.get_input_embeddings().num_embeddings > pad
    assert trainer.actor.config.pad_token_id == pad
    trainer.reward.fn = lambda prompts, responses: [float(len(r)) for r in responses]
    metrics = trainer.step(train_prompts[:8])
    assert metrics["rollout/response_length"] > 0


def test_gradient_checkpointing_switch(make_cfg, stand_ins):
    trainer, _, _ = build_trainer(preset_cfg(make_cfg, stand_ins, "hardware.gradient_checkpointing=true"))
    assert trainer.actor.is_activation_checkpointing
    assert trainer.critic.backbone.is_activation_checkpointing


@pytest.mark.parametrize("experiment", ["lm_human_preferences", "n_implementation_details", "ppo_max"])
def test_experiment_presets_run_a_step(make_cfg, experiment, reward_model_dir):  # noqa: F811
    # The tiny actor with a Qwen2 reward model on its own vocabulary, so critic_init=reward_model works.
    cfg = make_cfg(
        f"experiment={experiment}", "reward=classifier", f"reward.path={reward_model_dir}",
        "rollout.max_new_tokens=6", "rollout.batch_size=8",
    )  # fmt: skip
    trainer, train_prompts, _ = build_trainer(cfg)
    metrics = trainer.step(train_prompts[:8])
    assert metrics["objective/kl_coef"] == cfg.kl.beta
    if experiment == "lm_human_preferences":
        assert trainer.critic.backbone is trainer.actor.base_model and trainer.critic_optimizer is None
    else:
        assert cfg.model.critic_init == "reward_model"
    if experiment == "ppo_max":
        assert trainer.last_experience.advantages.abs().max() <= 0.5
        assert trainer.actor_optimizer.param_groups[0]["betas"] == (0.9, 0.95)


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["model=qwen2.5-0.5b-instruct", "model.path=/no/such/model"], "model.path"),
        (["reward=deberta-v3-large-v2", "reward.path=/no/such/reward-model"], "reward.path"),
    ],
)
def test_missing_checkpoints_name_the_key(make_cfg, overrides, key):
    with pytest.raises(ValueError, match=rf"^{key}='/no/such/[a-z-]+' could not be loaded"):
        build_trainer(make_cfg(*overrides))
