"""Nothing the user owns is touched and nothing logged is lost: the user's files in the run dir, a
damaged metrics row, a ``kill -9`` before W&B wrote its records, two runs in one run dir, damaged
checkpoint bytes."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from rlhf.config.redact import loggable_config
from rlhf.runtime.checkpoint import MANIFEST, complete_checkpoints, find_resume_checkpoint, save_checkpoint
from rlhf.runtime.rundir import RunDirLocked, locked_run_dir
from tests.helpers import REPO, compose, metrics_by_step, resume_cli
from tests.signalling import ENV

FAST = ["trainer.steps=2", "ppo.epochs=1", "trainer.save_every=1"]
SIGNALLING = [
    "optimizer.actor._target_=tests.signalling.SignallingAdamW",
    "--allow-target=tests.signalling",
]


@pytest.fixture(scope="module")
def finished(tmp_path_factory, tiny_cache) -> Path:
    """A finished 2-step run with checkpoints of steps 1 and 2 (tests take copies)."""
    run_dir = tmp_path_factory.mktemp("finished") / "run"
    result = resume_cli(run_dir, *FAST)
    assert result.returncode == 0, result.stderr[-2000:]
    return run_dir


def copy_of(run_dir: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(run_dir, tmp_path / "run"))


@pytest.mark.slow  # a CLI run; not slow: test_a_run_dir_in_use_refuses_...
def test_a_fresh_run_leaves_the_users_files_in_its_run_dir(tmp_path, tiny_cache):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    prompts = [f"{a}+{b}=" for a in range(6) for b in range(6)]
    data = run_dir / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    notes = run_dir / "notes.jsonl"
    notes.write_text('{"mine": 1}\n')
    before = data.read_bytes()
    dataset = [
        "data=dataset",
        f"data.path={data}",
        "data.num_eval=4",
        "data.max_prompt_length=32",
        f"data.cache_dir={tmp_path / 'datasets'}",
    ]
    result = resume_cli(run_dir, "trainer.steps=1", "ppo.epochs=1", *dataset)
    assert result.returncode == 0, result.stderr[-2000:]
    assert data.read_bytes() == before and notes.read_text() == '{"mine": 1}\n'
    trained_on = {json.loads(line)["prompt"] for line in (run_dir / "samples.jsonl").read_text().splitlines()}
    assert trained_on and trained_on <= set(prompts)


@pytest.mark.slow  # a resumed CLI run; not slow: test_a_last_row_cut_short_...
def test_a_damaged_middle_row_stops_the_resume_and_changes_nothing(finished, tmp_path):
    run_dir = copy_of(finished, tmp_path)
    path = run_dir / "metrics.jsonl"
    lines = path.read_text().splitlines(keepends=True)
    lines[1] = lines[1][:20] + "\n"  # step 1's row cut in the middle; steps 0 and 2 intact
    path.write_text("".join(lines))
    before = {p.name: p.read_bytes() for p in run_dir.glob("*.jsonl")}
    result = resume_cli(run_dir, *FAST, "trainer.steps=3")
    assert result.returncode != 0
    assert f"{path} line 2 of 3 is not a JSON object with a 'step'" in result.stderr, result.stderr[-2000:]
    assert {p.name: p.read_bytes() for p in run_dir.glob("*.jsonl")} == before


def test_a_last_row_cut_short_by_a_kill_is_still_dropped(cli_run, tmp_path):
    from rlhf.runtime.jsonl import read_rows

    path = copy_of(cli_run[0], tmp_path) / "metrics.jsonl"  # a finished 2-step run's rows
    path.write_text(path.read_text() + '{"step": 3, "objec')
    assert [row["step"] for row in read_rows(path, required_key="step")] == [0, 1, 2]


def damage_floats(path: Path) -> None:
    """200 floats of the first float tensor of a safetensors file set to 1000.0 (the file stays valid)."""
    tensors = load_file(path)
    name = next(k for k, t in tensors.items() if t.is_floating_point() and t.numel() >= 200)
    tensors[name].view(-1)[:200] = 1000.0
    save_file(tensors, str(path))


@pytest.mark.slow  # a resumed CLI run; not slow: test_a_last_row_cut_short_...
def test_damaged_weights_fall_back_to_the_previous_checkpoint(finished, tmp_path):
    run_dir = copy_of(finished, tmp_path)
    previous, latest = complete_checkpoints(run_dir / "checkpoints")
    damage_floats(latest / "actor.safetensors")
    result = resume_cli(run_dir, *FAST, "trainer.steps=3")
    assert result.returncode == 0, result.stderr[-2000:]
    output = result.stdout + result.stderr
    assert f"{latest / 'actor.safetensors'} is damaged" in output
    assert f"resuming from {previous}, the newest intact checkpoint" in output
    assert sorted(metrics_by_step(run_dir)) == [0, 1, 2, 3]
    assert [row["step"] for row in map(json.loads, (run_dir / "metrics.jsonl").open())] == [0, 1, 2, 3]
    # The run wrote step 2 again over the damaged checkpoint: a later resume finds it intact.
    from rlhf.runtime.checkpoint import damage

    assert damage(latest) is None


def test_damaged_optimizer_state_in_every_checkpoint_stops_naming_the_file(tmp_path, caplog):
    cfg = compose([f"trainer.output_dir={tmp_path}", "trainer.resume=true"])
    config_yaml = yaml.safe_dump(loggable_config(cfg), sort_keys=False)
    model = torch.nn.Linear(20, 20)
    root = tmp_path / "checkpoints"
    for step in (1, 2):
        state = {"step": step, "trainer": {"optimizer": {"exp_avg": torch.zeros(400)}}}
        save_checkpoint(
            root, step, weights={"actor": model.state_dict()}, state=state, config_yaml=config_yaml, keep_last=2
        )
    assert find_resume_checkpoint(cfg, tmp_path) == root / "step-00000002"
    for checkpoint in complete_checkpoints(root):
        state = torch.load(checkpoint / "state.pt", weights_only=True)
        state["trainer"]["optimizer"]["exp_avg"][:200] = 1000.0
        torch.save(state, checkpoint / "state.pt")
    with pytest.raises(ValueError, match=r"no intact checkpoint to resume from: .*step-00000002/state.pt is damaged"):
        find_resume_checkpoint(cfg, tmp_path)
    # A checkpoint written before checksums were stored is taken as it is, with a warning.
    manifest = json.loads((root / "step-00000002" / MANIFEST).read_text())
    del manifest["sha256"]
    (root / "step-00000002" / MANIFEST).write_text(json.dumps(manifest))
    assert find_resume_checkpoint(cfg, tmp_path) == root / "step-00000002"
    assert "holds no checksums" in caplog.text


def test_every_file_of_a_deepspeed_folder_is_checked(tmp_path):
    from rlhf.runtime.checkpoint import damage

    engines = tmp_path / ".engines"
    (engines / "actor").mkdir(parents=True)
    shard = engines / "actor" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    torch.save({"exp_avg": torch.zeros(400)}, shard)
    path = save_checkpoint(
        tmp_path / "checkpoints",
        1,
        weights={},
        state={"step": 1},
        config_yaml="a: 1\n",
        keep_last=1,
        folders={"deepspeed": engines},
    )
    manifest = json.loads((path / MANIFEST).read_text())
    assert "deepspeed/actor/zero_pp_rank_1_mp_rank_00_optim_states.pt" in manifest["sha256"]
    assert damage(path) is None
    shard = path / "deepspeed" / "actor" / shard.name
    shard.write_bytes(shard.read_bytes()[:-8] + b"\x00" * 8)
    assert damage(path) == f"{shard} is damaged (its sha256 differs from the one in {MANIFEST})"
    shard.unlink()
    assert damage(path) == f"{shard} is missing"


# Holds the run dir's lock until killed.
HOLDER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from rlhf.runtime.rundir import locked_run_dir
    with locked_run_dir(Path(sys.argv[1])):
        print("locked", flush=True)
        time.sleep(600)
""")


