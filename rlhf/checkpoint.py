"""Checkpoints: everything a run depends on, written atomically, and read back for an exact resume.

A checkpoint is a folder ``<run dir>/checkpoints/step-<N>/`` with the models' weights (safetensors),
``state.pt`` (optimizers, schedulers, counters, RNG states: plain tensors and Python values, read
with ``torch.load(weights_only=True)``), ``config.yaml`` (the resolved config) and ``manifest.json``,
written last. It is assembled in a staging folder next to it and renamed into place in one step, so
a crash or kill during a save never leaves a half checkpoint where a complete one is expected; old
checkpoints are deleted only after the new one is complete.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_model, save_model
from torch import nn

MANIFEST = "manifest.json"
PACKAGES = ("torch", "transformers", "hydra-core", "omegaconf", "wandb", "accelerate", "peft", "rlhf")


def _git_revision() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)  # fmt: skip
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def complete_checkpoints(root: Path) -> list[Path]:
    """Checkpoints with a manifest (complete ones), oldest first."""
    return sorted(p for p in root.glob("step-*") if (p / MANIFEST).exists()) if root.exists() else []


def save_checkpoint(
    root: Path, step: int, models: dict[str, nn.Module], state: dict[str, Any], config_yaml: str, keep_last: int
) -> Path:
    """Write checkpoint ``step`` atomically, then delete all but the ``keep_last`` newest."""
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:08d}"
    staging = root / f".staging-step-{step:08d}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    files = {}
    for name, module in models.items():
        # save_model handles tied weights (a tied LM head is stored once).
        save_model(module, str(staging / f"{name}.safetensors"))
        files[name] = f"{name}.safetensors"
    torch.save(state, staging / "state.pt")
    (staging / "config.yaml").write_text(config_yaml)
    files.update(state="state.pt", config="config.yaml")
    manifest = {"step": step, "files": files, "versions": _versions(), "git_revision": _git_revision()}
    (staging / MANIFEST).write_text(json.dumps(manifest, indent=1))
    for path in staging.iterdir():
        with path.open("rb") as f:
            os.fsync(f.fileno())
    if final.exists():  # the same step saved again (e.g. the end of a run that saved it already)
        shutil.rmtree(final)
    staging.rename(final)
    for old in complete_checkpoints(root)[:-keep_last]:
        shutil.rmtree(old)
    return final


def load_checkpoint(path: Path, models: dict[str, nn.Module]) -> dict[str, Any]:
    """Load the models' weights in place and return the state (``weights_only`` unpickling)."""
    for name, module in models.items():
        load_model(module, str(path / f"{name}.safetensors"))
    return torch.load(path / "state.pt", weights_only=True)


def changed_keys(saved: dict, current: dict, allowed: tuple[str, ...], prefix: str = "") -> list[str]:
    """``key: saved -> current`` for every leaf that differs, except the ``allowed`` keys."""
    changes = []
    for key in sorted(set(saved) | set(current)):
        full = f"{prefix}{key}"
        a, b = saved.get(key), current.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            changes += changed_keys(a, b, allowed, f"{full}.")
        elif a != b and full not in allowed:
            changes.append(f"{full}: {a!r} -> {b!r}")
    return changes
