"""Refuse command-line overrides that would run code, before Hydra builds anything from them.

``train.py`` calls ``checked_argv(sys.argv[1:])`` before ``main()``: Hydra instantiates
``hydra.callbacks`` and sets ``hydra.job.env_set`` before the task function runs, so a check inside the
task is too late. The overrides are split from Hydra's flags by Hydra's own argument parser and parsed
by Hydra's own override parser, so quoting, escapes and sweeps mean exactly what they will mean to Hydra.

What is checked: every value typed on the command line, at any depth of a dict or list value and in
every choice of a sweep (also the per-job overrides of ``hydra.sweeper.params``):

- a ``_target_`` (and ``hydra.sweeper.custom_search_space``) must name a reward function of
  ``rlhf.tasks`` or a ``torch.optim`` optimizer or LR scheduler, by its real module (``__module__``
  after import), or a module trusted with ``--allow-target MODULE``. A path outside those packages is
  refused by name, without importing anything.
- interpolations may only read the environment (``${oc.env:...}``), the date (``${now:...}``),
  Hydra's config (``${hydra:...}``) or another key (``${trainer.steps}``); a ``_target_`` takes none.
- ``hydra.output_subdir`` must be a literal folder inside the run dir: Hydra writes its three files there.
- ``hydra.job.env_set`` may not set loader or interpreter variables (``LD_*``, ``PYTHON*``, ...).
- ``hydra.job_logging`` / ``hydra.hydra_logging`` may not name a factory (``()``, ``class``, ``ext://``):
  ``logging.config.dictConfig`` would import and call it; nor move a log file (``filename``, ``mode``,
  ``delay``, the ``.`` attribute setter): a log written to ``site-packages/x.pth`` with the format
  ``import os; ...`` runs at the next start of Python.

Config files stay trusted (``--config-dir``, ``hydra.searchpath``, group choices such as
``reward=classifier``): whoever can write them can already run code. This module imports only the
standard library, Hydra and OmegaConf, so a refusal by name is printed in under a second.
"""

from __future__ import annotations

import importlib
import inspect
import re
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ChoiceSweep, Glob, QuotedString, Sweep
from hydra.errors import HydraException
from omegaconf import grammar_parser
from omegaconf.errors import GrammarParseError
from omegaconf.grammar.gen.OmegaConfGrammarParser import OmegaConfGrammarParser

from rlhf.config.checks import check_override_key
from rlhf.config.errors import ConfigError

ALLOW_TARGET_FLAG = "--allow-target"


# The project's reward functions (conf/reward/arithmetic.yaml names rlhf.tasks.arithmetic).
REWARD_PACKAGES = ("rlhf.tasks",)


# Optimizers and LR schedulers: a class from here must also subclass torch's Optimizer or LRScheduler.
OPTIMIZER_PACKAGES = ("torch.optim",)


# Resolvers that only read (the environment, the clock, Hydra's config); oc.decode and oc.create would
# turn a string into a config with a `_target_` that no check saw.
ALLOWED_RESOLVERS = frozenset({"oc.env", "now", "hydra"})


# Keys besides `_target_` whose value Hydra or a plugin imports and calls.
CALLABLE_KEYS = frozenset({"hydra.sweeper.custom_search_space"})


# Environment variables that change which code a process loads: the dynamic loader's, interpreters'
# start-up and search paths, shells' start-up files, and the executable search path.
LOADER_VARIABLE_PREFIXES = ("LD_", "DYLD_", "PYTHON", "BASH_FUNC_", "PERL5", "RUBY", "NODE_", "GCONV", "GLIBC_")


LOADER_VARIABLES = frozenset(
    {"BASH_ENV", "ENV", "SHELLOPTS", "BASHOPTS", "PS4", "IFS", "PATH", "TORCH_EXTENSIONS_DIR"}
)


_LOGGING_KEYS = (("hydra", "job_logging"), ("hydra", "hydra_logging"))


# Keys of a logging handler that choose the file it writes ("" is a part of the `.` key, which dictConfig
# uses to set attributes such as baseFilename); the log stays <run dir>/<job name>.log.
_LOG_FILE_KEYS = frozenset({"filename", "mode", "delay", "baseFilename", ""})


