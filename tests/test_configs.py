"""Every config option composes, validates and instantiates; open maps stay open; a bad config is refused
without importing torch; logged configs hide environment values. The bad overrides themselves are the one
table in tests/test_bad_inputs.py."""

from __future__ import annotations

import subprocess
import sys

import hydra
import pytest
import torch

from rlhf.config.redact import loggable_config
from rlhf.config.validate import validate
from tests.helpers import CONF_DIR, REPO, compose

GROUPS = ["model", "reward", "kl", "gae", "optimizer", "hardware", "data", "experiment", "sweep"]
# Options that need a value only the user can give.
REQUIRED = {
    ("reward", "classifier"): ["reward.path=/some/reward-model"],
    ("data", "dataset"): ["data.path=some/hub-dataset"],
    ("reward", "http"): ["reward.url=http://127.0.0.1:8000/score"],
    ("experiment", "n_implementation_details"): ["reward=classifier", "reward.path=/some/reward-model"],
    ("experiment", "ppo_max"): ["reward=classifier", "reward.path=/some/reward-model"],
    # The reviews task's rewards are for its prompts, whose responses need room for a sentence.
    ("reward", "proxy"): ["data=reviews", "rollout.max_new_tokens=22"],
    ("reward", "gold"): ["data=reviews", "rollout.max_new_tokens=22"],
    ("data", "reviews"): ["rollout.max_new_tokens=22"],
}
OPTIONS = [(group, path.stem) for group in GROUPS for path in sorted((CONF_DIR / group).glob("*.yaml"))]


@pytest.mark.parametrize(("group", "option"), OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_every_option_composes_and_validates(group, option):
    extra = REQUIRED.get((group, option), [])
    cfg = compose([f"{group}={option}", *extra])
    validate(cfg)
    params = [torch.nn.Parameter(torch.zeros(2))]
    for name in ("actor", "critic"):
        optimizer = hydra.utils.instantiate(cfg.optimizer[name])(params)
        assert isinstance(optimizer, torch.optim.Optimizer)


def test_every_key_has_a_comment():
    # Each leaf key ("key: value") has a comment on the line above (the style guide's YAML rule).
    missing = []
    for path in CONF_DIR.rglob("*.yaml"):
        lines = path.read_text().splitlines()
        for i, line in enumerate(lines):
            key, colon, value = line.strip().partition(":")
            is_leaf = colon and value.strip() and not key.startswith(("#", "-"))
            if is_leaf and key not in ("_target_", "_partial_") and not lines[i - 1].strip().startswith("#"):
                missing.append(f"{path.relative_to(CONF_DIR)}:{i + 1} {key}")
    assert not missing, missing


def test_open_maps_stay_open():
    # Any header, any argument of the reward callable and of the optimizers: theirs to accept or refuse.
    cfg = compose(["+reward.headers.X-Trace=1", "+reward.fn.scale=2", "+optimizer.actor.amsgrad=true"])
    validate(cfg)
    optimizer = hydra.utils.instantiate(cfg.optimizer.actor)([torch.nn.Parameter(torch.zeros(2))])
    assert optimizer.defaults["amsgrad"] is True


# What train.py needs before it imports torch to refuse a bad config: compose, then validate.
NO_TORCH_SCRIPT = """
import sys, time
started = time.perf_counter()
from hydra import compose, initialize_config_dir
from rlhf.config.errors import ConfigError
from rlhf.config.schema import register_configs
from rlhf.config.validate import validate
register_configs()
with initialize_config_dir(config_dir=sys.argv[1], version_base="1.3"):
    cfg = compose(config_name="train", overrides=sys.argv[2:])
try:
    validate(cfg)
except ConfigError as error:
    print(error)
print(sorted({"torch", "transformers"} & set(sys.modules)), f"in {time.perf_counter() - started:.2f} s")
"""


def test_config_errors_need_neither_torch_nor_transformers():
    for override in ("+kl.betta=0.5", "optimizer.scheduler.end_factor=2"):
        command = [sys.executable, "-c", NO_TORCH_SCRIPT, str(CONF_DIR), override]
        result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
        print(override, "->", result.stdout)  # the time, for the record (-s)
        error, modules = result.stdout.splitlines()
        assert error.startswith(override.lstrip("+") + " is not allowed"), result.stderr[-2000:]
        assert modules.startswith("[] in"), modules


def test_loggable_config_redacts_values_read_from_the_environment(monkeypatch):
    monkeypatch.setenv("REWARD_API_TOKEN", "s3cret")
    cfg = compose([
        "reward=http", "reward.url=http://127.0.0.1:1/score", "trainer.steps=7",
        "+reward.headers.Authorization='Bearer ${oc.env:REWARD_API_TOKEN}'",
        "logging.wandb.entity=${oc.env:REWARD_API_TOKEN,fallback}",
    ])  # fmt: skip
    assert cfg.reward.headers.Authorization == "Bearer s3cret"  # the run itself sees the value
    logged = loggable_config(cfg)
    assert logged["reward"]["headers"] == {"Authorization": "Bearer <env REWARD_API_TOKEN>"}
    assert logged["logging"]["wandb"]["entity"] == "<env REWARD_API_TOKEN>"
    assert logged["optimizer"]["scheduler"]["total_iters"] == 7  # other interpolations are resolved
    assert "s3cret" not in str(logged)


def test_keys_of_open_maps_and_group_paths_pass_the_key_check():
    from rlhf.config.overrides import check_keys

    conf = REPO / "conf"
    check_keys(["+reward.headers.X-Trace=1", "+reward.fn.scale=2", "optimizer.actor.lr=1e-4"], conf_dir=conf)
    check_keys(["hydra/launcher=joblib", "experiment=ppo_max", "kl=fixed,adaptive", "~kl.target"], conf_dir=conf)
    check_keys(["model=my_own_model"], conf_dir=None)  # options from another --config-dir: not checked
