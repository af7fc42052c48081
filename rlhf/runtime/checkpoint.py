"""Checkpoints: everything a run depends on, written atomically, and read back for an exact resume.

A checkpoint is a folder ``<run dir>/checkpoints/step-<N>/`` with the models' weights (safetensors),
``state.pt`` (optimizers, schedulers, counters, RNG states: plain tensors and Python values, read
with ``torch.load(weights_only=True)``), ``config.yaml`` (the resolved config, values from the
environment redacted) and ``manifest.json``, written last, with the sha256 of every other file: a
resume passes over a checkpoint whose bytes changed since (``newest_intact``). It is assembled in a
staging folder next to it and renamed into place in one step, so a crash or kill during a save never
leaves a half checkpoint where a complete one is expected; old checkpoints are deleted only after
the new one is complete, each first renamed out of the ``step-*`` namespace so that a kill during
the deletion never leaves a checkpoint with missing files.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import random
import shutil
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import load_file, save_file
from torch import nn

from rlhf.config.redact import loggable_config

log = logging.getLogger(__name__)


MANIFEST = "manifest.json"


PACKAGES = ("torch", "transformers", "hydra-core", "omegaconf", "wandb", "accelerate", "peft", "rlhf")


def _git_revision() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            cwd=Path(__file__).resolve().parent,
        )
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


def _remove(path: Path) -> None:
    """Delete a checkpoint folder: renamed out of ``step-*`` first (one atomic step), then removed."""
    trash = path.with_name(f".trash-{path.name}")
    shutil.rmtree(trash, ignore_errors=True)
    path.rename(trash)
    shutil.rmtree(trash)


def checkpoint_path(root: Path, step: int) -> Path:
    """Where checkpoint ``step`` lives under ``root``."""
    return root / f"step-{step:08d}"


def tied_names(model: nn.Module) -> list[list[str]]:
    """Groups of parameter names that are one parameter (a tied LM head and input embedding)."""
    groups: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(param), []).append(name)
    return [names for names in groups.values() if len(names) > 1]


def untied(model: nn.Module, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``weights`` (a state dict of ``model``) with each tied parameter stored once, under its first name."""
    drop = {name for names in tied_names(model) for name in names[1:]}
    return {name: tensor for name, tensor in weights.items() if name not in drop}


