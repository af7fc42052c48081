"""LoRA: only adapters (and the value head) train, the base stays bitwise equal, the reference is
the same weights with adapters off, and the base model is held once."""

from __future__ import annotations

import pytest
import torch

from rlhf.app.build import build_trainer, resolve_actor_paths
from rlhf.config.errors import ConfigError
from rlhf.config.validate import validate
from rlhf.models.loading import load_actor
from rlhf.ppo.experience import compute_logprobs
from tests.helpers import compose


def test_lora_trains_adapters_only_and_keeps_one_base_copy(make_cfg):
    cfg = make_cfg("model.lora.enabled=true", "model.shared_critic=true", "ppo.epochs=2")
    trainer, train_prompts, _ = build_trainer(cfg)
    params = dict(trainer.actor.named_parameters())
    adapters = {n for n in params if "lora_" in n}
    assert adapters and all(params[n].requires_grad == (n in adapters) for n in params)
    before = {n: p.detach().clone() for n, p in params.items()}
    head_before = trainer.critic.value_head.weight.detach().clone()

    result = trainer.step(train_prompts[:8])
    moved = {n for n, p in trainer.actor.named_parameters() if not torch.equal(before[n], p)}
    assert moved and moved <= adapters, "only adapter weights may change"
    assert any("lora_B" in n for n in moved)
    assert not torch.equal(head_before, trainer.critic.value_head.weight)

    # The reference is the untouched base model: same log-probs as a fresh load of the checkpoint.
    model_path, _ = resolve_actor_paths(cfg)
    base = load_actor(model_path, dtype="float32").eval()
    samples = result.samples
    torch.testing.assert_close(
        compute_logprobs(trainer.rollout.reference, samples, 1.0),
        compute_logprobs(base, samples, 1.0),
        rtol=0,
        atol=1e-5,
    )
    # ...while the actor with its trained adapters now differs from it.
    assert not torch.allclose(compute_logprobs(trainer.actor, samples, 1.0), compute_logprobs(base, samples, 1.0))

    # One copy of the base weights across actor, reference and critic.
    storages = {}
    for module in (trainer.actor, trainer.rollout.reference, trainer.critic):
        for p in module.parameters():
            storages[p.data_ptr()] = p.numel()
    base_numel = sum(p.numel() for p in base.parameters())
    adapter_numel = sum(params[n].numel() for n in adapters)
    head_numel = sum(p.numel() for p in trainer.critic.value_head.parameters())
    assert sum(storages.values()) == base_numel + adapter_numel + head_numel


def test_lora_run_saves_the_adapters_only(make_cfg, tmp_path):
    from rlhf.app.run import train

    train(make_cfg("model.lora.enabled=true", "model.shared_critic=true"))
    saved = {p.name for p in (tmp_path / "run" / "model").iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json"} <= saved
    assert "model.safetensors" not in saved


def test_lora_dropout_is_refused():
    # Adapter dropout made the update's forward differ from the rollout's (0.1: ratio_dev_first 0.004-0.08).
    overrides = ["model.lora.enabled=true", "model.shared_critic=true", "model.lora.dropout=0.05"]
    with pytest.raises(ConfigError, match=r"^model.lora.dropout=0.05 is not allowed: must be 0: PPO needs the same"):
        validate(compose(overrides))
    validate(compose([*overrides[:2], "model.lora.dropout=0"]))
