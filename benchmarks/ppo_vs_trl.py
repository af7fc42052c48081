"""Seconds per PPO iteration of ``rlhf`` and of TRL's PPOTrainer (trl==1.12.0) on one fixed workload.

    pip install -e ".[bench]"
    python benchmarks/ppo_vs_trl.py                          # workload "tiny", 5 A/B repetitions, 1 thread
    python benchmarks/ppo_vs_trl.py --threads 2              # both on 2 threads (rlhf: parallel_models)
    python benchmarks/ppo_vs_trl.py --workload small --threads 2 --repeats 2 --iterations 2
    python benchmarks/ppo_vs_trl.py --workload small --threads 2 --scaling --repeats 1 --iterations 1

Both systems load the same policy, reward model and tokenizer from one folder built here (nothing
is downloaded) and train on the same chat-templated prompts. Each repetition runs each system in a
fresh subprocess, alternating, so that drift in the machine's load hits both; a subprocess runs one
warm-up iteration and then ``--iterations`` timed ones. Printed: one JSON line per system (median
and spread of seconds per iteration, phase breakdown, generated tokens/s, peak RSS, GFLOP/s against
this machine's fp32 matmul peak measured here), then one line with the ratios.

FLOPs are the workload's model FLOPs, the same count for both systems: 2 per weight per token for a
forward (generation, reference, value and reward forwards), 6 for a forward + backward (each PPO
epoch, actor and critic), over the real (unpadded) tokens; attention scores are left out.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Workload:
    """One fixed PPO workload: model sizes and the iteration's shape."""

    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    vocab_size: int  # BPE tokens trained here (special tokens included)
    prompts_per_step: int
    new_tokens: int
    ppo_epochs: int
    mini_batches: int
    num_prompts: int = 512


WORKLOADS = {
    "tiny": Workload(128, 2, 4, 2, 256, 320, prompts_per_step=64, new_tokens=8, ppo_epochs=4, mini_batches=4),
    # 24.4M-parameter actor (8 layers of hidden 512), 32 new tokens
    "small": Workload(512, 8, 8, 4, 1408, 320, prompts_per_step=32, new_tokens=32, ppo_epochs=4, mini_batches=4),
}
# --scaling: rlhf alone, varying one of rollout batch and response length around the workload's own
SCALING_BATCHES = (16, 32, 64)
SCALING_NEW_TOKENS = (16, 32, 64)

SPECIAL = ["<pad>", "<eos>", "<|user|>", "<|assistant|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
WORDS = "what is the sum of and plus minus times a number please tell me quickly answer question".split()


def prompt_texts(n: int) -> list[str]:
    """Deterministic arithmetic questions of varied length (so that left padding is real)."""
    import random

    rng = random.Random(0)
    out = []
    for _ in range(n):
        words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 6)))
        out.append(f"{words} {rng.randint(0, 999)} + {rng.randint(0, 999)} =")
    return out


