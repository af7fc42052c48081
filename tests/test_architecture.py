"""The import graph of rlhf/ keeps its layers: no cycle between modules, imports run one way (down the
ranks below), and the torch-only math in rlhf/core imports nothing else.

Every ``import`` and ``from ... import`` is read with ``ast``, at the top of a module and inside
functions alike (an import inside a function still ties the two modules together; it only moves the
cost to the call). Nothing is imported, so the test takes milliseconds.
"""

from __future__ import annotations

import ast
import sys
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path

import pytest

# The layers of rlhf/, lowest first. A module may import its own package and packages of a LOWER rank
# only: two packages of the same rank may not import each other. `runtime` and `config` rank below
# `ppo` and `app`, so they can never import them.
RANKS = {
    "core": 0,  # torch-only math and the typed containers between stages (Samples, Experience)
    "config": 0,  # the schema, validation, errors and redaction: no torch, no models
    "models": 1,  # loading, critic, action log-probs/values, generation, the tiny builder
    "tasks": 1,  # the built-in tasks (prompts, answers, reward functions)
    "runtime": 2,  # processes and the distributed backend, threads, checkpoints, tracking, health, signals
    "rewards": 2,  # reward functions, models and endpoints, and their post-processing
    "data": 2,  # prompt sources
    "ppo": 3,  # the experience, the PPO step and update, its metrics (rewards.normalize checks scores)
    "analysis": 3,  # the report's library: run dirs read back (runtime's jsonl and status), tables, figures
    "app": 4,  # the composition root (build), the run loop and the Hydra job
}
# Top-level command-line entries (python -m rlhf.report / rlhf.generate / rlhf.reward_model): may import any
# package but not each other.
ENTRIES = {"report", "generate", "reward_model"}
# What rlhf/core may import besides the standard library and itself: torch only (never transformers,
# hydra, omegaconf or wandb).
CORE_THIRD_PARTY = {"torch"}

# Sizes past which a module or a function is doing more than one thing (STYLE.md: a trainer longer
# than ~300 lines or a function longer than a screen is a sign something belongs elsewhere).
MAX_MODULE_LINES = 350
MAX_FUNCTION_LINES = 50

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "rlhf"


@dataclass(frozen=True)
class Import:
    """One imported module: where the import statement is and what it reads."""

    file: str  # path from the repository root, e.g. rlhf/ppo/trainer.py
    line: int
    statement: str  # the source text, e.g. `from rlhf.core.gae import compute_gae`
    source: str  # dotted name of the importing module, e.g. rlhf.ppo.trainer
    target: str  # dotted name of the imported module (or of a third-party package)

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.statement}"


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_module(dotted: str) -> bool:
    path = REPO.joinpath(*dotted.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def imports_of(path: Path, text: str | None = None) -> list[Import]:
    """Every import in ``path`` (or in ``text`` as if it were that file); ``from a.b import c`` reads module
    ``a.b.c`` when c is a module, else ``a.b``."""
    text = path.read_text() if text is None else text
    source, file = module_name(path), str(path.relative_to(REPO))
    package = source if path.name == "__init__.py" else source.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(text, filename=file)):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package, one level up per extra dot
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, *([base] if base else [])])
            targets = [f"{base}.{a.name}" if is_module(f"{base}.{a.name}") else base for a in node.names]
        else:
            continue
        statement = ast.get_source_segment(text, node) or ""
        found += [Import(file, node.lineno, " ".join(statement.split()), source, t) for t in dict.fromkeys(targets)]
    return found


def layer_of(module: str) -> str:
    """The package a module of rlhf belongs to: rlhf.ppo.trainer -> ppo, rlhf.report -> report."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


ALL_IMPORTS = [i for path in sorted(PACKAGE.rglob("*.py")) for i in imports_of(path)]
RLHF_IMPORTS = [i for i in ALL_IMPORTS if i.target.split(".")[0] == "rlhf" and i.target != i.source]


def rule_broken_by(edge: Import) -> str | None:
    """Why ``edge`` breaks the layer rule, or None."""
    source, target = layer_of(edge.source), layer_of(edge.target)
    if source == target:
        return None
    if source in ENTRIES:
        return f"entry {source} may not import entry {target}" if target in ENTRIES else None
    if target in ENTRIES:
        return f"{source} may not import the command-line entry {target}"
    if source not in RANKS or target not in RANKS:
        unknown = source if source not in RANKS else target or "rlhf"
        return f"package {unknown!r} has no rank: add it to RANKS in tests/test_architecture.py"
    if RANKS[target] >= RANKS[source]:
        return f"{source} (rank {RANKS[source]}) may not import {target} (rank {RANKS[target]})"
    return None


def test_every_package_of_rlhf_has_a_rank():
    packages = {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()}
    entries = {p.stem for p in PACKAGE.glob("*.py") if p.name != "__init__.py"}
    assert packages == set(RANKS), f"packages {sorted(packages)} vs RANKS {sorted(RANKS)}"
    assert entries == ENTRIES, f"top-level modules {sorted(entries)} vs ENTRIES {sorted(ENTRIES)}"


def test_imports_run_down_the_layers():
    broken = [f"{edge}  <- {why}" for edge in RLHF_IMPORTS if (why := rule_broken_by(edge))]
    assert not broken, "imports against the layers (RANKS in tests/test_architecture.py):\n" + "\n".join(broken)


def oversized(path: Path, text: str | None = None) -> list[str]:
    """The module itself if longer than MAX_MODULE_LINES, and each function (or method) longer than
    MAX_FUNCTION_LINES, decorators and docstring included, as "file:line name (N lines)"."""
    text = path.read_text() if text is None else text
    file = str(path.relative_to(REPO))
    found = [f"{file} ({n} lines)" for n in [len(text.splitlines())] if n > MAX_MODULE_LINES]
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            start = min([node.lineno, *(d.lineno for d in node.decorator_list)])
            if (n := node.end_lineno - start + 1) > MAX_FUNCTION_LINES:
                found.append(f"{file}:{start} {node.name} ({n} lines)")
    return found


def test_no_module_or_function_is_oversized():
    found = [item for path in sorted(PACKAGE.rglob("*.py")) for item in oversized(path)]
    assert not found, f"over {MAX_MODULE_LINES} lines a module, {MAX_FUNCTION_LINES} a function:\n" + "\n".join(found)


def test_the_size_check_counts_module_and_function_lines():
    body = "".join(f"    x{i} = {i}\n" for i in range(MAX_FUNCTION_LINES - 1))  # + the def line = the limit
    assert oversized(PACKAGE / "x.py", f"def ok():\n{body}") == []
    assert oversized(PACKAGE / "x.py", f"@decorated\ndef long():\n{body}") == [
        f"rlhf/x.py:1 long ({MAX_FUNCTION_LINES + 1} lines)"
    ]
    module = "\n" * (MAX_MODULE_LINES + 1)
    assert oversized(PACKAGE / "x.py", module) == [f"rlhf/x.py ({MAX_MODULE_LINES + 1} lines)"]


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as [a, b, ..., a], or None (depth-first search, colouring nodes)."""
    state: dict[str, str] = {}  # "open" while on the current path, "done" after

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (cycle := visit(nxt, [*path, nxt])):
                return cycle
        state[node] = "done"
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start, [start])):
            return cycle
    return None


