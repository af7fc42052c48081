"""Checkpoints and exact resume: 10 steps straight equal 5 steps plus a new process resuming for 5;
a run stopped by SIGTERM inside a PPO epoch, or killed while saving, resumes to the uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rlhf.app.run import train
from rlhf.runtime.checkpoint import MANIFEST, complete_checkpoints, load_checkpoint, save_checkpoint
from rlhf.runtime.signals import StopSignals
from rlhf.runtime.tracking import Tracker, WandbSettings
from tests.helpers import REPO, RESUME_RUN, metrics_by_step, resume_cli, wandb_inspect
from tests.signalling import ENV


@pytest.mark.slow
def test_resume_is_exact(tmp_path, tiny_cache):
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert resume_cli(straight, "trainer.steps=10").returncode == 0
    first = resume_cli(split, "trainer.steps=5")
    assert first.returncode == 0, first.stderr[-2000:]
    second = resume_cli(split, "trainer.steps=10", "trainer.resume=true")
    assert second.returncode == 0, second.stderr[-2000:]
    assert_same_run(straight, split, range(6, 11))
    rows = metrics_by_step(straight)
    assert rows[10]["objective/kl_coef"] != rows[1]["objective/kl_coef"]  # adaptive KL moved


@pytest.mark.slow
def test_resume_is_exact_without_a_critic(tmp_path, tiny_cache):
    # A critic-free estimator checkpoints the actor alone and resumes to the uninterrupted run.
    straight, split, grpo = tmp_path / "straight", tmp_path / "split", ("advantage=grpo", "rollout.n=2")
    assert resume_cli(straight, *grpo, "trainer.steps=6").returncode == 0
    first = resume_cli(split, *grpo, "trainer.steps=3")
    assert first.returncode == 0, first.stderr[-2000:]
    second = resume_cli(split, *grpo, "trainer.steps=6", "trainer.resume=true")
    assert second.returncode == 0, second.stderr[-2000:]
    assert_same_run(straight, split, range(4, 7), models=("actor",))
    assert not list(split.glob("checkpoints/*/critic.safetensors"))


def assert_same_run(straight: Path, resumed: Path, steps, models=("actor", "critic")) -> None:
    """Every step logged once; metrics of ``steps`` (less wall-clock times) and final weights of
    ``models`` bitwise equal; one W&B run."""
    a, b = metrics_by_step(straight), metrics_by_step(resumed)
    assert sorted(b) == sorted(a), "no duplicated or missing steps"
    lines = (resumed / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == len(b)
    for step in steps:
        assert a[step] == b[step], step
    for name in models:
        final = f"checkpoints/step-{max(a):08d}/{name}.safetensors"
        weights_a, weights_b = load_file(straight / final), load_file(resumed / final)
        assert weights_a.keys() == weights_b.keys()
        assert all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a), name
    runs = {p.name.rsplit("-", 1)[-1] for p in (resumed / "wandb").glob("offline-run-*")}
    assert len(runs) == 1


# The interrupted runs sign their own process from inside a PPO epoch (tests.signalling); the default
# decaying learning rate stays on, so the resumed run must also continue the schedule exactly.
SIGNALLED = [
    "trainer.steps=6", "ppo.epochs=2", "trainer.save_every=2", "optimizer.scheduler.end_factor=0.0",
    "optimizer.actor._target_=tests.signalling.SignallingAdamW", "--allow-target", "tests.signalling",
]  # fmt: skip


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tiny_cache) -> Path:
    run_dir = tmp_path_factory.mktemp("uninterrupted")
    result = resume_cli(run_dir, *SIGNALLED)
    assert result.returncode == 0, result.stderr[-2000:]
    return run_dir


@pytest.mark.slow
def test_sigterm_inside_a_ppo_epoch_stops_after_the_step_and_resumes_exactly(tmp_path, uninterrupted):
    run_dir = tmp_path / "run"
    # 2 epochs x 2 mini-batches = 4 optimizer steps per PPO step: step 10 is the 2nd epoch of PPO step 3.
    stopped = resume_cli(run_dir, *SIGNALLED, env={ENV: "10:SIGTERM"})
    assert stopped.returncode == 128 + signal.SIGTERM, stopped.stderr[-2000:]
    assert "SIGTERM: stopped after step 3 with a checkpoint" in stopped.stdout + stopped.stderr
    assert [p.name for p in complete_checkpoints(run_dir / "checkpoints")] == ["step-00000002", "step-00000003"]
    assert sorted(metrics_by_step(run_dir)) == [0, 1, 2, 3]
    assert json.loads((run_dir / "status.json").read_text())["status"] == "interrupted"
    (state,) = wandb_inspect(run_dir, "--summary")
    assert state["exit_code"] == 128 + signal.SIGTERM and state["step"] == 3
    assert any(record["type"] == "preempting" for record in wandb_inspect(run_dir))
    resumed = resume_cli(run_dir, *SIGNALLED, "trainer.resume=true")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert_same_run(uninterrupted, run_dir, range(7))


@pytest.mark.slow
def test_a_second_signal_stops_at_once_keeping_the_last_checkpoint(tmp_path, uninterrupted):
    run_dir = tmp_path / "run"
    stopped = resume_cli(run_dir, *SIGNALLED, env={ENV: "10:SIGTERM,11:SIGINT"})
    assert stopped.returncode != 0
    assert "SIGINT received twice: stopped at once" in stopped.stdout + stopped.stderr, stopped.stderr[-2000:]
    # Stopped in PPO step 3, before its checkpoint: the one of step 2 is the last, and it is complete.
    assert [p.name for p in complete_checkpoints(run_dir / "checkpoints")] == ["step-00000002"]
    resumed = resume_cli(run_dir, *SIGNALLED)  # trainer.resume=auto
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert_same_run(uninterrupted, run_dir, range(7))


@pytest.mark.slow
def test_a_signal_ends_a_sweep_and_the_same_sweep_dir_resumes_it(tmp_path, tiny_cache):
    def sweep(env=None):
        return subprocess.run(
            [sys.executable, "train.py", "-m", "seed=0,1", *RESUME_RUN, *SIGNALLED[1:], "trainer.steps=3",
             f"hydra.sweep.dir={tmp_path}"],
            cwd=REPO, capture_output=True, text=True, timeout=600, env={**os.environ, **(env or {})},
        )  # fmt: skip

    stopped = sweep({ENV: "6:SIGTERM"})  # inside PPO step 2 of job 0
    assert stopped.returncode == 128 + signal.SIGTERM, stopped.stderr[-2000:]
    assert sorted(metrics_by_step(tmp_path / "0")) == [0, 1, 2] and not (tmp_path / "1").exists()
    resumed = sweep()
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    for job in ("0", "1"):
        assert sorted(metrics_by_step(tmp_path / job)) == [0, 1, 2, 3]
        assert json.loads((tmp_path / job / "status.json").read_text())["status"] == "completed"


def test_a_second_signal_while_writing_waits_for_the_write(tmp_path):
    model = torch.nn.Linear(4, 4)
    with StopSignals() as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested and stop.signum == signal.SIGTERM
        with stop.protected():
            os.kill(os.getpid(), signal.SIGTERM)
            path = save_checkpoint(
                tmp_path, 1, weights={"m": model.state_dict()}, state={"step": 1}, config_yaml="a: 1\n", keep_last=1
            )
        with pytest.raises(KeyboardInterrupt, match="SIGTERM received twice"):
            os.kill(os.getpid(), signal.SIGTERM)
    assert complete_checkpoints(tmp_path) == [path]
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handlers are put back


# Saves checkpoints of a ~25 MB model in a loop, every weight equal to its step number.
SAVER = textwrap.dedent("""
    import sys, torch
    from pathlib import Path
    from rlhf.runtime.checkpoint import save_checkpoint
    model = torch.nn.Linear(2500, 2500)
    for step in range(1, 10_000):
        with torch.no_grad():
            for p in model.parameters():
                p.fill_(step)
        weights, state = {"m": model.state_dict()}, {"step": step}
        save_checkpoint(Path(sys.argv[1]), step, weights=weights, state=state, config_yaml="a: 1", keep_last=1)
        print(step, flush=True)