# Checked by where a value lands, so a value at, above or inside them may not reference another key
# (`+foo={LD_PRELOAD:x} hydra.job.env_set=${foo}` would put an unchecked dict there).
_CHECKED_BY_PATH = (("hydra", "job", "env_set"), *_LOGGING_KEYS)


_DOTTED_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")


class OverrideRefused(ValueError):
    """A command-line override that could run code; the message names each refused key."""


@dataclass(frozen=True)
class _Target:
    key: str  # dotted path of the `_target_` key, e.g. reward.fn._target_
    path: str  # the dotted path it names, e.g. rlhf.tasks.arithmetic.exact_match_reward


def split_allow_targets(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """(argv without ``--allow-target MODULE`` / ``--allow-target=MODULE``, the trusted modules)."""
    rest: list[str] = []
    modules: list[str] = []
    args = iter(argv)
    for arg in args:
        if arg == ALLOW_TARGET_FLAG:
            module = next(args, "")
        elif arg.startswith(ALLOW_TARGET_FLAG + "="):
            module = arg.partition("=")[2]
        else:
            rest.append(arg)
            continue
        if not _DOTTED_NAME.fullmatch(module):
            raise OverrideRefused(
                f"{ALLOW_TARGET_FLAG} {module!r} is not allowed: give a module name, e.g. tests.stand_ins"
            )
        modules.append(module)
    return rest, modules


def checked_argv(argv: Sequence[str], *, conf_dir: Path | None = None, train_keys: bool = True) -> list[str]:
    """``argv`` (without ``sys.argv[0]``) less ``--allow-target`` flags, once its overrides passed
    ``check_overrides``; a refusal exits with status 2 and the reasons, before anything is built.
    Then (``train_keys``: the PPO run's schema) each override's key must be one of the schema's and each
    group option a file of ``conf_dir`` (``check_keys``): ``error: ...`` and status 2 otherwise."""
    try:
        rest, modules = split_allow_targets(argv)
        # Hydra's own split of flags and overrides (it exits on an unknown flag, as Hydra would).
        from hydra._internal.utils import get_args_parser

        args = get_args_parser().parse_args(rest)
        check_overrides(args.overrides, allowed_modules=modules)
    except OverrideRefused as refused:
        print(f"Command-line override refused (nothing was run):\n{refused}", file=sys.stderr)
        raise SystemExit(2) from None
    if not train_keys:  # another entry's schema (python -m rlhf.reward_model): Hydra's struct mode checks keys
        return rest
    try:
        # Other config dirs may hold other group options: only the schema's keys are checked then.
        check_keys(args.overrides, conf_dir=None if args.config_dir else conf_dir)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    return rest


def check_keys(overrides: Sequence[str], *, conf_dir: Path | None = None) -> None:
    """Raise ``ConfigError`` for the first override of a key the schema lacks or of a config group
    option that is not a file of ``conf_dir`` (``rlhf.config.checks.check_override_key``). Hydra's own keys,
    deletions and overrides of a group's path (``hydra/launcher=joblib``) are Hydra's to check."""
    parsed = [OverridesParser.create().parse_override(line) for line in overrides]
    if any(o.key_or_group.startswith("hydra.searchpath") for o in parsed):
        conf_dir = None
    for override in parsed:
        key = override.key_or_group
        if key.split(".")[0].split("/")[0] == "hydra" or "/" in key or override.is_delete():
            continue
        if isinstance(override._value, ChoiceSweep):
            value: Any = [v for v in override._value.list if isinstance(v, str)]
        elif override.is_sweep_override():
            continue  # range/interval sweeps: numbers, checked once composed
        else:
            value = override.value()
        check_override_key(key, value, conf_dir)


def check_overrides(overrides: Sequence[str], *, allowed_modules: Sequence[str] = ()) -> None:
    """Raise ``OverrideRefused`` naming every override that could run code (see the module docstring).
    Targets are first checked by name; only those inside an allowed package are then imported."""
    problems: list[str] = []
    targets: list[_Target] = []
    for line in overrides:
        _check_line(line, problems, targets)
    packages = (*REWARD_PACKAGES, *OPTIMIZER_PACKAGES, *allowed_modules)
    outside = [t for t in targets if not _inside(t.path, packages, strict=True)]
    problems += [f"{t.key}={t.path!r} is not allowed: {_target_rule(allowed_modules)}" for t in outside]
    if problems:
        raise OverrideRefused("\n".join(dict.fromkeys(problems)))
    for target in targets:
        problem = _check_import(target, allowed_modules)
        if problem:
            problems.append(problem)
    if problems:
        raise OverrideRefused("\n".join(dict.fromkeys(problems)))


def _check_line(line: str, problems: list[str], targets: list[_Target]) -> None:
    try:
        override = OverridesParser.create().parse_override(line)
    except HydraException as error:
        problems.append(f"{line!r} could not be parsed: {error}")
        return
    if override.is_delete() or override.value_type is None:
        return  # removing a key calls nothing
    key = tuple(override.key_or_group.split("."))
    for path, value in _nodes(key, override._value):
        dotted = ".".join(path)
        for text in (path[-1], value) if isinstance(value, str) else (path[-1],):
            problem = _interpolation_problem(text, references=not _checked_by_path(path))
            if problem:
                problems.append(f"{dotted}={text!r} is not allowed: {problem}")
        if path[-1] == "_target_" or dotted in CALLABLE_KEYS:
            if isinstance(value, str) and "${" not in value and _DOTTED_NAME.fullmatch(value):
                targets.append(_Target(dotted, value))
            else:
                problems.append(
                    f"{dotted}={value!r} is not allowed: a command-line _target_ must be one literal dotted path"
                )
        if path[:3] == ("hydra", "job", "env_set") and len(path) > 3 and _is_loader_variable(path[3]):
            problems.append(
                f"hydra.job.env_set.{path[3]} is not allowed: it changes which code processes load "
                f"(LD_*, DYLD_*, PYTHON*, PATH, BASH_ENV, ...); set it in the environment yourself"
            )
        if path[:2] in _LOGGING_KEYS and (
            {"()", "class"} & set(path[2:]) or (isinstance(value, str) and value.startswith("ext://"))
        ):
            problems.append(
                f"{dotted}={value!r} is not allowed: logging factories (`()`, class, ext://) come from config files"
            )
        if path[:2] in _LOGGING_KEYS and _LOG_FILE_KEYS & set(path[2:]):
            problems.append(
                f"{dotted}={value!r} is not allowed: where a log file is written (filename, mode, delay, `.`) "
                f"comes from config files; it is <run dir>/<job name>.log"
            )
        if dotted == "hydra.output_subdir" and value is not None and not _is_subfolder(value):
            problems.append(
                f"hydra.output_subdir={value!r} is not allowed: Hydra writes config.yaml, hydra.yaml, overrides.yaml "
                f"there, over any files of those names; give a literal folder inside the run dir (default .hydra)"
            )
        if path[:3] == ("hydra", "sweeper", "params") and len(path) > 3 and isinstance(value, (str, int, float)):
            # The sweeper turns each entry into the override `key=value` of every job.
            _check_line(f"{'.'.join(path[3:])}={value}", problems, targets)


def _nodes(path: tuple[str, ...], value: Any) -> Iterator[tuple[tuple[str, ...], Any]]:
    """Every (dotted key path, value) in a parsed override value: containers too, every sweep choice.
    Dict keys are split on dots, as a dotted key would be (a conservative reading)."""
    if isinstance(value, QuotedString):
        value = value.text
    if isinstance(value, ChoiceSweep):
        for choice in value.list:
            yield from _nodes(path, choice)
        return
    if isinstance(value, Glob):
        yield from ((path, pattern) for pattern in [*value.include, *value.exclude])
        return
    if isinstance(value, Sweep):
        yield path, None  # range() and interval(): numbers only
        return
    yield path, value
    if isinstance(value, dict):
        for key, item in value.items():
            key = key.text if isinstance(key, QuotedString) else str(key)
            yield from _nodes((*path, *key.split(".")), item)
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _nodes((*path, str(index)), item)


def _checked_by_path(path: tuple[str, ...]) -> bool:
    return any(path[: len(checked)] == checked[: len(path)] for checked in _CHECKED_BY_PATH)


def _interpolation_problem(text: str, *, references: bool) -> str | None:
    """Why an interpolation in ``text`` is refused, or None (also when there is none); ``references``:
    whether ``${a.b}`` and ``${hydra:...}`` (which return other keys' values) are allowed."""
    if "${" not in text:
        return None
    try:
        tree = grammar_parser.parse(text)
    except GrammarParseError as error:
        return f"it is not a valid interpolation ({error})"
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, OmegaConfGrammarParser.InterpolationResolverContext):
            name = node.resolverName().getText()
            if name not in ALLOWED_RESOLVERS:
                return (
                    f"a command-line value may interpolate only ${{oc.env:...}}, ${{now:...}}, ${{hydra:...}} "
                    f"and other keys (${{a.b}}), not ${{{name}:...}}"
                )
        is_reference = isinstance(node, OmegaConfGrammarParser.InterpolationNodeContext) or (
            isinstance(node, OmegaConfGrammarParser.InterpolationResolverContext)
            and node.resolverName().getText() == "hydra"
        )
        if is_reference and not references:
            return (
                "a value at or under hydra.job.env_set, hydra.job_logging or hydra.hydra_logging may not "
                "reference other keys (it is checked where it lands)"
            )
        stack.extend(getattr(node, "children", None) or [])
    return None