def build(workload: Workload, root: Path) -> None:
    """Tokenizer (BPE on the prompts), policy and reward model (same size), prompts.jsonl."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM, Qwen2ForSequenceClassification

    texts = prompt_texts(workload.num_prompts)
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=workload.vocab_size,
        special_tokens=SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts * 4, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>")
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(root / "tokenizer")
    config = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=workload.hidden_size, num_hidden_layers=workload.num_hidden_layers,
        num_attention_heads=workload.num_attention_heads, num_key_value_heads=workload.num_key_value_heads,
        intermediate_size=workload.intermediate_size, max_position_embeddings=256, tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.eos_token_id,
        num_labels=1,
    )  # fmt: skip
    torch.manual_seed(0)
    Qwen2ForCausalLM(config).save_pretrained(root / "policy")
    Qwen2ForSequenceClassification(config).save_pretrained(root / "reward")
    tokenizer.save_pretrained(root / "reward")  # the reward model reads text with its own tokenizer
    (root / "prompts.jsonl").write_text("".join(json.dumps({"prompt": t}) + "\n" for t in texts))


def linear_weights(model) -> int:
    """Weights that multiply every token in a forward: every nn.Linear (the LM head included)."""
    import torch

    return sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))


def workload_flops(root: Path, workload: Workload) -> dict[str, float]:
    """Model FLOPs of one iteration, by phase (see the module docstring)."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    policy = linear_weights(AutoModelForCausalLM.from_pretrained(root / "policy"))
    scorer = linear_weights(AutoModelForSequenceClassification.from_pretrained(root / "reward"))
    critic = scorer  # a trunk plus a scalar head, like the reward model
    tokenizer = AutoTokenizer.from_pretrained(root / "tokenizer")
    texts = prompt_texts(workload.num_prompts)[: workload.prompts_per_step]
    prompt_tokens = sum(
        len(
            tokenizer.apply_chat_template(
                [{"role": "user", "content": t}], add_generation_prompt=True, return_dict=False
            )
        )
        for t in texts
    )
    tokens = prompt_tokens + workload.prompts_per_step * workload.new_tokens
    return {
        "generation": 2 * policy * tokens,
        "experience": 2 * (policy + critic + scorer) * tokens,  # reference, value, reward forwards
        "update": workload.ppo_epochs * 6 * (policy + critic) * tokens,
    }


def matmul_peak_gflops(threads: int) -> float:
    """Best fp32 GEMM rate of this machine with ``threads`` threads (GFLOP/s)."""
    import torch

    torch.set_num_threads(threads)
    best = 0.0
    for n in (512, 1024, 2048):
        a, b = torch.randn(n, n), torch.randn(n, n)
        a @ b
        for _ in range(3):
            start = time.perf_counter()
            a @ b
            best = max(best, 2 * n**3 / (time.perf_counter() - start) / 1e9)
    return best


# --- the two systems, each run in its own subprocess --------------------------------------------


def rlhf_overrides(threads: int) -> list[str]:
    """rlhf's settings for the machine: with two or more threads, actor and critic run side by side."""
    return [f"hardware.num_threads={threads}"] + (["hardware.parallel_models=true"] if threads >= 2 else [])


def run_rlhf(
    root: Path, workload: Workload, iterations: int, threads: int, extra: list[str]
) -> list[dict[str, float]]:
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
        "logging.wandb.mode=disabled", f"trainer.output_dir={root / 'rlhf-run'}", *rlhf_overrides(threads), *extra,
    ]  # fmt: skip
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
    trainer, train_prompts, _ = build_trainer(cfg)
    sampler = PromptSampler(train_prompts, batch_size=batch, seed=cfg.seed)
    rows = []
    for _ in range(iterations + 1):
        metrics = trainer.step(sampler.next_batch()).metrics
        rows.append({
            "step": metrics["time/step"], "generation": metrics["time/rollout"],
            "experience": metrics["time/experience"], "update": metrics["time/update"],
            "generated_tokens": metrics["rollout/response_length"] * batch,
        })  # fmt: skip
    return rows[1:]