def test_a_run_dir_in_use_refuses_a_second_run_naming_the_holder(tmp_path, tiny_cache):
    run_dir = tmp_path / "run"
    with locked_run_dir(run_dir):
        second = resume_cli(run_dir, *FAST)
    assert second.returncode != 0
    assert f"run dir {run_dir} is in use by another run (pid {os.getpid()}" in second.stderr, second.stderr[-2000:]
    assert sorted(p.name for p in run_dir.iterdir() if not p.name.startswith((".hydra", "train.log"))) == [".lock"]
    # The OS releases the lock of a process killed with SIGKILL: the next run is not blocked by it.
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(run_dir)], cwd=REPO, stdout=subprocess.PIPE)
    assert holder.stdout.readline() == b"locked\n"
    with pytest.raises(RunDirLocked, match=f"pid {holder.pid}"), locked_run_dir(run_dir):
        pass
    holder.kill()
    holder.wait()
    with locked_run_dir(run_dir):
        assert (run_dir / ".lock").read_text() == f"{os.getpid()}\n"


def wandb_history_steps(run_dir: Path) -> list[int]:
    """The steps of the history records of every offline W&B folder of the run dir, read by ``wandb leet``."""
    wandb_cli = Path(sys.executable).with_name("wandb")
    steps = []
    for folder in sorted((run_dir / "wandb").glob("offline-run-*")):
        out = subprocess.run(
            [str(wandb_cli), "leet", "inspect", "--json", str(folder)], capture_output=True, text=True, check=True
        ).stdout
        records = [json.loads(line) for line in out.splitlines() if line.strip()]
        steps += [r["history"]["step"].get("num", 0) for r in records if r["type"] == "history"]
    return steps


@pytest.mark.slow
def test_a_run_killed_with_sigkill_and_resumed_has_every_step_once_in_wandb(tmp_path, tiny_cache):
    run_dir = tmp_path / "run"
    signalling = [
        "optimizer.actor._target_=tests.signalling.SignallingAdamW",
        "--allow-target=tests.signalling",
    ]
    killed_run = ["trainer.steps=6", "ppo.epochs=1", "trainer.save_every=1", *signalling]
    # 2 actor optimizer steps per PPO step: step 9 is inside PPO step 5, after the checkpoint of step 4.
    killed = resume_cli(run_dir, *killed_run, env={ENV: "9:SIGKILL"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert complete_checkpoints(run_dir / "checkpoints")[-1].name == "step-00000004"
    resumed = resume_cli(run_dir, *killed_run)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert sorted(metrics_by_step(run_dir)) == list(range(7))
    counts = Counter(wandb_history_steps(run_dir))
    assert sorted(counts) == list(range(7)) and set(counts.values()) == {1}, counts
