"""Shared fixtures: a composed config for any overrides, and the tiny models, runs and servers several
test modules use. Fixtures only: plain functions and constants are in tests/helpers.py, which test
modules and workers import directly."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers import CLI_RUN_OVERRIDES, FAST, REPO, TESTBED, compose, set_test_environment

set_test_environment()  # offline, one thread: before any test module is imported


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory) -> Path:
    """One cache of built tiny actors for the whole session (each build takes a few seconds)."""
    path = Path(os.environ.get("RLHF_TEST_CACHE") or tmp_path_factory.mktemp("rlhf-cache"))
    os.environ["RLHF_CACHE"] = str(path)
    return path


@pytest.fixture
def make_cfg(tmp_path, tiny_cache):
    """``make_cfg(*overrides)``: a fast test config writing to a fresh tmp run dir."""

    def _make(*overrides: str):
        return compose([*FAST, f"trainer.output_dir={tmp_path / 'run'}", f"model.cache_dir={tiny_cache}", *overrides])

    return _make


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


@pytest.fixture(scope="session")
def testbed_run(tmp_path_factory, tiny_cache) -> tuple[Path, subprocess.CompletedProcess]:
    """``(run_dir, result)`` of a real command-line run of the over-optimisation testbed (``TESTBED``)."""
    run_dir = tmp_path_factory.mktemp("testbed-run") / "run"
    result = subprocess.run(
        [sys.executable, "train.py", *TESTBED, f"model.cache_dir={tiny_cache}", f"hydra.run.dir={run_dir}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    return run_dir, result


@pytest.fixture(scope="session")
def reward_model_dir(tmp_path_factory) -> Path:
    """A tiny real sequence classifier (Qwen2) on the tiny tokenizer, saved like a hub model."""
    from transformers import Qwen2Config, Qwen2ForSequenceClassification

    from rlhf.models.tiny import build_tokenizer

    path = tmp_path_factory.mktemp("reward-model")
    tokenizer = build_tokenizer()
    tokenizer.save_pretrained(path)
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        intermediate_size=64,
        num_labels=1,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    Qwen2ForSequenceClassification(config).save_pretrained(path)
    return path


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
