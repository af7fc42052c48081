"""Attacks from the outside (``python train.py ...``) on what the README promises about security.

A log file moved by an override is an arbitrary file write with chosen content: a log written to
``site-packages/x.pth`` with the format ``import os; os.system(...) # %(message)s`` runs that code at
the next start of Python. Each case leaves a marker if the written file is loaded as a ``.pth``.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.helpers import REPO, SHORT, short_run


@pytest.mark.parametrize(
    "moves_the_log",
    [
        ["hydra.job_logging.handlers.file.filename={pth}"],
        [
            "++hydra.job_logging.handlers.file.delay=true",
            "++hydra.job_logging.handlers.file={{.:{{baseFilename:{pth}}}}}",
        ],
    ],
    ids=["filename", "dot-setter"],
)
def test_a_log_file_cannot_be_moved_into_a_pth_file(tmp_path, tiny_cache, moves_the_log):
    site_dir, marker = tmp_path / "site", tmp_path / "marker"
    site_dir.mkdir()
    pth = site_dir / "evil.pth"
    payload = f"'import os; os.system(\"touch {marker}\") # %(message)s'"
    result, _, run_dir = short_run(
        tmp_path,
        tiny_cache,
        *[override.format(pth=pth) for override in moves_the_log],
        f"hydra.job_logging.formatters.simple.format={payload}",
    )
    if pth.exists():  # what Python would do at its next start with this file in site-packages
        subprocess.run([sys.executable, "-c", f"import site; site.addsitedir({str(site_dir)!r})"], check=False)
    assert not marker.exists()
    assert not pth.exists()
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Command-line override refused (nothing was run)" in result.stderr
    assert "where a log file is written" in result.stderr
    assert not run_dir.exists()


def test_a_token_in_wandb_tags_or_project_stays_out_of_the_run_dir(tmp_path, tiny_cache):
    """README: a value read with ${oc.env:NAME} is logged to W&B as <env NAME>; tags and project too."""
    tokens = {"H10_TAG_TOKEN": "tagsecret8f3a1c", "H10_PROJECT_TOKEN": "projectsecret5d2e9b"}
    run_dir = tmp_path / "run"
    args = [
        *SHORT,
        "logging.wandb.mode=offline",
        f"model.cache_dir={tiny_cache}",
        f"hydra.run.dir={run_dir}",
        "logging.wandb.tags=[${oc.env:H10_TAG_TOKEN}]",
        "logging.wandb.project=p${oc.env:H10_PROJECT_TOKEN}",
    ]
    environ = {**os.environ, **tokens}
    result = subprocess.run(
        [sys.executable, "train.py", *args], cwd=REPO, capture_output=True, text=True, timeout=300, env=environ
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert (run_dir / "wandb").is_dir()
    for path in run_dir.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            for token in tokens.values():
                assert token.encode() not in data, path


@pytest.mark.parametrize("read", ["${oc.env:H10_DIR_TOKEN}", "${oc.env: H10_DIR_TOKEN}", '${oc.env:"H10_DIR_TOKEN"}'])
def test_a_token_in_an_unusable_run_dir_is_not_printed(tmp_path, tiny_cache, read):
    """The run dir cannot be made (a file is in the way): one line naming it, the token as <env NAME>,
    however the ${oc.env:...} is spelled (OmegaConf reads a spaced or quoted name too)."""
    in_the_way = tmp_path / "a-file"
    in_the_way.write_text("user data\n")
    environ = {**os.environ, "H10_DIR_TOKEN": "dirsecret7a4c2e"}
    run_dir = tmp_path / "run"
    args = [*SHORT, "logging.wandb.mode=disabled", f"model.cache_dir={tiny_cache}", f"hydra.run.dir={run_dir}"]
    result = subprocess.run(
        [sys.executable, "train.py", *args, f"trainer.output_dir={in_the_way}/{read}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env=environ,
    )
    assert result.returncode == 1, result.stderr[-2000:]
    assert "dirsecret7a4c2e" not in result.stdout + result.stderr
    assert f"error: run dir {in_the_way}/<env H10_DIR_TOKEN> cannot be used" in result.stderr
    assert "Traceback" not in result.stderr
    assert in_the_way.read_text() == "user data\n"


@pytest.mark.parametrize("subdir", ["{project}", "../../{name}", "${{oc.env:H10_UNSET,{project}}}"])
def test_hydras_files_cannot_be_written_over_a_users_config(tmp_path, tiny_cache, subdir):
    """hydra.output_subdir outside the run dir wrote config.yaml over the user's (even for a refused config)."""
    project = tmp_path / "project"
    project.mkdir()
    (project / "config.yaml").write_text("user config\n")
    override = f"hydra.output_subdir={subdir.format(project=project, name='x')}"
    result, _, run_dir = short_run(tmp_path, tiny_cache, override)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "hydra.output_subdir=" in result.stderr and "is not allowed" in result.stderr
    assert (project / "config.yaml").read_text() == "user config\n"
    assert not run_dir.exists()
