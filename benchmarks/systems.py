"""The systems ``ppo_vs_trl.py`` compares, each run in its own subprocess: rlhf's PPOTrainer.step and TRL's
PPOTrainer.train on the same model folders, returning seconds per iteration by phase.

    rlhf               float32 (the default)
    rlhf-bf16          + model.dtype=bfloat16 reward.dtype=bfloat16 model.attn_implementation=eager (bf16
                       weights, float32 master weights as rlhf's optimizer settings say, eager attention:
                       sdpa's CPU flash kernel is slow on these short bf16 sequences)
    trl                TRL 1.12.0 as configured today: float32 (PPOConfig's bf16=True changes nothing in its
                       PPOTrainer, whose Accelerator gets no mixed precision)
    trl-bf16-autocast  ACCELERATE_MIXED_PRECISION=bf16: accelerate's autocast around the prepared policy +
                       value model's forward (the update); generation and the reference/reward forwards
                       are not wrapped and stay float32
    trl-bf16-weights   every model loaded with dtype=torch.bfloat16 (pure bf16, AdamW on bf16 weights)
    trl-bf16-eager     trl-bf16-weights with attn_implementation="eager" too, as rlhf-bf16
    trl-bf16-eager-heap  trl-bf16-eager in a process with rlhf's glibc malloc settings (hardware.keep_freed_memory):
                       not TRL as shipped, but what the same process setting gives it
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from workloads import Workload

REPO = Path(__file__).resolve().parents[1]
RLHF_BF16 = ["model.dtype=bfloat16", "reward.dtype=bfloat16", "model.attn_implementation=eager"]
SYSTEMS = (
    *("rlhf", "rlhf-bf16", "trl", "trl-bf16-autocast", "trl-bf16-weights", "trl-bf16-eager"),
    "trl-bf16-eager-heap",
)


class PrecisionProbe:
    """What the Linear layers really compute in: for the LM head (out_features = vocabulary) and for the other
    Linears, with and without grad, the first call's weight and output dtypes and whether CPU autocast is on.
    A global module hook, removed after the warm-up iteration so that the timed ones pay nothing."""

    def __init__(self, vocab_size: int) -> None:
        import torch

        self.seen: dict[str, dict] = {}
        self.vocab_size = vocab_size
        self.handle = torch.nn.modules.module.register_module_forward_hook(self.hook)

    def hook(self, module, args, output) -> None:
        import torch

        if not isinstance(module, torch.nn.Linear) or not isinstance(output, torch.Tensor):
            return
        kind = "lm_head" if module.out_features == self.vocab_size else "linear"
        key = f"{kind}/{'grad' if torch.is_grad_enabled() else 'no_grad'}"
        self.seen.setdefault(
            key,
            {
                "weight": str(module.weight.dtype).removeprefix("torch."),
                "output": str(output.dtype).removeprefix("torch."),
                "autocast": torch.is_autocast_enabled("cpu"),
            },
        )

    def stop(self) -> None:
        self.handle.remove()


def rlhf_overrides(threads: int) -> list[str]:
    """rlhf's settings for the machine: with two or more threads, actor and critic run side by side."""
    return [f"hardware.num_threads={threads}"] + (["hardware.parallel_models=true"] if threads >= 2 else [])


def run_rlhf(root: Path, workload: Workload, iterations: int, overrides: list[str], probe: PrecisionProbe) -> list:
    """rlhf's PPOTrainer.step on the workload; returns per-iteration seconds by phase."""
    from hydra import compose, initialize_config_dir

    from rlhf.app.build import build_trainer
    from rlhf.config.schema import register_configs
    from rlhf.data.prompts import PromptSampler

    register_configs()
    batch = workload.prompts_per_step
    overrides = [
        f"model.path={root / 'policy'}", f"model.tokenizer_path={root / 'tokenizer'}",
        "reward=classifier", f"reward.path={root / 'reward'}", f"reward.batch_size={batch}",
        "data=dataset", f"data.path={root / 'prompts.jsonl'}", "data.num_eval=8", "data.max_prompt_length=64",
        f"data.cache_dir={root / 'datasets-cache'}",
        f"rollout.batch_size={batch}", f"rollout.max_new_tokens={workload.new_tokens}",
        f"ppo.epochs={workload.ppo_epochs}", f"ppo.minibatch_size={batch // workload.mini_batches}",
        "logging.wandb.mode=disabled", f"trainer.output_dir={root / 'rlhf-run'}", *overrides,
    ]  # fmt: skip
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
    trainer, train_prompts, _ = build_trainer(cfg)
    sampler = PromptSampler(train_prompts, batch_size=batch, seed=cfg.seed)
    rows = []
    for _ in range(iterations + 1):
        metrics = trainer.step(sampler.next_batch()).metrics
        probe.stop()  # after the warm-up iteration
        rows.append({
            "step": metrics["time/step"], "generation": metrics["time/rollout"],
            "experience": metrics["time/experience"], "update": metrics["time/update"],
            "generated_tokens": metrics["rollout/response_length"] * batch,
        })  # fmt: skip
    return rows[1:]


