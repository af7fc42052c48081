"""Bad inputs the config names (prompt files) fail like bad config values: one ``error: ...`` line
naming the file or prompt, exit code 2, ``status.json`` failed, no traceback; a prompt file is read
before torch and transformers are imported."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from rlhf.config.errors import InputError
from rlhf.data.prompts import load_prompts, local_prompt_files

REPO = Path(__file__).resolve().parents[1]


def cli(run_dir: Path, *overrides: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "train.py", *overrides, "logging.wandb.mode=disabled", f"hydra.run.dir={run_dir}"],
        cwd=REPO, capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip


def assert_refused(result: subprocess.CompletedProcess, run_dir: Path, message: str) -> None:
    assert result.returncode == 2, result.stderr[-2000:]
    assert f"error: {message}" in result.stderr
    assert "Traceback" not in result.stderr
    status = json.loads((run_dir / "status.json").read_text())
    assert status["status"] == "failed" and status["error"].startswith("InputError: ")
    assert not (run_dir / "metrics.jsonl").exists()


def test_an_empty_prompt_is_refused_before_torch_is_imported(tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "2+2="}\n{"prompt": "  "}\n')
    # A stand-in `torch` on the path that fails on import: the refusal must come before any import of it.
    fake = tmp_path / "no_torch"
    (fake / "torch").mkdir(parents=True)
    (fake / "torch" / "__init__.py").write_text("raise ImportError('torch imported before the prompts were checked')")
    env = {**__import__("os").environ, "PYTHONPATH": f"{fake}:{REPO}"}
    run_dir = tmp_path / "run"
    result = cli(run_dir, "data=dataset", f"data.path={prompts}", env=env)
    assert_refused(result, run_dir, f"prompt 1 of '{prompts}' (column 'prompt') is empty or not text")


@pytest.mark.slow  # two CLI runs that load the tokenizer; the quick loop has the prompt-file refusal above
def test_overlong_prompts_found_after_the_tokenizer_loads_are_one_line_too(tmp_path, tiny_cache):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"{i}+{i}=" * 20}) + "\n" for i in range(10)))
    run_dir = tmp_path / "run"
    common = ["data=dataset", f"data.path={prompts}", "data.num_eval=2", f"model.cache_dir={tiny_cache}"]
    result = cli(run_dir, *common, "data.max_prompt_length=32")
    assert_refused(result, run_dir, "8 training prompt(s) exceed data.max_prompt_length=32 tokens")
    # The model's context, read from its config: 256 + 4 positions do not fit the tiny actor's 128.
    result = cli(run_dir, *common, "data.max_prompt_length=256")
    assert_refused(result, run_dir, "data.max_prompt_length=256 + rollout.max_new_tokens=4 = 260 tokens exceeds")


def test_only_local_prompt_files_are_read_early(tmp_path, make_cfg):
    (tmp_path / "p.jsonl").write_text('{"prompt": "1+1="}\n{"prompt": "2+2="}\n{"prompt": "3+3="}\n')
    assert not local_prompt_files(make_cfg().data)  # the built-in task: nothing to read
    assert not local_prompt_files(make_cfg("data=dataset", "data.path=someone/hub-dataset").data)
    data = make_cfg("data=dataset", f"data.path={tmp_path / 'p.jsonl'}", "data.num_eval=1").data
    assert local_prompt_files(data)
    assert sorted(sum(load_prompts(data), [])) == ["1+1=", "2+2=", "3+3="]
    with pytest.raises(InputError, match="data.num_eval=5 must be between 1 and 2"):
        load_prompts(make_cfg("data=dataset", f"data.path={tmp_path / 'p.jsonl'}", "data.num_eval=5").data)
