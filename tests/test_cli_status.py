"""``python train.py`` as users call it: status.json and exit codes at every exit, fast config
errors, and tokens from the environment kept out of every byte a run or a sweep writes."""

from __future__ import annotations

import json
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rlhf.config.redact import mask_url, mask_url_in
from rlhf.runtime.status import write_status
from tests.helpers import REPO, wandb_inspect

TINY = [
    "trainer.steps=1",
    "rollout.batch_size=8",
    "ppo.minibatch_size=4",
    "ppo.epochs=1",
    "logging.progress_bar=false",
]
TOKEN_ENV = "RLHF_TEST_REWARD_TOKEN"
# The token rides in the URL's query string and in a header, both read from the environment.
SECRET_REWARD = ["reward=http", "reward.retries=0", f"+reward.headers.Authorization='Bearer ${{oc.env:{TOKEN_ENV}}}'"]


def secret_url(server) -> str:
    return f"'{server.url}?key=${{oc.env:{TOKEN_ENV}}}'"


@pytest.fixture
def token(monkeypatch) -> str:
    value = secrets.token_hex(12)
    monkeypatch.setenv(TOKEN_ENV, value)
    return value


def cli(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "train.py", *args], cwd=REPO, capture_output=True, text=True, timeout=timeout
    )


def status_of(run_dir: Path) -> dict:
    return json.loads((run_dir / "status.json").read_text())


def assert_nowhere(token: str, root: Path) -> None:
    """No file under ``root`` (W&B's binary run files included) holds ``token``, nor any file name."""
    files = [p for p in root.rglob("*") if p.is_file()]
    assert files
    for path in files:
        assert token not in str(path.relative_to(root))
        assert token.encode() not in path.read_bytes(), f"the token is in {path}"


def test_a_failed_run_replaces_a_stale_status_exits_1_and_leaks_no_token(tmp_path, tiny_cache, token, server_factory):
    # A finished run continued longer (trainer.steps raised) whose reward endpoint now answers 500.
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "status.json").write_text(json.dumps({"status": "completed", "summary": {}}))
    server = server_factory(failures=10**6)
    result = cli(
        *TINY, *SECRET_REWARD, f"reward.url={secret_url(server)}", "logging.wandb.mode=offline",
        f"model.cache_dir={tiny_cache}", f"hydra.run.dir={run_dir}",
    )  # fmt: skip
    assert result.returncode == 1, result.stderr[-2000:]
    assert server.headers and server.headers[0]["Authorization"] == f"Bearer {token}"  # the token was used
    status = status_of(run_dir)
    assert status == {
        "status": "failed",
        "error": f"RuntimeError: reward.url='{server.url}?***' failed 1 time(s); "
        "last error: HTTP Error 500: Internal Server Error",
    }
    assert "HTTP Error 500" in (run_dir / "traceback.txt").read_text()
    assert "HTTP Error 500" in result.stderr and token not in result.stdout + result.stderr
    assert wandb_inspect(run_dir, "--summary")[0]["state"] == "failed"
    assert_nowhere(token, run_dir)


