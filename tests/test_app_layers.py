"""The application layer's wiring: the config is validated once per run, and the lower layers and the
report do not reach up (runtime never imports app or ppo; the report runs without Hydra or torch)."""

from __future__ import annotations

import ast
import subprocess
import sys

import pytest

from tests.helpers import REPO


@pytest.fixture
def validate_calls(monkeypatch) -> list[object]:
    """Every call of ``rlhf.config.validate.validate``, under whichever module name it was imported."""
    import rlhf.app.build
    import rlhf.app.job
    import rlhf.app.run  # noqa: F401 - imported so that their ``validate`` names are counted too
    import rlhf.config.validate

    original, calls = rlhf.config.validate.validate, []

    def counted(cfg) -> None:  # noqa: ANN001 - a DictConfig
        calls.append(cfg)
        original(cfg)

    for name, module in list(sys.modules.items()):
        if name.startswith("rlhf") and getattr(module, "validate", None) is original:
            monkeypatch.setattr(module, "validate", counted)
    return calls


def test_train_validates_once(make_cfg, validate_calls):
    from rlhf.app.run import train

    train(make_cfg("trainer.save_model=false"))
    assert len(validate_calls) == 1


def test_a_job_validates_once(make_cfg, validate_calls):
    from rlhf.app.job import run_job

    run_job(make_cfg("trainer.save_model=false"))
    assert len(validate_calls) == 1


def test_the_report_needs_neither_hydra_nor_torch():
    code = "import sys, rlhf.report; print(sorted({'hydra', 'torch', 'omegaconf'} & set(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


@pytest.mark.parametrize("layer", ["runtime", "config"])
def test_lower_layers_do_not_import_app_or_ppo(layer):
    imports = []
    for path in sorted((REPO / "rlhf" / layer).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            names += [alias.name for alias in node.names] if isinstance(node, ast.Import) else []
            imports += [f"{path.name}: {name}" for name in names if name.startswith(("rlhf.app", "rlhf.ppo"))]
    assert imports == []
