"""The seed's presets (model=qwen2.5-0.5b-instruct, reward=deberta-v3-large-v2) through their exact
code path, with tiny models of the same architectures saved locally in place of the hub weights."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rlhf.app.build import build_trainer
from rlhf.models.generation import generate
from rlhf.models.loading import load_actor, load_tokenizer
from tests.stand_ins import qwen_token_ids, save_tiny_deberta_reward_model, save_tiny_qwen

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
    assert type(trainer.rollout.reward.tokenizer).__name__ == "DebertaV2Tokenizer"
    seen = []
    trainer.rollout.reward.model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["input_ids"].clone()), with_kwargs=True
    )
    weights = {n: p.detach().clone() for n, p in trainer.actor.named_parameters()}
    result = trainer.step(train_prompts[:8])
    samples = result.samples
    # The RM saw "[CLS] question [SEP] answer [SEP]" built from the decoded actor response.
    texts = trainer.rollout.reward.tokenizer.batch_decode(torch.cat(seen), skip_special_tokens=False)
    rm_tok = trainer.rollout.reward.tokenizer
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
    trainer.rollout.reward.fn = lambda prompts, responses: [float(len(r)) for r in responses]
    metrics = trainer.step(train_prompts[:8]).metrics
    assert metrics["rollout/response_length"] > 0


def test_gradient_checkpointing_switch(make_cfg, stand_ins):
    trainer, _, _ = build_trainer(preset_cfg(make_cfg, stand_ins, "hardware.gradient_checkpointing=true"))
    assert trainer.actor.is_activation_checkpointing
    assert trainer.critic.backbone.is_activation_checkpointing


@pytest.mark.parametrize("experiment", ["lm_human_preferences", "n_implementation_details", "ppo_max"])
def test_experiment_presets_run_a_step(make_cfg, experiment, reward_model_dir):
    # The tiny actor with a Qwen2 reward model on its own vocabulary, so critic_init=reward_model works.
    cfg = make_cfg(
        f"experiment={experiment}", "reward=classifier", f"reward.path={reward_model_dir}",
        "rollout.max_new_tokens=6", "rollout.batch_size=8",
    )  # fmt: skip
    trainer, train_prompts, _ = build_trainer(cfg)
    result = trainer.step(train_prompts[:8])
    metrics = result.metrics
    assert metrics["objective/kl_coef"] == cfg.kl.beta
    if experiment == "lm_human_preferences":
        assert trainer.critic.backbone is trainer.actor.base_model and trainer.critic_optimizer is None
    else:
        assert cfg.model.critic_init == "reward_model"
    if experiment == "ppo_max":
        assert result.experience.advantages.abs().max() <= 0.5
        assert trainer.actor_optimizer.param_groups[0]["betas"] == (0.9, 0.95)


@pytest.mark.parametrize("experiment", ["lm_human_preferences", "n_implementation_details", "ppo_max"])
def test_experiment_presets_run_with_the_seeds_reward_model(make_cfg, stand_ins, experiment, caplog):
    # A Qwen2 actor and a DeBERTa-v2 reward model on its own sentencepiece vocabulary: the critic cannot
    # start from the reward model, so the presets that ask for it fall back to the actor's trunk, with a note.
    cfg = preset_cfg(make_cfg, stand_ins, f"experiment={experiment}")
    with caplog.at_level("WARNING", logger="rlhf.app.build"):
        trainer, train_prompts, _ = build_trainer(cfg)
    metrics = trainer.step(train_prompts[:8]).metrics
    assert metrics["objective/kl_coef"] == cfg.kl.beta
    assert type(trainer.critic.backbone).__name__ == "Qwen2Model"
    notes = [r.getMessage() for r in caplog.records if "model.critic_init=reward_model" in r.getMessage()]
    if experiment == "lm_human_preferences":
        assert notes == [] and trainer.critic.backbone is trainer.actor.base_model
    else:
        assert len(notes) == 1 and "the critic starts from the actor instead" in notes[0]
        assert trainer.critic.backbone is not trainer.actor.base_model


@pytest.mark.slow  # a CLI run; the presets in-process: test_experiment_presets_...
def test_readme_preset_command_runs_with_the_tiny_actor(stand_ins, tiny_cache, tmp_path):
    # README's example, `python train.py experiment=n_implementation_details reward=deberta-v3-large-v2
    # reward.path=DIR`, on the default tiny actor: the note comes before any model is loaded.
    result = subprocess.run(
        [sys.executable, "train.py", "experiment=n_implementation_details", "reward=deberta-v3-large-v2",
         f"reward.path={stand_ins['reward']}", f"model.cache_dir={tiny_cache}", "trainer.steps=1",
         "rollout.batch_size=8", "ppo.minibatch_size=4", "ppo.epochs=1", "logging.progress_bar=false",
         "logging.wandb.mode=disabled", f"hydra.run.dir={tmp_path / 'run'}"],
        cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert "the critic starts from the actor instead (model.critic_init=actor)" in result.stderr + result.stdout
    assert "held-out reward (sampled)" in result.stdout


def test_critic_from_a_reward_model_on_the_actors_vocabulary(make_cfg, stand_ins, tmp_path):
    # A Qwen2 reward model on the actor's own tokenizer: critic_init=reward_model keeps its trunk.
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForSequenceClassification

    rm_dir = tmp_path / "qwen-rm"
    tokenizer = AutoTokenizer.from_pretrained(stand_ins["actor"])
    tokenizer.save_pretrained(rm_dir)
    config = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=16, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
        intermediate_size=32, num_labels=1, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    Qwen2ForSequenceClassification(config).save_pretrained(rm_dir)
    cfg = preset_cfg(make_cfg, stand_ins, "experiment=ppo_max", "reward=classifier", f"reward.path={rm_dir}")
    trainer, train_prompts, _ = build_trainer(cfg)
    assert trainer.critic.backbone.config.hidden_size == 16  # the reward model's trunk, not the actor's (32)
    trainer.step(train_prompts[:8])


def test_dropout_of_the_checkpoint_is_off_in_all_four_models(make_cfg, stand_ins, tmp_path):
    # attention_dropout is a float Qwen2 attention passes to its kernel in training mode; DeBERTa-v2's
    # config has hidden_dropout_prob and attention_probs_dropout_prob 0.1 by default.
    actor_dir = save_tiny_qwen(tmp_path / "qwen-dropout", attention_dropout=0.1)
    cfg = preset_cfg(make_cfg, {**stand_ins, "actor": actor_dir}, "ppo.epochs=2")
    trainer, train_prompts, _ = build_trainer(cfg)
    metrics = trainer.step(train_prompts[:8]).metrics
    # The first mini-batch's forward is the rollout's: ratio 1 up to float error (it was 0.013 with dropout on).
    assert metrics["policy/ratio_dev_first"] < 1e-5
    for model in (trainer.actor, trainer.rollout.reference, trainer.critic, trainer.rollout.reward.model):
        for module in model.modules():
            rates = {k: v for k, v in vars(module).items() if "dropout" in k and isinstance(v, float)}
            if hasattr(module, "config"):
                rates |= {k: v for k, v in vars(module.config).items() if "dropout" in k and isinstance(v, float)}
            assert not any(rates.values()), (type(module).__name__, rates)
            assert getattr(module, "p", 0.0) == 0.0 or not isinstance(module, torch.nn.Dropout)


QWEN_GENERATION = {
    "eos_token_id": ["<|im_end|>", "<|endoftext|>"], "do_sample": True, "top_k": 20, "top_p": 0.8,
    "repetition_penalty": 1.05, "temperature": 0.7,
}  # fmt: skip


def test_every_eos_of_the_generation_config_ends_a_response(tmp_path):
    # Qwen2.5-Instruct's generation_config stops on <|im_end|> (the tokenizer's EOS) and <|endoftext|>.
    # Uniform next-token probabilities (1/259) so both EOS ids and every other token come up.
    path = save_tiny_qwen(tmp_path / "qwen", generation=QWEN_GENERATION, uniform=True)
    ids = qwen_token_ids(path)
    tokenizer = load_tokenizer(str(path))
    actor = load_actor(str(path), dtype="float32")
    torch.manual_seed(0)
    samples = generate(actor, tokenizer, ["Say hi."] * 64, max_new_tokens=24, temperature=1.0, max_prompt_length=32)
    responses = samples.sequences[:, -samples.num_actions :]
    eos = torch.tensor([ids["<|im_end|>"], ids["<|endoftext|>"]])
    ended_on = []
    for row in range(len(responses)):
        n = int(samples.action_mask[row].sum())
        first = torch.isin(responses[row], eos).nonzero().flatten().tolist()
        if first and first[0] < n:  # an EOS among the actions is the last action
            assert first[0] == n - 1 and not samples.truncated[row]
            ended_on.append(int(responses[row, n - 1]))
        else:
            assert samples.truncated[row] and n == samples.num_actions
    assert ids["<|endoftext|>"] in ended_on and ids["<|im_end|>"] in ended_on
    # None of the shipped sampling settings leaks in: top_k=20 would leave 20 distinct tokens.
    assert len(set(responses[samples.action_mask].tolist())) > 100


def test_saved_model_keeps_the_shipped_generation_config(make_cfg, stand_ins, tmp_path):
    from rlhf.app.run import train

    actor_dir = save_tiny_qwen(tmp_path / "qwen-gen", generation=QWEN_GENERATION)
    train(preset_cfg(make_cfg, {**stand_ins, "actor": actor_dir}))
    saved = json.loads((tmp_path / "run" / "model" / "generation_config.json").read_text())
    shipped = json.loads((actor_dir / "generation_config.json").read_text())
    assert {k: v for k, v in saved.items() if k != "pad_token_id"} == {
        k: v for k, v in shipped.items() if k != "pad_token_id"
    }
    ids = qwen_token_ids(actor_dir)
    assert saved["top_k"] == 20 and saved["eos_token_id"] == [ids["<|im_end|>"], ids["<|endoftext|>"]]


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


def test_a_generation_config_that_could_not_be_saved_back_is_replaced(make_cfg, stand_ins, tmp_path):
    # A published config transformers only warns about on load (temperature without do_sample) but refuses
    # to save once changed (the run sets its pad id): the final save must not fail on it.
    from rlhf.app.run import train

    actor_dir = save_tiny_qwen(tmp_path / "qwen-odd", generation={"eos_token_id": ["<|im_end|>"]})
    path = actor_dir / "generation_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "do_sample": False, "temperature": 0.7}))
    train(preset_cfg(make_cfg, {**stand_ins, "actor": actor_dir}))
    saved = json.loads((tmp_path / "run" / "model" / "generation_config.json").read_text())
    assert "temperature" not in saved and saved["eos_token_id"] == [qwen_token_ids(actor_dir)["<|im_end|>"]]