@pytest.mark.slow  # a CLI run; not slow: test_train's command-line run
def test_a_successful_run_names_wandb_by_the_overrides_without_the_token(
    tmp_path, tiny_cache, token, server_factory, monkeypatch
):
    # Keys that stay in the environment, unused by the config, must stay out too.
    others = {"WANDB_API_KEY": "wandb-secret-0123456789abcdef", "HF_TOKEN": "hf_secretTOKEN987"}
    for key, value in others.items():
        monkeypatch.setenv(key, value)
    run_dir = tmp_path / "run"
    server = server_factory()
    url = secret_url(server)
    result = cli(
        *TINY, *SECRET_REWARD, f"reward.url={url}", "logging.wandb.mode=offline", "trainer.save_every=1",
        f"model.cache_dir={tiny_cache}", f"hydra.run.dir={run_dir}",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert status_of(run_dir)["status"] == "completed"
    assert all(h["Authorization"] == f"Bearer {token}" for h in server.headers)
    run_record = next(r for r in wandb_inspect(run_dir) if r.get("type") == "run")["run"]
    assert f"+reward.headers.Authorization='Bearer <env {TOKEN_ENV}>'" in run_record["display_name"]
    assert f"reward.url='{server.url}?key=<env {TOKEN_ENV}>'" in run_record["display_name"]
    assert {"metrics.jsonl", "config.yaml", "state.pt", "actor.safetensors"} <= {p.name for p in run_dir.rglob("*")}
    for value in (token, *others.values()):
        assert_nowhere(value, run_dir)


# The joblib launcher runs the jobs in other processes: the sweep's exit code still counts them.
@pytest.mark.parametrize(
    "launcher",
    [[], pytest.param(["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"], marks=pytest.mark.slow)],
    ids=["basic", "joblib"],
)
def test_a_sweep_with_a_failed_job_runs_the_rest_and_exits_1_naming_it(
    tmp_path, tiny_cache, token, server_factory, launcher
):
    # Job 0's endpoint answers 500, job 1's scores: the sweep goes on, then reports job 0 and exits 1.
    sweep_dir = tmp_path / "sweep"
    failing, working = server_factory(failures=10**6), server_factory()
    result = cli(
        "-m", *launcher, *TINY, *SECRET_REWARD, f"reward.url={secret_url(failing)},{secret_url(working)}",
        "logging.wandb.mode=offline", f"model.cache_dir={tiny_cache}", f"hydra.sweep.dir={sweep_dir}",
    )  # fmt: skip
    assert result.returncode == 1, result.stderr[-3000:]
    assert status_of(sweep_dir / "0")["status"] == "failed" and status_of(sweep_dir / "1")["status"] == "completed"
    assert f"1 job(s) of the sweep failed (status.json and traceback.txt there):\n  {sweep_dir / '0'}" in result.stderr
    assert token not in result.stdout + result.stderr
    assert_nowhere(token, sweep_dir)


def wait_for(condition, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


@pytest.mark.parametrize("signum", [signal.SIGHUP, signal.SIGTERM])
def test_a_signal_while_the_run_starts_stops_it_with_status_interrupted(tmp_path, tiny_cache, signum):
    # Sent once status.json says running (written before torch is imported): nothing to save yet.
    run_dir = tmp_path / "run"
    process = subprocess.Popen(
        [sys.executable, "train.py", *TINY, f"model.cache_dir={tiny_cache}", f"hydra.run.dir={run_dir}"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    wait_for(lambda: (run_dir / "status.json").exists())
    assert status_of(run_dir)["status"] == "running" and status_of(run_dir)["pid"] == process.pid
    process.send_signal(signum)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 128 + signum, stderr[-2000:]
    assert status_of(run_dir)["status"] == "interrupted"


@pytest.mark.slow  # a CLI run stopped mid-loop; not slow: the signal-at-start tests
def test_sighup_in_the_ppo_loop_stops_after_the_step_like_sigterm(tmp_path, tiny_cache):
    run_dir = tmp_path / "run"
    process = subprocess.Popen(
        [sys.executable, "train.py", *TINY, "trainer.steps=50", "logging.wandb.mode=disabled",
         f"model.cache_dir={tiny_cache}", f"hydra.run.dir={run_dir}"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    wait_for(lambda: (run_dir / "metrics.jsonl").exists())  # the loop has started: step 0 is logged
    process.send_signal(signal.SIGHUP)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGHUP, stderr[-2000:]
    status = status_of(run_dir)
    assert status["status"] == "interrupted" and Path(status["checkpoint"]).is_dir()


def test_urls_in_messages_hide_user_info_and_query():
    assert mask_url("http://user:tok3n@host:8000/score?key=tok3n#x") == "http://***@host:8000/score?***"
    assert mask_url("https://host/score") == "https://host/score"
    # http.client's own message about such a URL quotes pieces of it.
    assert mask_url_in("nonnumeric port: 'tok3n@host:8000'", "http://user:tok3n@host:8000/s") == (
        "nonnumeric port: '***@host:8000'"
    )


def test_a_signal_while_status_json_is_written_leaves_the_previous_one_whole(tmp_path, monkeypatch):
    # A second signal raises in the middle of a write: the file written so far is cut short.
    write_status(tmp_path, "running", pid=1)
    real_write_text = Path.write_text

    def cut_short(path: Path, text: str, *args, **kwargs):
        real_write_text(path, text[: len(text) // 2])
        raise KeyboardInterrupt("SIGTERM received twice")

    monkeypatch.setattr(Path, "write_text", cut_short)
    with pytest.raises(KeyboardInterrupt):
        write_status(tmp_path, "interrupted", step=3, checkpoint="step-3")
    monkeypatch.undo()
    assert status_of(tmp_path) == {"status": "running", "pid": 1}
