"""Every config option composes, validates and instantiates; bad overrides fail fast, naming the key."""

from __future__ import annotations

import re
import subprocess
import sys
import time

import hydra
import pytest
import torch
from hydra.errors import ConfigCompositionException
from omegaconf.errors import OmegaConfBaseException

from rlhf.config.errors import ConfigError
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


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("gae.lam=1.5", "gae.lam"),
        ("gae.gamma=-0.1", "gae.gamma"),
        ("ppo.clip_eps=0", "ppo.clip_eps"),
        ("kl.beta=-1", "kl.beta"),
        ("ppo.epochs=0", "ppo.epochs"),
        ("ppo.minibatch_size=5", "ppo.minibatch_size"),
        ("kl.estimator=k4", "kl.estimator"),
        ("kl.controller=pid", "kl.controller"),
        ("rollout.temperature=0", "rollout.temperature"),
        ("logging.wandb.mode=cloud", "logging.wandb.mode"),
        ("model.dtype=int8", "model.dtype"),
        ("data.num_eval=0", "data.num_eval"),
        ("kl.beta=inf", "kl.beta"),
        ("reward.gain=nan", "reward.gain"),
        ("seed=-1", "seed"),
        ("optimizer.actor.lr=-1", "optimizer.actor.lr"),
        ("optimizer.critic.eps=0", "optimizer.critic.eps"),
        ("optimizer.scheduler.end_factor=2", "optimizer.scheduler.end_factor"),
        ("data.max_operand=100000", "data.max_operand"),
        ("model.tiny.intermediate_size=1000000", "model.tiny.intermediate_size"),
    ],
)
def test_out_of_range_values_name_the_key(override, key):
    cfg = compose([override])
    with pytest.raises(ConfigError, match=rf"^{key}="):
        validate(cfg)


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("kl.beta=abc", "kl.beta"),
        ("gae.lam=high", "gae.lam"),
        ("ppo.epochs=1.5", "ppo.epochs"),
        ("kl.betta=1", "betta"),
    ],
)
def test_wrong_types_and_unknown_keys_fail_at_composition(override, key):
    with pytest.raises((ConfigCompositionException, OmegaConfBaseException)) as info:
        compose([override])
    assert key in str(info.value) + str(info.value.__cause__)


def test_unknown_keys_added_with_plus_are_refused_but_open_maps_stay_open():
    for override in ("+kl.betta=0.5", "++kl.betta=0.5"):
        with pytest.raises(ConfigError, match=r"^kl\.betta=0\.5 is not allowed: unknown key.*did you mean kl\.beta\?"):
            validate(compose([override]))
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


def test_adaptive_controller_needs_target():
    with pytest.raises(ConfigError, match="kl.target"):
        validate(compose(["kl=adaptive", "kl.target=null"]))


@pytest.mark.parametrize(("override", "key"), [("gae.lam=1.5", "gae.lam"), ("kl.beta=abc", "kl.beta")])
def test_command_line_fails_fast_naming_the_key(override, key, tmp_path):
    started = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "train.py", override, f"hydra.run.dir={tmp_path}"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    elapsed = time.perf_counter() - started
    assert result.returncode != 0
    assert key in result.stderr
    # Nothing was built: no metrics file and no W&B run in the run dir.
    assert not (tmp_path / "metrics.jsonl").exists()
    assert not (tmp_path / "wandb").exists()
    assert elapsed < 60, elapsed


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


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["kl.betta=0.1"], "error: kl.betta=0.1 is not allowed: unknown key .*did you mean kl.beta\\?"),
        (["+ppo.clip=0.1"], "error: ppo.clip=0.1 is not allowed: unknown key .*did you mean ppo.clip_eps\\?"),
        (["kl=adaptve"], "error: kl='adaptve' is not allowed: no such option .*did you mean kl=adaptive\\?"),
        (["-m", "kl=fixed,adaptve"], "did you mean kl=adaptive\\?"),
    ],
)
def test_misspelt_keys_and_options_get_a_did_you_mean_before_hydra_runs(overrides, message, tmp_path):
    # Hydra itself answers `kl.betta=0.1` with "use +kl.betta=0.1": a key nothing reads.
    result = subprocess.run(
        [sys.executable, "train.py", *overrides, f"hydra.run.dir={tmp_path}", f"hydra.sweep.dir={tmp_path}"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert re.search(message, result.stderr), result.stderr
    assert "Traceback" not in result.stderr
    assert not any(tmp_path.iterdir())  # refused before Hydra made a run dir


def test_keys_of_open_maps_and_group_paths_pass_the_key_check():
    from rlhf.config.overrides import check_keys

    conf = REPO / "conf"
    check_keys(["+reward.headers.X-Trace=1", "+reward.fn.scale=2", "optimizer.actor.lr=1e-4"], conf_dir=conf)
    check_keys(["hydra/launcher=joblib", "experiment=ppo_max", "kl=fixed,adaptive", "~kl.target"], conf_dir=conf)
    check_keys(["model=my_own_model"], conf_dir=None)  # options from another --config-dir: not checked