def test_no_import_cycle_between_modules():
    graph: dict[str, set[str]] = {}
    where: dict[tuple[str, str], Import] = {}
    for edge in RLHF_IMPORTS:
        # `import rlhf.a.b` also runs rlhf/a/__init__.py; the package inits here only hold docstrings, so the
        # edge that matters is the one to the module itself.
        graph.setdefault(edge.source, set()).add(edge.target)
        where.setdefault((edge.source, edge.target), edge)
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle:\n" + "\n".join(str(where[a, b]) for a, b in pairwise(cycle))


def test_core_imports_torch_and_the_standard_library_only():
    allowed = CORE_THIRD_PARTY | set(sys.stdlib_module_names) | {"__future__", "rlhf"}
    core = [i for i in ALL_IMPORTS if layer_of(i.source) == "core"]
    assert core, "no imports found in rlhf/core: is the walk broken?"
    outside = [
        f"{i}  <- neither torch nor the standard library" for i in core if i.target.split(".")[0] not in allowed
    ]
    outside += [
        f"{i}  <- another package of rlhf"
        for i in core
        if i.target.startswith("rlhf.") and layer_of(i.target) != "core"
    ]
    assert not outside, "rlhf/core is torch-only math:\n" + "\n".join(outside)


# Stand-in modules (never written to disk) and what the checks above report for them: the checks can fail.
BAD_MODULES = [
    (
        "core/x.py",
        "import rlhf.app.run\n",
        "rlhf/core/x.py:1: import rlhf.app.run  <- core (rank 0) may not import app",
    ),
    (
        "core/x.py",
        "def f():\n    from rlhf.ppo import trainer\n",
        "rlhf/core/x.py:2: from rlhf.ppo import trainer  <- core",
    ),
    (
        "core/x.py",
        "from ..ppo.trainer import PPOTrainer\n",
        "rlhf/core/x.py:1: from ..ppo.trainer import PPOTrainer  <- core",
    ),
    ("runtime/x.py", "from rlhf.app.build import build_trainer\n", "runtime (rank 2) may not import app (rank 4)"),
    ("config/x.py", "import rlhf.ppo.metrics\n", "config (rank 0) may not import ppo (rank 3)"),
    ("rewards/x.py", "from rlhf.data.prompts import load_prompts\n", "rewards (rank 2) may not import data (rank 2)"),
    ("report.py", "from rlhf import generate\n", "entry report may not import entry generate"),
    ("app/x.py", "from rlhf.report import main\n", "app may not import the command-line entry report"),
]


@pytest.mark.parametrize(("file", "code", "expected"), BAD_MODULES)
def test_the_walk_finds_top_level_function_level_and_relative_imports(file, code, expected):
    edges = imports_of(PACKAGE / file, text=code)
    messages = [f"{edge}  <- {why}" for edge in edges if (why := rule_broken_by(edge))]
    assert any(expected in m for m in messages), messages


def test_a_cycle_is_found_and_named():
    graph = {"a": {"b"}, "b": {"c", "d"}, "c": {"a"}, "d": set()}
    assert find_cycle(graph) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_test_modules_share_code_through_fixtures_and_helpers_only():
    # Importing a test module (or conftest) runs its module-level code and ties the two modules' fates
    # together: shared fixtures live in conftest.py (pytest finds them), shared functions in helpers.py.
    tests = REPO / "tests"
    found = [
        f"{path.relative_to(REPO)}:{node.lineno}: {node.module}"
        for path in sorted(tests.glob("*.py"))
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.ImportFrom)
        and (node.module or "").startswith(("tests.test_", "tests.conftest", "test_", "conftest"))
    ]
    assert not found, "test modules importing a test module or conftest:\n" + "\n".join(found)
