"""Several processes (hardware=ddp_cpu or fsdp_cpu, gloo) on the 2-core machine: torchrun runs the
real ``train.py``, rank 0 alone writes the run dir, the ranks' weights stay identical, and one PPO
iteration of 2 processes x batch b equals that of 1 process x batch 2b, replicated or sharded."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from tests.helpers import REPO, wandb_inspect
from tests.signalling import ENV, RANK_ENV

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


def run(command: list[str], expect: int = 0, **kwargs) -> subprocess.CompletedProcess:
    # A rank killed by a signal (an abort in C++) prints every thread's Python stack first.
    kwargs["env"] = {**kwargs.get("env", os.environ), "PYTHONFAULTHANDLER": "1"}
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600, **kwargs)
    assert result.returncode == expect, result.stdout[-3000:] + result.stderr[-6000:]
    return result


@pytest.mark.slow
def test_torchrun_two_processes_rank_zero_owns_the_run_dir(tiny_cache, tmp_path):
    run_dir = tmp_path / "run"
    run([*TORCHRUN, "train.py", "hardware=ddp_cpu", "trainer.steps=2", "rollout.batch_size=8",
         "ppo.minibatch_size=4", "data.num_eval=8", "logging.wandb.mode=offline", "logging.progress_bar=false",
         "logging.num_samples=32",
         f"model.cache_dir={tiny_cache}", f"hydra.run.dir={run_dir}"])  # fmt: skip
    status = json.loads((run_dir / "status.json").read_text())
    assert status["status"] == "completed" and status["world_size"] == 2
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [0, 1, 2]
    # Each step's experience is the global batch: 2 ranks x 8 prompts in the samples table of step 1.
    assert sum(json.loads(line)["step"] == 1 for line in (run_dir / "samples.jsonl").read_text().splitlines()) == 16
    assert len(list((run_dir / "wandb").glob("offline-run-*"))) == 1
    (state,) = wandb_inspect(run_dir, "--summary")
    assert state["state"] == "finished"
    assert sorted(p.name for p in (run_dir / ".hydra").iterdir()) == ["config.yaml", "hydra.yaml", "overrides.yaml"]
    assert (run_dir / "model" / "config.json").exists() and (run_dir / "checkpoints").exists()


def test_a_launch_of_several_processes_needs_one_run_dir():
    from rlhf.app.job import launch_overrides

    with pytest.raises(SystemExit, match="hydra.run.dir=DIR"):
        launch_overrides(["trainer.steps=2"], {"WORLD_SIZE": "2", "RANK": "0"})
    assert launch_overrides(["hydra.run.dir=x"], {"WORLD_SIZE": "2", "RANK": "0"}) == []
    assert "hydra.output_subdir=null" in launch_overrides(["hydra.run.dir=x"], {"WORLD_SIZE": "2", "RANK": "1"})
    assert launch_overrides([], {}) == []


def test_fsdp_shards_each_transformer_block_of_the_actor_and_of_any_critic():
    from transformers import DebertaV2Config, DebertaV2Model, Qwen2Config, Qwen2ForCausalLM

    from rlhf.models.critic import Critic
    from rlhf.runtime.distributed import fsdp_blocks

    qwen = Qwen2ForCausalLM(Qwen2Config(hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
                                        num_key_value_heads=1, intermediate_size=64, vocab_size=100))  # fmt: skip
    assert fsdp_blocks(qwen) == list(qwen.model.layers)  # named by _no_split_modules
    assert fsdp_blocks(Critic(qwen.model, 32)) == list(qwen.model.layers)
    # DeBERTa-v2 (the seed's reward model, a possible critic trunk) names no block class: its layer stack
    deberta = DebertaV2Model(DebertaV2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                             intermediate_size=64, vocab_size=100))  # fmt: skip
    assert fsdp_blocks(Critic(deberta, 32)) == list(deberta.encoder.layer)


def test_every_distributed_kind_has_a_strategy_and_one_process_communicates_nothing():
    from rlhf.config.schema import DISTRIBUTED_KINDS
    from rlhf.runtime.distributed import STRATEGIES, DeepSpeed, Distributed, LaunchSettings, Single, launch
    from rlhf.runtime.distributed.deepspeed import deepspeed_config

    assert list(STRATEGIES) == list(DISTRIBUTED_KINDS)
    assert all(issubclass(strategy, Distributed) and strategy.kind == kind for kind, strategy in STRATEGIES.items())
    settings = LaunchSettings(
        device="cpu", zero_stage=3, zero3_persistence_threshold=0, minibatch_size=4, max_grad_norm=1.0, dtype="float32"
    )
    one = launch("none", settings)
    assert type(one) is Single and (one.rank, one.world_size, one.is_main) == (0, 1, True)
    assert not one.sharded and not one.saves_engines
    tensor, mask = torch.arange(6.0).reshape(2, 3), torch.tensor([[True, False]])
    assert one.gather(tensor) is tensor and one.gather(mask, pad_first=True) is mask and one.sum(tensor) is tensor
    assert one.gather_objects([1, 2]) == [1, 2] and one.shard([1, 2, 3]) == [1, 2, 3]
    assert torch.equal(one.shard(tensor), tensor)
    assert one.mean({"a": 1.5}) == {"a": 1.5} and one.max(2.5) == 2.5 and one.all(True) and not one.all(False)
    with one.main_first():
        one.barrier()
    with pytest.raises(ValueError, match="hardware.distributed='zero9': expected one of none, ddp, fsdp, deepspeed"):
        launch("zero9", settings)
    zero3 = deepspeed_config(settings)
    assert zero3["zero_optimization"] == {"stage": 3, "stage3_param_persistence_threshold": 0}
    assert DeepSpeed(None, zero3).sharded and DeepSpeed(None, zero3).saves_engines


# DeepSpeed on CPU: the GPU presets with the CPU settings of ddp_cpu; every tensor of the tiny models
# is below ZeRO-3's default persistence threshold, so 0 makes ZeRO-3 shard them all.
DEEPSPEED_CPU = ["hardware.device=cpu", "hardware.autocast_dtype=float32", "hardware.num_threads=1",
                 "hardware.gradient_checkpointing=false", "hardware.zero3_persistence_threshold=0"]  # fmt: skip
LAUNCHES = {
    "ddp_cpu": ["hardware=ddp_cpu"], "fsdp_cpu": ["hardware=fsdp_cpu"],
    "deepspeed_zero2": ["hardware=deepspeed_zero2", *DEEPSPEED_CPU],
    "deepspeed_zero3": ["hardware=deepspeed_zero3", *DEEPSPEED_CPU],
}  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("hardware", list(LAUNCHES))
def test_two_processes_of_batch_b_equal_one_process_of_batch_2b(tiny_cache, tmp_path, hardware):
    two, one = tmp_path / "two", tmp_path / "one"
    two.mkdir(), one.mkdir()
    run([*TORCHRUN, "tests/ddp_worker.py", str(two), str(tiny_cache), "4", "2", *LAUNCHES[hardware]])
    run([sys.executable, "tests/ddp_worker.py", str(one), str(tiny_cache), "8", "4", "hardware=cpu"])
    rank0, rank1 = (torch.load(two / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    single = torch.load(one / "rank0.pt", weights_only=False)
    assert rank0["world_size"] == 2 and single["world_size"] == 1
    assert len(set(rank0["shapes"])) == 2, f"the ranks' rollouts should differ in shape: {rank0['shapes']}"
    # What each rank steps (its optimizer's parameters) and holds (the actor's weights): all of the
    # actor, or about half (DeepSpeed pads its partitions). ZeRO-3's optimizer keeps its partition
    # outside its parameter groups between steps: only the weights are counted there.
    full = single["local_actor_params"]
    expected = {"ddp_cpu": ("all", "all"), "fsdp_cpu": ("half", "half"), "deepspeed_zero2": ("half", "all"),
                "deepspeed_zero3": (None, "half")}[hardware]  # fmt: skip
    for key, share in zip(("local_actor_params", "held_actor_params"), expected, strict=True):
        counts = rank0[key], rank1[key]
        if share == "all":
            assert counts == (full, full), (key, counts)
        elif share == "half":
            assert sum(counts) >= full and max(counts) < 0.55 * full, (key, counts)

    # The key projections' biases have a gradient of 0 but for rounding (softmax ignores a constant added
    # to all of a query's scores), and Adam turns that rounding into steps of the learning rate's size:
    # there two processes and one differ by up to ~1.3e-5 (the update is ~8e-4; the fused AdamW step
    # of conf/optimizer/adamw.yaml rounds differently from the foreach one). ZeRO-3 also sums gradients
    # in another order; every other tensor is within 2e-6 there, within 1e-6 elsewhere.
    def atol_of(name: str) -> float:
        return 5e-5 if hardware == "deepspeed_zero3" or name.endswith("k_proj.bias") else 1e-6

    for model in ("actor", "critic"):
        assert set(rank0[model]) == set(single[model])
        if hardware in ("fsdp_cpu", "deepspeed_zero3"):  # rank 0 gathered the full weights; rank 1 holds none
            assert rank1[model] == {}
        for name, weight in rank0[model].items():
            if hardware in ("ddp_cpu", "deepspeed_zero2"):
                assert torch.equal(weight, rank1[model][name]), f"{model}.{name} differs between the ranks"
            where = f"{model}.{name}"
            torch.testing.assert_close(
                weight, single[model][name], rtol=1e-4, atol=atol_of(name), msg=lambda m, at=where: f"{at}: {m}"
            )
    # The update moved the weights (the comparison is not between untouched copies).
    assert sum(not torch.equal(single["initial"][n], w) for n, w in single["actor"].items()) > 10
    # Experience metrics come from the gathered global batch; update metrics are token-weighted over ranks.
    for key in ("objective/scores", "objective/kl", "adv/mean", "val/returns_mean", "rollout/response_length",
                "loss/policy", "loss/value", "loss/total", "policy/clipfrac", "policy/entropy", "val/clipfrac",
                "optim/actor_grad_norm", "optim/critic_grad_norm", "policy/ratio_dev_first"):  # fmt: skip
        assert rank0["metrics"][key] == pytest.approx(single["metrics"][key], rel=1e-4, abs=1e-6), key
    assert single["metrics"]["rollout/eos_rate"] not in (0.0, 1.0)  # ragged responses: the weighting matters


@pytest.mark.slow
@pytest.mark.parametrize("hardware", list(LAUNCHES))
def test_a_nonfinite_loss_on_one_rank_skips_the_step_on_every_rank(tiny_cache, tmp_path, hardware):
    run([*TORCHRUN, "tests/skip_worker.py", str(tmp_path), str(tiny_cache), *LAUNCHES[hardware]])
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    assert rank0["world_size"] == 2
    for rank in (rank0, rank1):  # 2 epochs x 2 mini-batches: every actor step skipped, no critic step
        assert rank["stats"]["optim/actor_skipped_steps"] == 4, rank["stats"]
        assert rank["stats"]["optim/critic_skipped_steps"] == 0, rank["stats"]
    before, after = rank0["before"], rank0["after"]
    assert all(torch.equal(before["actor"][name], weight) for name, weight in after["actor"].items())
    assert any(not torch.equal(before["critic"][name], weight) for name, weight in after["critic"].items())


@pytest.mark.slow
def test_a_stop_signal_to_one_rank_stops_every_rank_after_the_same_step(tiny_cache, tmp_path):
    # Rank 1 alone gets SIGTERM before its 9th actor optimizer step: inside step 5 (2 mini-batches
    # per step). Rank 0 must stop after step 5 too, so rank 0 can write step 5's checkpoint.
    run_dir = tmp_path / "run"
    env = {**os.environ, ENV: "9:SIGTERM", RANK_ENV: "1"}
    result = run([*TORCHRUN, "train.py", "hardware=ddp_cpu", "trainer.steps=20", "rollout.batch_size=8",
                  "ppo.minibatch_size=4", "ppo.epochs=1", "data.num_eval=8", "logging.progress_bar=false",
                  "optimizer.actor._target_=tests.signalling.SignallingAdamW",
                  "--allow-target", "tests.signalling", f"model.cache_dir={tiny_cache}",
                  f"hydra.run.dir={run_dir}"], expect=1, env=env)  # fmt: skip
    status = json.loads((run_dir / "status.json").read_text())
    assert status["status"] == "interrupted" and status["step"] == 5, status
    assert [p.name for p in (run_dir / "checkpoints").iterdir()] == ["step-00000005"]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == list(range(6))
    assert "exitcode  : 143" in result.stderr  # rank 1 exits with 128 + SIGTERM (torchrun then stops rank 0)


@pytest.mark.slow
@pytest.mark.parametrize("hardware", list(LAUNCHES))
def test_two_processes_resume_exactly_and_refuse_another_world_size(tiny_cache, tmp_path, hardware):
    # With FSDP the checkpoint holds weights and optimizer state gathered from both ranks' shards,
    # and resuming shards them again; with DeepSpeed each rank also writes, and reads back, its
    # engines' shards of the optimizer state.
    common = [*LAUNCHES[hardware], "rollout.batch_size=8", "ppo.minibatch_size=4", "ppo.epochs=2",
              "data.num_eval=8", "logging.progress_bar=false", "trainer.eval_every=100",
              "optimizer.scheduler.end_factor=1.0", f"model.cache_dir={tiny_cache}"]  # fmt: skip
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run([*TORCHRUN, "train.py", *common, "trainer.steps=4", f"hydra.run.dir={straight}"])
    run([*TORCHRUN, "train.py", *common, "trainer.steps=2", f"hydra.run.dir={resumed}"])
    run([*TORCHRUN, "train.py", *common, "trainer.steps=4", "trainer.resume=true", f"hydra.run.dir={resumed}"])

    def rows(run_dir):
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
        # less wall-clock times, and the evaluation that ends the 2-step run (at step 2 only)
        skip = ("time/", "eval/")
        return [{k: v for k, v in json.loads(line).items() if not k.startswith(skip)} for line in lines]

    assert [row["step"] for row in rows(resumed)] == list(range(5))
    assert rows(resumed) == rows(straight)  # each rank's sampling continued from its own RNG state
    from safetensors.torch import load_file

    a, b = (load_file(d / "model" / "model.safetensors") for d in (straight, resumed))
    assert set(a) == set(b) and all(torch.equal(a[name], b[name]) for name in a)
    actor = load_file(resumed / "checkpoints" / "step-00000004" / "actor.safetensors")
    assert set(actor) == set(a) and all(torch.equal(a[name], actor[name]) for name in a)  # the final weights
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(resumed / "model")  # a plain model, its LM head tied again
    assert torch.equal(model.lm_head.weight, a["model.embed_tokens.weight"])
    # A checkpoint of 2 processes cannot continue with 1: its ranks' sampling states would not fit.
    result = run([sys.executable, "train.py", *common, "trainer.steps=5", "trainer.resume=true",
                  f"hydra.run.dir={resumed}"], expect=1)  # fmt: skip
    assert "was written by a run of 2 process(es): resume it with as many (this one has 1)" in result.stderr


@pytest.mark.slow
def test_a_nan_reward_names_the_rank_and_stops_the_launch(tiny_cache, tmp_path):
    result = run([*TORCHRUN, "train.py", "hardware=ddp_cpu", "reward.fn._target_=tests.stand_ins.nan_reward",
                  "--allow-target", "tests.stand_ins", "trainer.steps=2", "rollout.batch_size=8",
                  "ppo.minibatch_size=4", "data.num_eval=8", "logging.progress_bar=false",
                  f"model.cache_dir={tiny_cache}", f"hydra.run.dir={tmp_path / 'run'}"], expect=1)  # fmt: skip
    output = result.stdout + result.stderr
    assert "held-out evaluation after step 0 on rank 0: the reward is not finite for sample(s) [1]" in output
    assert not (tmp_path / "run" / "checkpoints").exists()
