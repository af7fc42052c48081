"""Attacks from the outside (``python train.py ...``) on what the README promises about security.

A log file moved by an override is an arbitrary file write with chosen content: a log written to
``site-packages/x.pth`` with the format ``import os; os.system(...) # %(message)s`` runs that code at
the next start of Python. Each case leaves a marker if the written file is loaded as a ``.pth``.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.test_cli_security import train_py


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
    result, _, run_dir = train_py(
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