""")


@pytest.mark.slow  # a killed subprocess; not slow: test_a_crash_at_any_operation_of_a_save_...
def test_a_kill_while_saving_leaves_a_complete_checkpoint(tmp_path):
    root = tmp_path / "checkpoints"
    for delay in (0.7, 1.3, 1.9):
        saver = subprocess.Popen([sys.executable, "-c", SAVER, str(root)], cwd=REPO, stdout=subprocess.PIPE)
        saver.stdout.readline()  # one checkpoint written: from here on the kill lands in later saves
        time.sleep(delay)
        saver.kill()
        saver.wait()
        latest = complete_checkpoints(root)[-1]
        weights, state = load_checkpoint(latest, ["m"])
        assert f"step-{state['step']:08d}" == latest.name
        assert set(weights["m"]) == {"weight", "bias"}
        assert all((w == state["step"]).all() for w in weights["m"].values()), latest


class Died(BaseException):
    """The process died here (BaseException: no ``except Exception`` in the save may swallow it)."""


def test_a_crash_at_any_operation_of_a_save_leaves_a_complete_checkpoint(tmp_path, monkeypatch):
    # Every file-system operation a save makes, in turn, is where the process dies; the latest complete
    # checkpoint must then load, with weights and state of the same step, and the next save must work.
    import shutil

    import rlhf.runtime.checkpoint

    model = torch.nn.Linear(3, 3)

    def save(root, step):
        with torch.no_grad():
            for p in model.parameters():
                p.fill_(step)
        return save_checkpoint(
            root, step, weights={"m": model.state_dict()}, state={"step": step}, config_yaml="a: 1", keep_last=2
        )

    operations = [(rlhf.runtime.checkpoint, "save_file"), (torch, "save"), (Path, "write_text"), (Path, "mkdir"),
                  (os, "fsync"), (Path, "rename"), (shutil, "rmtree")]  # fmt: skip
    calls = {"count": 0, "die_at": 0}
    for owner, name in operations:
        original = getattr(owner, name)

        def counted(*args, _original=original, **kwargs):
            calls["count"] += 1
            if calls["count"] == calls["die_at"]:
                raise Died
            return _original(*args, **kwargs)

        monkeypatch.setattr(owner, name, counted)

    die_at = 0
    while True:
        die_at += 1
        root = tmp_path / f"crash-{die_at}" / "checkpoints"
        calls.update(count=0, die_at=0)
        save(root, 1), save(root, 2)
        calls.update(count=0, die_at=die_at)
        try:
            save(root, 3)
        except Died:
            pass
        else:
            break  # the save made fewer than die_at operations: every one of them has been tried
        assert complete_checkpoints(root)[-1].name in ("step-00000002", "step-00000003"), die_at
        for checkpoint in complete_checkpoints(root):  # every one listed as complete is whole
            weights, state = load_checkpoint(checkpoint, ["m"])
            assert checkpoint.name == f"step-{state['step']:08d}", die_at
            assert set(weights["m"]) == {"weight", "bias"}
            assert all((w == state["step"]).all() for w in weights["m"].values()), die_at
        calls.update(die_at=0)
        assert save(root, 4) == complete_checkpoints(root)[-1]
    assert die_at > 10  # the save was cut at each of its operations


def test_tracker_resumes_its_files_at_the_checkpoint(tmp_path):
    settings = WandbSettings(mode="disabled", project="p", name="n")
    rows = "".join(json.dumps({"step": s, "x": s}) + "\n" for s in range(4))
    (tmp_path / "metrics.jsonl").write_text(rows + '{"step": 4, "x"')  # the last line cut short by a kill
    (tmp_path / "samples.jsonl").write_text(rows)
    tracker = Tracker(tmp_path, config={}, settings=settings, run_id=None, resume_step=2)
    tracker.finish()
    assert [r["step"] for r in tracker.history()] == [0, 1, 2]
    assert (tmp_path / "samples.jsonl").read_text().count("\n") == 3
    with pytest.raises(ValueError, match="should hold steps 0..5"):
        Tracker(tmp_path, config={}, settings=settings, run_id=None, resume_step=5)
    Tracker(tmp_path, config={}, settings=settings, run_id=None).finish()  # a fresh run starts anew
    assert (tmp_path / "metrics.jsonl").read_text() == ""


def test_raising_steps_replans_the_lr_schedule(make_cfg, tmp_path):
    def lrs(run_dir):
        return [row["optim/actor_lr"] for row in map(json.loads, (run_dir / "metrics.jsonl").open()) if row["step"]]

    short = ("trainer.steps=2", "optimizer.scheduler.end_factor=0.0", "trainer.save_every=0")
    train(make_cfg(*short, f"trainer.output_dir={tmp_path / 'extended'}"))
    assert lrs(tmp_path / "extended")[-1] == pytest.approx(1e-4)  # a 2-step decay: half way at step 2
    train(make_cfg(*short, "trainer.steps=4", f"trainer.output_dir={tmp_path / 'extended'}"))
    train(make_cfg(*short, "trainer.steps=4", f"trainer.output_dir={tmp_path / 'planned'}"))
    # Steps 3 and 4 of the extended run have the rates of a run planned for 4 steps (not 0).
    assert lrs(tmp_path / "extended")[2:] == lrs(tmp_path / "planned")[2:] == pytest.approx([1e-4, 5e-5])


@pytest.mark.slow  # five CLI runs, each refusal needs the 2-step run's checkpoint
def test_resume_errors(tmp_path, tiny_cache):
    run_dir = tmp_path / "run"
    missing = resume_cli(run_dir, "trainer.steps=1", "trainer.resume=true")
    assert missing.returncode != 0 and f"no complete checkpoint in {run_dir / 'checkpoints'}" in missing.stderr
    assert resume_cli(run_dir, "trainer.steps=2").returncode == 0
    changed = resume_cli(run_dir, "trainer.steps=3", "kl.target=0.7", "gae.lam=0.9")
    assert changed.returncode != 0
    assert "changed config: gae.lam: 0.95 -> 0.9; kl.target: 0.5 -> 0.7" in changed.stderr
    fresh = resume_cli(run_dir, "trainer.steps=2", "trainer.resume=false")
    assert fresh.returncode != 0 and f"{run_dir / 'checkpoints'} holds checkpoints of an earlier run" in fresh.stderr
    fewer = resume_cli(run_dir, "trainer.steps=1")
    assert fewer.returncode != 0 and "trainer.steps=1 is below step 2 of the checkpoint" in fewer.stderr


def test_checkpoints_are_atomic_and_rotated(tmp_path):
    import torch

    root = tmp_path / "checkpoints"
    model = torch.nn.Linear(2, 2)
    for step in (1, 2, 3):
        save_checkpoint(
            root, step, weights={"m": model.state_dict()}, state={"step": step}, config_yaml="a: 1\n", keep_last=2
        )
    assert [p.name for p in complete_checkpoints(root)] == ["step-00000002", "step-00000003"]
    # A save that died before its manifest was written is not a checkpoint, and the last complete one stays.
    broken = root / ".staging-step-00000004"
    broken.mkdir()
    (broken / "m.safetensors").write_bytes(b"partial")
    assert complete_checkpoints(root)[-1].name == "step-00000003"
    assert (complete_checkpoints(root)[-1] / MANIFEST).exists()
    manifest = json.loads((root / "step-00000003" / MANIFEST).read_text())
    assert (
        manifest["step"] == 3 and manifest["versions"]["torch"] and set(manifest["files"]) == {"m", "state", "config"}
    )


def test_a_tied_parameter_is_stored_once_and_loads_under_each_of_its_names(tmp_path):
    from rlhf.runtime.checkpoint import retied, tied_names, untied

    class Tied(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed, self.head = torch.nn.Embedding(5, 3), torch.nn.Linear(3, 5, bias=False)
            self.head.weight = self.embed.weight

    model, other = Tied(), Tied()
    assert tied_names(model) == [["embed.weight", "head.weight"]]
    weights = untied(model, model.state_dict())
    assert list(weights) == ["embed.weight"]
    save_checkpoint(tmp_path, 1, weights={"m": weights}, state={"step": 1}, config_yaml="a: 1\n", keep_last=1)
    loaded, _ = load_checkpoint(tmp_path / "step-00000001", ["m"])
    other.load_state_dict(retied(other, loaded["m"]))  # strict: every name is there
    assert torch.equal(other.head.weight, model.embed.weight) and other.head.weight is other.embed.weight