def retied(model: nn.Module, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``weights`` stored by ``untied`` with every name of a tied parameter filled in again."""
    weights = dict(weights)
    for names in tied_names(model):
        present = next((weights[name] for name in names if name in weights), None)
        if present is not None:
            weights.update({name: present for name in names})
    return weights


def save_checkpoint(
    root: Path,
    step: int,
    *,
    weights: dict[str, dict[str, torch.Tensor]],
    state: dict[str, Any],
    config_yaml: str,
    keep_last: int,
    folders: dict[str, Path] | None = None,
) -> Path:
    """Write checkpoint ``step`` atomically, then delete all but the ``keep_last`` newest.

    ``weights`` maps each model's name to its state dict, each tied parameter once (``untied``).
    ``folders`` (name: folder) are written already (DeepSpeed's engine checkpoints, by every rank)
    and moved into the checkpoint under their names.

    A step that has a complete checkpoint already (a stop signal right after a scheduled save) is
    not written again: the state is the same.
    """
    root.mkdir(parents=True, exist_ok=True)
    final = checkpoint_path(root, step)
    folders = folders or {}
    if (final / MANIFEST).exists() and damage(final) is None:
        for folder in folders.values():
            shutil.rmtree(folder)
        return final
    staging = root / f".staging-{final.name}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    files = _write_files(staging, weights=weights, state=state, config_yaml=config_yaml, folders=folders)
    _write_manifest(staging, step=step, files=files)
    for path in staging.rglob("*"):
        if path.is_file():
            with path.open("rb") as f:
                os.fsync(f.fileno())
    if final.exists():  # a step folder without a manifest is no checkpoint (ours appear by one rename)
        _remove(final)
    staging.rename(final)
    _fsync_dir(root)  # the rename itself survives a power cut
    for old in complete_checkpoints(root)[:-keep_last]:
        _remove(old)
    return final


def _write_files(
    staging: Path,
    *,
    weights: dict[str, dict[str, torch.Tensor]],
    state: dict[str, Any],
    config_yaml: str,
    folders: dict[str, Path],
) -> dict[str, str]:
    """A checkpoint's files in ``staging`` (all but the manifest); returns the manifest's ``files``."""
    files = {}
    for name, tensors in weights.items():
        save_file({key: tensor.contiguous() for key, tensor in tensors.items()}, str(staging / f"{name}.safetensors"))
        files[name] = f"{name}.safetensors"
    torch.save(state, staging / "state.pt")
    (staging / "config.yaml").write_text(config_yaml)
    for name, folder in folders.items():
        folder.rename(staging / name)
        files[name] = f"{name}/"
    files.update(state="state.pt", config="config.yaml")
    return files


def _write_manifest(staging: Path, *, step: int, files: dict[str, str]) -> None:
    """``manifest.json``, written last: the step, its files, and every file's sha256 (DeepSpeed's
    folders too), which a resume checks to pass over a damaged checkpoint."""
    stored = sorted(path for path in staging.rglob("*") if path.is_file())
    checksums = {path.relative_to(staging).as_posix(): _sha256(path) for path in stored}
    manifest = {
        "step": step,
        "files": files,
        "sha256": checksums,
        "versions": _versions(),
        "git_revision": _git_revision(),
    }
    (staging / MANIFEST).write_text(json.dumps(manifest, indent=1))


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def damage(path: Path) -> str | None:
    """What is wrong with the files of checkpoint ``path`` (a file missing, or its bytes not those
    whose sha256 the manifest holds), naming the file; None when every file is intact. A checkpoint
    written before checksums were stored is taken as it is, with a warning."""
    checksums = json.loads((path / MANIFEST).read_text()).get("sha256")
    if checksums is None:
        log.warning("%s holds no checksums (written by an older version): its files are not verified", path)
        return None
    for name, expected in checksums.items():
        file = path / name
        if not file.is_file():
            return f"{file} is missing"
        if _sha256(file) != expected:
            return f"{file} is damaged (its sha256 differs from the one in {MANIFEST})"
    return None


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def load_checkpoint(path: Path, names: list[str]) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, Any]]:
    """(the weights of the models ``names``, on the CPU, the state (``weights_only`` unpickling))."""
    weights = {name: load_file(str(path / f"{name}.safetensors")) for name in names}
    return weights, torch.load(path / "state.pt", weights_only=True)


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


def capture_rng() -> dict[str, Any]:
    """Global RNG states (Python, NumPy, torch CPU and CUDA) as plain values for a weights-only checkpoint."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": (kind, keys.tolist(), pos, has_gauss, gauss),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    """Set the global RNG states captured by ``capture_rng``."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def newest_intact(checkpoints: list[Path]) -> Path:
    """The newest of ``checkpoints`` (oldest first) whose files are intact, with a warning naming each
    damaged file passed over; ``ValueError`` naming them when none is intact."""
    problems = []
    for checkpoint in reversed(checkpoints):
        problem = damage(checkpoint)
        if problem is None:
            if problems:
                log.warning("resuming from %s, the newest intact checkpoint", checkpoint)
            return checkpoint
        log.warning("%s: checkpoint %s is not used", problem, checkpoint.name)
        problems.append(problem)
    raise ValueError(f"no intact checkpoint to resume from: {'; '.join(problems)}. Restore the file, or start anew")


def find_resume_checkpoint(cfg: DictConfig, run_dir: Path) -> Path | None:
    """The checkpoint to continue from (``trainer.resume``): the newest intact one (``newest_intact``),
    after checking that the config has not changed but for ``RESUMABLE_CHANGES``. Raises
    ``ValueError`` naming the directory, the damaged files or the keys."""
    mode = str(cfg.trainer.resume).lower()
    root = run_dir / "checkpoints"
    checkpoints = complete_checkpoints(root)
    if mode == "false" and checkpoints:
        # A fresh run would mix its checkpoints with the old run's, and a later resume would pick the wrong one.
        raise ValueError(
            f"trainer.resume=false but {root} holds checkpoints of an earlier run (latest {checkpoints[-1].name}): "
            "set hydra.run.dir (or trainer.output_dir) to a new folder, or delete that one"
        )
    if mode == "false" or (mode == "auto" and not checkpoints):
        return None
    if not checkpoints:
        raise ValueError(f"trainer.resume=true but there is no complete checkpoint in {root}")
    latest = newest_intact(checkpoints)
    saved = yaml.safe_load((latest / "config.yaml").read_text())
    allowed = RESUMABLE_CHANGES + ((SCHEDULE_LENGTH,) if schedule_follows_steps(cfg, saved) else ())
    changes = changed_keys(saved, loggable_config(cfg), allowed)
    if changes and not cfg.trainer.allow_config_change:
        raise ValueError(
            f"resuming from {latest} with a changed config: "
            + "; ".join(changes)
            + ". Set trainer.allow_config_change=true to resume anyway (raising trainer.steps is always allowed)"
        )
    step = json.loads((latest / MANIFEST).read_text())["step"]
    if cfg.trainer.steps < step:
        raise ValueError(f"trainer.steps={cfg.trainer.steps} is below step {step} of the checkpoint {latest}")
    return latest


# Config keys that may differ between a checkpoint and the run resuming from it.
RESUMABLE_CHANGES = ("trainer.steps", "trainer.resume", "trainer.allow_config_change", "logging.progress_bar")


# May differ too while it follows trainer.steps (see schedule_follows_steps).
SCHEDULE_LENGTH = "optimizer.scheduler.total_iters"


def schedule_follows_steps(cfg: DictConfig, saved: dict) -> bool:
    """Whether the LR schedule's length follows trainer.steps, in this run (its default, the
    interpolation ``${trainer.steps}``) and in the checkpoint (equal to its trainer.steps): the schedule
    is then re-planned over the new total. Set to a number, a changed length would cut or stretch the
    schedule mid-run (an LR of 0 from then on), so it counts as a config change."""
    unresolved = OmegaConf.to_container(cfg.optimizer.scheduler, resolve=False).get("total_iters")
    saved_length = saved.get("optimizer", {}).get("scheduler", {}).get("total_iters")
    return unresolved == "${trainer.steps}" and saved_length == saved.get("trainer", {}).get("steps")