def trl_phase_timers(phases: dict) -> None:
    """Time TRL's generation and experience phases by wrapping its module-level helpers (no-grad calls only:
    forward() also serves the update's forwards)."""
    import torch
    from trl.experimental.ppo import ppo_trainer as trl_ppo

    def timed(fn, phase):
        def wrapper(*args, **kwargs):
            if torch.is_grad_enabled():
                return fn(*args, **kwargs)
            start = time.perf_counter()
            out = fn(*args, **kwargs)
            phases[phase] += time.perf_counter() - start
            if phase == "generation":
                responses = out[0][:, args[1].shape[1] :]
                phases["generated_tokens"] += int((responses != args[3]).sum())
            return out

        return wrapper

    trl_ppo.batch_generation = timed(trl_ppo.batch_generation, "generation")
    trl_ppo.forward = timed(trl_ppo.forward, "experience")
    trl_ppo.get_reward = timed(trl_ppo.get_reward, "experience")


def trl_clock(rows: list, phases: dict, probe: PrecisionProbe):
    """A TrainerCallback that appends one row per PPO iteration (TRL calls on_step_end once per iteration)."""
    from transformers import TrainerCallback

    last = [0.0]

    class Clock(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            last[0] = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            probe.stop()  # after the warm-up iteration
            step = time.perf_counter() - last[0]
            rows.append({"step": step, **phases, "update": step - phases["generation"] - phases["experience"]})
            phases.update(generation=0.0, experience=0.0, generated_tokens=0)
            last[0] = time.perf_counter()

    return Clock()


def run_trl(root: Path, workload: Workload, iterations: int, system: str, probe: PrecisionProbe) -> list:
    """TRL's PPOTrainer.train on the workload; the update phase is the rest of the iteration (TRL's GAE and
    bookkeeping included)."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    if system == "trl-bf16-autocast":  # read by PPOConfig and by the Accelerator PPOTrainer builds
        os.environ["ACCELERATE_MIXED_PRECISION"] = "bf16"
    dtype = torch.bfloat16 if system.startswith(("trl-bf16-weights", "trl-bf16-eager")) else torch.float32
    kernel = {"attn_implementation": "eager"} if system.startswith("trl-bf16-eager") else {}
    if system == "trl-bf16-eager-heap":
        from rlhf.runtime.malloc import keep_freed_memory

        assert keep_freed_memory()
    rows: list = []
    phases = {"generation": 0.0, "experience": 0.0, "generated_tokens": 0}
    trl_phase_timers(phases)
    tokenizer = AutoTokenizer.from_pretrained(root / "tokenizer", padding_side="left")
    texts = [json.loads(line)["prompt"] for line in (root / "prompts.jsonl").read_text().splitlines()]
    messages = [[{"role": "user", "content": t}] for t in texts]
    input_ids = [tokenizer.apply_chat_template(m, add_generation_prompt=True, return_dict=False) for m in messages]
    batch = workload.prompts_per_step
    args = PPOConfig(
        # TRL's per-device batch is the rollout batch; mini-batches are carved from it (one micro-batch each).
        output_dir=str(root / "trl-run"), per_device_train_batch_size=batch,
        gradient_accumulation_steps=1, num_mini_batches=workload.mini_batches, num_ppo_epochs=workload.ppo_epochs,
        response_length=workload.new_tokens, local_rollout_forward_batch_size=batch,
        total_episodes=batch * (iterations + 1), stop_token="eos", learning_rate=2e-4, report_to=[], use_cpu=True,
        num_sample_generations=0, save_strategy="no", logging_strategy="no", seed=0, kl_coef=0.05,
        dataloader_num_workers=0, temperature=1.0,
    )  # fmt: skip
    trainer = PPOTrainer(
        args=args, processing_class=tokenizer,
        model=AutoModelForCausalLM.from_pretrained(root / "policy", dtype=dtype, **kernel),
        ref_model=AutoModelForCausalLM.from_pretrained(root / "policy", dtype=dtype, **kernel),
        reward_model=AutoModelForSequenceClassification.from_pretrained(root / "reward", dtype=dtype, **kernel),
        value_model=AutoModelForSequenceClassification.from_pretrained(root / "reward", dtype=dtype, **kernel),
        train_dataset=Dataset.from_dict({"input_ids": input_ids}), callbacks=[trl_clock(rows, phases, probe)],
    )  # fmt: skip
    trainer.train()
    return rows[1:]


def worker(system: str, root: Path, workload: Workload, iterations: int, threads: int, extra: list[str]) -> None:
    """Run one system in this process and print its rows, peak RSS and precision probe as one RESULT line."""
    import resource

    import torch

    torch.set_num_threads(threads)
    probe = PrecisionProbe(json.loads((root / "policy" / "config.json").read_text())["vocab_size"])
    if system.startswith("rlhf"):
        overrides = rlhf_overrides(threads) + (RLHF_BF16 if system == "rlhf-bf16" else []) + extra
        rows = run_rlhf(root, workload, iterations, overrides, probe)
    else:
        rows = run_trl(root, workload, iterations, system, probe)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps({"rows": rows, "peak_rss_mb": peak_mb, "precision": probe.seen}))
