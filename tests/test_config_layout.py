"""Each piece of config knowledge is written once: the README's "read by" table is what the code reads,
a preset states only what differs from the schema's defaults, and the option names the consumers act
on are the ones the validator accepts. Config-only: no model is loaded."""

from __future__ import annotations

import ast
import re
from dataclasses import is_dataclass
from typing import get_type_hints

import pytest
import yaml
from omegaconf import OmegaConf

from rlhf.config import options
from rlhf.config.schema import TrainConfig
from tests.helpers import CONF_DIR, REPO

# The config groups: the dataclass-typed fields of the schema (model, reward, kl, ..., logging).
GROUPS = sorted(name for name, hint in get_type_hints(TrainConfig).items() if is_dataclass(hint))

# The run config is called `cfg` everywhere above the config layer (a name, or an attribute `self.cfg`).
CONFIG_NAME = "cfg"


def _is_config(node: ast.expr) -> bool:
    return (isinstance(node, ast.Name) and node.id == CONFIG_NAME) or (
        isinstance(node, ast.Attribute) and node.attr == CONFIG_NAME
    )


def groups_read(source: str) -> set[str]:
    """The groups whose node a module takes off the run config: ``cfg.<group>``, ``self.cfg.<group>``,
    ``cfg["<group>"]`` or ``OmegaConf.select(cfg, "<group>...")``."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Attribute) and _is_config(node.value):
            found.add(node.attr)
        elif isinstance(node, ast.Subscript) and _is_config(node.value) and isinstance(node.slice, ast.Constant):
            found.add(str(node.slice.value))
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "select" and len(node.args) > 1:
            key = node.args[1]
            if _is_config(node.args[0]) and isinstance(key, ast.Constant) and isinstance(key.value, str):
                found.add(key.value.split(".")[0])
    return found & set(GROUPS)


def readers_in_code() -> dict[str, set[str]]:
    """group -> the modules under rlhf/ (outside rlhf/config, which checks every group) reading it."""
    readers: dict[str, set[str]] = {group: set() for group in GROUPS}
    for path in sorted((REPO / "rlhf").rglob("*.py")):
        module = path.relative_to(REPO).as_posix()
        if not module.startswith("rlhf/config/"):
            for group in groups_read(path.read_text()):
                readers[group].add(module)
    return readers


def readers_in_readme() -> dict[str, set[str]]:
    """group -> the modules the README's "read by" column names, for the rows of schema groups."""
    readme = (REPO / "README.md").read_text()
    section = readme.split("## Config groups and their one reader each", 1)[1].split("\n## ", 1)[0]
    readers = {}
    for line in section.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        group = cells[0].strip("`")
        if len(cells) == 3 and group in GROUPS:
            readers[group] = set(re.findall(r"rlhf/[\w/]+\.py", cells[2]))
    return readers


def test_readme_read_by_table_names_the_modules_that_read_each_group():
    in_code, in_readme = readers_in_code(), readers_in_readme()
    assert sorted(in_readme) == GROUPS, f"rows missing from the README table: {set(GROUPS) - set(in_readme)}"
    wrong = {
        group: {
            "README only": sorted(in_readme[group] - in_code[group]),
            "code only": sorted(in_code[group] - in_readme[group]),
        }
        for group in GROUPS
        if in_readme[group] != in_code[group]
    }
    assert not wrong, wrong


def test_the_reader_rule_sees_config_accesses_and_nothing_else():
    source = """
def f(cfg, self, exp, select):
    cfg.kl.beta, self.cfg.gae.lam, cfg["ppo"], OmegaConf.select(cfg, "data.seed")
    exp.kl.sum(), rlhf.data.prompts, self.model.config, cfg.seed
"""
    assert groups_read(source) == {"kl", "gae", "ppo", "data"}


def _leaves(node: dict, prefix: str):
    for key, value in node.items():
        # reward.fn is a Hydra node (an open map): the preset's value, whole.
        if isinstance(value, dict) and value and f"{prefix}{key}" != "reward.fn":
            yield from _leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


SCHEMA_DEFAULTS = dict(_leaves(OmegaConf.to_container(OmegaConf.structured(TrainConfig), resolve=False), ""))
# Group presets whose keys have defaults in the schema (optimizer nodes have none; experiments and sweeps
# state a published recipe's or a sweep's values whole).
PRESETS = [CONF_DIR / "train.yaml"] + sorted(
    path for group in GROUPS if group != "optimizer" for path in (CONF_DIR / group).glob("*.yaml")
)


@pytest.mark.parametrize("path", PRESETS, ids=[p.relative_to(CONF_DIR).as_posix() for p in PRESETS])
def test_presets_state_only_what_differs_from_the_schema_defaults(path):
    data = yaml.safe_load(path.read_text()) or {}
    data.pop("defaults", None)
    data.pop("hydra", None)
    prefix = "" if path.name == "train.yaml" else f"{path.parent.name}."
    repeated = [key for key, value in _leaves(data, prefix) if SCHEMA_DEFAULTS.get(key, object()) == value]
    assert not repeated, f"{path.name} repeats the schema's defaults (rlhf/config/schema.py): {repeated}"


def test_hardware_presets_inherit_instead_of_repeating_keys():
    # The multi-GPU presets start from hardware/gpu (directly or through another preset).
    for name in ("ddp", "fsdp", "deepspeed_zero2", "deepspeed_zero3"):
        data = yaml.safe_load((CONF_DIR / "hardware" / f"{name}.yaml").read_text())
        assert data["defaults"][0] in ("gpu", "deepspeed_zero2"), name
        assert "device" not in data and "autocast_dtype" not in data, name


def test_the_core_and_the_models_act_on_the_option_names_the_validator_accepts():
    # rlhf.core never imports the config (torch-only): its own names must be the schema's.
    from rlhf.core.kl import KL_ESTIMATORS, make_kl_controller
    from rlhf.models.loading import DTYPES

    assert tuple(options.KLEstimator) == KL_ESTIMATORS
    for controller in options.KLControllerKind:
        make_kl_controller(controller.value, beta=0.1, target=1.0, horizon=100)
    assert set(DTYPES) == set(options.DType)


@pytest.mark.parametrize(
    "value",
    ["${oc.env:H17_TOKEN}", "${oc.env: H17_TOKEN}", '${oc.env:"H17_TOKEN"}', "${oc.env:H17_TOKEN,${oc.env:H17_B}}"],
)
def test_one_rule_finds_and_redacts_values_read_from_the_environment(monkeypatch, value):
    # The names the Redactor scrubs and the loggable config's <env NAME> come from one pattern: however
    # OmegaConf lets the read be spelled, both see the same name, and no piece of the spelling is left.
    from rlhf.config.redact import env_names, loggable_config, redact_env

    monkeypatch.setenv("H17_TOKEN", "secret-h17")
    cfg = OmegaConf.create({"reward": {"url": f"http://host/?key={value}"}})
    assert "H17_TOKEN" in env_names(cfg)
    assert redact_env(value) == "<env H17_TOKEN>"
    assert loggable_config(cfg)["reward"]["url"] == "http://host/?key=<env H17_TOKEN>"