def _is_subfolder(value: Any) -> bool:
    """Whether ``value`` is a literal relative path that stays inside the folder it is relative to."""
    if not isinstance(value, str) or not value or "${" in value:
        return False
    return not Path(value).is_absolute() and ".." not in Path(value).parts


def _is_loader_variable(name: str) -> bool:
    upper = name.upper()
    return upper in LOADER_VARIABLES or upper.startswith(LOADER_VARIABLE_PREFIXES)


def _inside(name: str, packages: Sequence[str], *, strict: bool = False) -> bool:
    """Whether dotted ``name`` is one of ``packages`` or inside one (strictly inside if ``strict``)."""
    return any(name.startswith(package + ".") or (not strict and name == package) for package in packages)


def _target_rule(allowed_modules: Sequence[str]) -> str:
    trusted = f", or in {', '.join(allowed_modules)} (--allow-target)" if allowed_modules else ""
    return (
        f"a _target_ typed on the command line must be a reward function in {', '.join(REWARD_PACKAGES)} "
        f"or an optimizer or LR scheduler in {', '.join(OPTIMIZER_PACKAGES)}{trusted}; "
        f"trust another module with {ALLOW_TARGET_FLAG} MODULE"
    )


def _check_import(target: _Target, allowed_modules: Sequence[str]) -> str | None:
    """Import a target whose path is inside an allowed package and check what it really is: the module
    that defines it (``rlhf.tasks.arithmetic.os.system`` is ``posix.system``) and, for torch.optim, its kind."""
    from hydra._internal.utils import _locate

    try:
        obj = _locate(target.path)
    except Exception as error:  # noqa: BLE001 (an import error can be anything the module raises)
        reason = repr(error.__cause__ or error)[:200]
        return f"{target.key}={target.path!r} is not allowed: it could not be imported ({reason})"
    module = getattr(obj, "__module__", None)
    is_callable = inspect.isclass(obj) or inspect.isfunction(obj) or inspect.isbuiltin(obj) or inspect.ismethod(obj)
    where = f"{module}.{getattr(obj, '__qualname__', '?')}"
    if not is_callable or not isinstance(module, str):
        return f"{target.key}={target.path!r} is not allowed: it is not a class or function"
    if _inside(module, allowed_modules) or _inside(module, REWARD_PACKAGES):
        return None
    if _inside(module, OPTIMIZER_PACKAGES) and inspect.isclass(obj):
        optim = importlib.import_module("torch.optim")
        if issubclass(obj, (optim.Optimizer, optim.lr_scheduler.LRScheduler)):
            return None
    return f"{target.key}={target.path!r} is not allowed: it is {where}; {_target_rule(allowed_modules)}"
