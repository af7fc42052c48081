"""Shared fixtures: offline, single-threaded, and a composed config for any overrides."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("WANDB_SILENT", "true")
torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]
CONF_DIR = REPO / "conf"


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory) -> Path:
    """One cache of built tiny actors for the whole session (each build takes a few seconds)."""
    path = Path(os.environ.get("RLHF_TEST_CACHE") or tmp_path_factory.mktemp("rlhf-cache"))
    os.environ["RLHF_CACHE"] = str(path)
    return path


def compose(overrides: list[str]):
    """The run config ``python train.py <overrides>`` would get (without Hydra's runtime)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from rlhf.config.schema import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra_compose(config_name="train", overrides=overrides)


# A run small enough for tests: few prompts, one short PPO step, W&B off unless a test turns it on.
FAST = [
    "trainer.steps=1",
    "rollout.batch_size=8",
    "ppo.minibatch_size=4",
    "ppo.epochs=1",
    "logging.wandb.mode=disabled",
    "logging.progress_bar=false",
]


@pytest.fixture
def make_cfg(tmp_path, tiny_cache):
    """``make_cfg(*overrides)``: a fast test config writing to a fresh tmp run dir."""

    def _make(*overrides: str):
        return compose([*FAST, f"trainer.output_dir={tmp_path / 'run'}", f"model.cache_dir={tiny_cache}", *overrides])

    return _make


# The quick loop's one successful ``python train.py`` run (~6 s), shared by tests that only read it:
# tests/test_train.py checks its output, tests/test_generate.py samples from it, tests/test_data_safety.py
# reads a copy of its metrics.jsonl.
CLI_RUN_OVERRIDES = ["trainer.steps=2", "rollout.batch_size=8", "ppo.minibatch_size=4", "kl.beta=0.07", "gae.lam=0.9"]


@pytest.fixture(scope="session")
def cli_run(tmp_path_factory, tiny_cache) -> tuple[Path, subprocess.CompletedProcess]:
    """``(run_dir, result)`` of a real 2-step command-line run with an offline W&B run; do not modify run_dir."""
    run_dir = tmp_path_factory.mktemp("cli-run") / "run"
    result = subprocess.run(
        [sys.executable, "train.py", *CLI_RUN_OVERRIDES, "logging.wandb.mode=offline", "logging.progress_bar=false",
         f"hydra.run.dir={run_dir}"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    return run_dir, result


def wandb_inspect(run_dir: Path, *flags: str) -> list[dict]:
    """The records of the run dir's one offline W&B run (``--summary``: its state), read by ``wandb leet inspect``."""
    (offline_run,) = (run_dir / "wandb").glob("offline-run-*")
    wandb_cli = Path(sys.executable).with_name("wandb")
    out = subprocess.run(
        [str(wandb_cli), "leet", "inspect", "--json", *flags, str(offline_run)],
        capture_output=True, text=True, timeout=120, check=True,
    ).stdout  # fmt: skip
    if "--summary" in flags:
        return [json.loads(out)]
    return [json.loads(line) for line in out.splitlines() if line.strip()]


class ScoreServer:
    """A reward endpoint on 127.0.0.1: score = len(response); the first ``failures`` requests get a 500.
    Each request's body and headers are kept."""

    def __init__(self, failures: int = 0, wrong_count: bool = False):
        import http.server
        import threading

        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 (the stdlib's name)
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.requests.append(body)
                server.headers.append(dict(self.headers))
                if len(server.requests) <= server.failures:
                    self.send_response(500)
                    self.end_headers()
                    return
                scores = [float(len(r)) for r in body["responses"]] + ([1.0] if server.wrong_count else [])
                payload = json.dumps({"scores": scores}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args):
                pass

        self.failures, self.wrong_count, self.requests, self.headers = failures, wrong_count, [], []
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/score"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server_factory():
    servers = []

    def make(**kwargs):
        servers.append(ScoreServer(**kwargs))
        return servers[-1]

    yield make
    for server in servers:
        server.close()