def run_trl(root: Path, workload: Workload, iterations: int, threads: int, extra: list[str]) -> list[dict[str, float]]:
    """TRL's PPOTrainer.train on the workload; phases timed by wrapping its module-level helpers. The
    update phase is the rest of the iteration (TRL's GAE and bookkeeping included)."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, TrainerCallback
    from trl.experimental.ppo import PPOConfig, PPOTrainer
    from trl.experimental.ppo import ppo_trainer as trl_ppo

    torch.set_num_threads(threads)
    phases = {"generation": 0.0, "experience": 0.0, "generated_tokens": 0}

    def timed(fn, phase):
        def wrapper(*args, **kwargs):
            if torch.is_grad_enabled():  # forward() also serves the update's forwards: not this phase
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

    rows, last = [], [0.0]

    class Clock(TrainerCallback):
        # TRL calls on_step_end once per PPO iteration (and no on_step_begin).
        def on_train_begin(self, args, state, control, **kwargs):
            last[0] = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            step = time.perf_counter() - last[0]
            rows.append({"step": step, **phases, "update": step - phases["generation"] - phases["experience"]})
            phases.update(generation=0.0, experience=0.0, generated_tokens=0)
            last[0] = time.perf_counter()

    tokenizer = AutoTokenizer.from_pretrained(root / "tokenizer", padding_side="left")
    texts = [json.loads(line)["prompt"] for line in (root / "prompts.jsonl").read_text().splitlines()]
    input_ids = [
        tokenizer.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True, return_dict=False)
        for t in texts
    ]
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
        args=args, processing_class=tokenizer, model=AutoModelForCausalLM.from_pretrained(root / "policy"),
        ref_model=AutoModelForCausalLM.from_pretrained(root / "policy"),
        reward_model=AutoModelForSequenceClassification.from_pretrained(root / "reward"),
        value_model=AutoModelForSequenceClassification.from_pretrained(root / "reward"),
        train_dataset=Dataset.from_dict({"input_ids": input_ids}), callbacks=[Clock()],
    )  # fmt: skip
    trainer.train()
    return rows[1:]


def worker(system: str, root: Path, workload: Workload, iterations: int, threads: int, extra: list[str]) -> None:
    run = {"rlhf": run_rlhf, "trl": run_trl}[system]
    rows = run(root, workload, iterations, threads, extra)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps({"rows": rows, "peak_rss_mb": peak_mb}))


# --- the parent: build once, alternate the systems, summarise -----------------------------------


def summarise(system: str, runs: list[dict], flops: dict[str, float], peak: float) -> dict:
    rows = [row for run in runs for row in run["rows"]]
    steps = sorted(row["step"] for row in rows)
    median = statistics.median(steps)

    def phase(name: str) -> float:
        return statistics.median(row[name] for row in rows)

    total_flops = sum(flops.values())
    return {
        "system": system,
        "iterations": len(steps),
        "s_per_iter_median": round(median, 4),
        "s_per_iter_min": round(steps[0], 4),
        "s_per_iter_max": round(steps[-1], 4),
        "iters_per_s": round(1 / median, 3),
        "phases_s": {name: round(phase(name), 4) for name in ("generation", "experience", "update")},
        "generated_tokens_per_s": round(statistics.median(r["generated_tokens"] / r["generation"] for r in rows), 1),
        "peak_rss_mb": round(max(run["peak_rss_mb"] for run in runs), 1),
        "gflops_per_s": round(total_flops / median / 1e9, 2),
        "update_gflops_per_s": round(flops["update"] / phase("update") / 1e9, 2),
        "matmul_peak_gflops_per_s": round(peak, 2),
        "update_share_of_peak": round(flops["update"] / phase("update") / 1e9 / peak, 4),
    }


def run_workers(systems: list[str], root: Path, workload: Workload, args: argparse.Namespace) -> dict[str, list[dict]]:
    """``args.repeats`` repetitions, each running every system once in a fresh subprocess, alternating."""
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled",
           "HF_HUB_DISABLE_PROGRESS_BARS": "1", "TOKENIZERS_PARALLELISM": "false"}  # fmt: skip
    runs: dict[str, list[dict]] = {s: [] for s in systems}
    for repeat in range(args.repeats):
        for system in systems if repeat % 2 == 0 else systems[::-1]:
            out = subprocess.run(
                [sys.executable, __file__, "--worker", system, "--root", str(root), "--workload-json",
                 json.dumps(asdict(workload)), "--iterations", str(args.iterations), "--threads", str(args.threads),
                 *(f"--rlhf-override={o}" for o in args.rlhf_override)],
                capture_output=True, text=True, env=env, cwd=REPO,
            )  # fmt: skip
            result = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
            if out.returncode != 0 or not result:
                sys.exit(f"{system} failed (exit {out.returncode}):\n{out.stderr[-4000:]}")
            runs[system].append(json.loads(result[-1][len("RESULT ") :]))
    return runs


def scaling(root: Path, workload: Workload, args: argparse.Namespace, peak: float) -> None:
    """rlhf alone: seconds per iteration as the rollout batch, then the response length, vary."""
    cells = [replace(workload, prompts_per_step=b) for b in SCALING_BATCHES]
    cells += [replace(workload, new_tokens=n) for n in SCALING_NEW_TOKENS if n != workload.new_tokens]
    print("| prompts / step | new tokens | s / iteration | generation | experience | update | update / matmul peak |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for cell in cells:
        runs = run_workers(["rlhf"], root, cell, args)["rlhf"]
        peak = max(peak, matmul_peak_gflops(args.threads))
        summary = summarise("rlhf", runs, workload_flops(root, cell), peak)
        print(
            json.dumps({"workload": args.workload, **asdict(cell), "threads": args.threads, **summary}),
            file=sys.stderr,
        )
        phases = summary["phases_s"]
        print(
            f"| {cell.prompts_per_step} | {cell.new_tokens} | {summary['s_per_iter_median']:.3f} | "
            f"{phases['generation']:.3f} | {phases['experience']:.3f} | {phases['update']:.3f} | "
            f"{summary['update_share_of_peak']:.0%} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workload", default="tiny", choices=sorted(WORKLOADS))
    parser.add_argument("--repeats", type=int, default=5, help="A/B repetitions (one subprocess per system each)")
    parser.add_argument("--iterations", type=int, default=3, help="timed PPO iterations per subprocess")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads for both systems")
    parser.add_argument("--systems", default="rlhf,trl")
    parser.add_argument(
        "--scaling", action="store_true", help="rlhf alone: a table over batch size and response length"
    )
    parser.add_argument("--rlhf-override", action="append", default=[], help="an extra rlhf config override")
    parser.add_argument("--worker", choices=("rlhf", "trl"), help=argparse.SUPPRESS)
    parser.add_argument("--root", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--workload-json", help=argparse.SUPPRESS)
    args = parser.parse_args()
    workload = WORKLOADS[args.workload]
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if args.worker:
        workload = Workload(**json.loads(args.workload_json))
        worker(args.worker, args.root, workload, args.iterations, args.threads, args.rlhf_override)
        return

    systems = args.systems.split(",")
    with tempfile.TemporaryDirectory(prefix="ppo-bench-") as tmp:
        root = Path(tmp)
        build(workload, root)
        peak = matmul_peak_gflops(args.threads)
        if args.scaling:
            scaling(root, workload, args, peak)
            return
        flops = workload_flops(root, workload)
        runs = run_workers(systems, root, workload, args)
        peak = max(peak, matmul_peak_gflops(args.threads))  # before and after: other load only lowers it
        summaries = {s: summarise(s, runs[s], flops, peak) for s in systems}
    context = {"workload": args.workload, **asdict(workload), "threads": args.threads, "repeats": args.repeats}
    context["rlhf_overrides"] = rlhf_overrides(args.threads) + args.rlhf_override
    for summary in summaries.values():
        print(json.dumps({**context, **summary}))
    if set(summaries) == {"rlhf", "trl"}:
        rlhf, trl = summaries["rlhf"], summaries["trl"]
        print(json.dumps({
            "workload": args.workload,
            "speedup_rlhf_over_trl": round(trl["s_per_iter_median"] / rlhf["s_per_iter_median"], 3),
            "peak_rss_ratio_rlhf_over_trl": round(rlhf["peak_rss_mb"] / trl["peak_rss_mb"], 3),
        }))  # fmt: skip


if __name__ == "__main__":
    main()
