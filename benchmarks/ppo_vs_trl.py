"""Seconds per PPO iteration of ``rlhf`` and of TRL's PPOTrainer (trl==1.12.0) on one fixed workload,
in float32 and in bf16.

    pip install -e ".[bench]"
    python benchmarks/ppo_vs_trl.py                          # workload "tiny", 5 A/B repetitions, 1 thread
    python benchmarks/ppo_vs_trl.py --threads 2              # every system on 2 threads (rlhf: parallel_models)
    python benchmarks/ppo_vs_trl.py --systems all            # the seven systems below, side by side
    python benchmarks/ppo_vs_trl.py --workload qwen-vocab --systems all --repeats 3 --iterations 2
    python benchmarks/ppo_vs_trl.py --workload small --threads 2 --scaling --repeats 1 --iterations 1

Workloads (workloads.py): "tiny" and "small" (320-token BPE vocabulary), "qwen-vocab" (Qwen2.5's 151,936-token
vocabulary on a hidden-256, 4-layer trunk). Systems (systems.py): rlhf, rlhf-bf16, trl (float32),
trl-bf16-autocast, trl-bf16-weights, trl-bf16-eager, trl-bf16-eager-heap (not TRL as shipped: the same process
setting as rlhf's hardware.keep_freed_memory, reported beside TRL bf16).

Every system loads the same policy, reward model and tokenizer from one folder built here (nothing is
downloaded) and trains on the same chat-templated prompts. Each repetition runs each system in a fresh
subprocess, alternating the order, so that drift in the machine's load hits all of them; a subprocess runs
one warm-up iteration and then ``--iterations`` timed ones. Printed: one JSON line per system (median and
spread of seconds per iteration, phase breakdown, generated tokens/s, peak RSS, GFLOP/s of the whole
iteration and of the update against the float32 and the bf16 matmul peaks, and ``precision``: the dtypes
the warm-up iteration's Linear layers really computed in, with and without grad, and whether autocast was
on), then one line of ratios per system against TRL float32 and, for rlhf, against TRL bf16 (the fastest
TRL bf16 variant that ran).

FLOPs are the workload's model FLOPs, the same count for every system: 2 per weight per token for a forward
(generation, reference, value and reward forwards), 6 for a forward + backward (each PPO epoch, actor and
critic), over every nn.Linear (the LM head included) and the real (unpadded) tokens; attention scores are
left out. The peaks (peaks.py) are the rates of the same products, one mini-batch's forward + backward of
every Linear, in float32 and in bf16, measured before and after the runs (the higher of the two); the square
float32 peak of the earlier README tables is printed beside them for comparison with those.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from dataclasses import asdict, replace
from pathlib import Path

from peaks import matmul_peaks, square_fp32_peak
from systems import REPO, RLHF_BF16, SYSTEMS, rlhf_overrides, worker
from workloads import WORKLOADS, Workload, build, linear_shapes, step_tokens, workload_flops

# --scaling: rlhf alone, varying one of rollout batch and response length around the workload's own
SCALING_BATCHES = (16, 32, 64)
SCALING_NEW_TOKENS = (16, 32, 64)


def measure_peaks(root: Path, workload: Workload, threads: int) -> dict[str, float]:
    """GFLOP/s peaks, float32 and bf16, on the products of one mini-batch forward + backward (see peaks.py)."""
    tokens = round(step_tokens(root, workload) / workload.mini_batches)
    return matmul_peaks(linear_shapes(root), tokens, threads)


def summarise(system: str, runs: list[dict], flops: dict[str, float], peaks: dict[str, float]) -> dict:
    """One system's figures over all its timed iterations (medians), GFLOP/s against both peaks."""
    rows = [row for run in runs for row in run["rows"]]
    steps = sorted(row["step"] for row in rows)
    median = statistics.median(steps)

    def phase(name: str) -> float:
        return statistics.median(row[name] for row in rows)

    rates = {"": sum(flops.values()) / median / 1e9, "update_": flops["update"] / phase("update") / 1e9}
    summary = {
        "system": system,
        "iterations": len(steps),
        "s_per_iter_median": round(median, 4),
        "s_per_iter_min": round(steps[0], 4),
        "s_per_iter_max": round(steps[-1], 4),
        "iters_per_s": round(1 / median, 3),
        "phases_s": {name: round(phase(name), 4) for name in ("generation", "experience", "update")},
        "generated_tokens_per_s": round(statistics.median(r["generated_tokens"] / r["generation"] for r in rows), 1),
        "peak_rss_mb": round(max(run["peak_rss_mb"] for run in runs), 1),
        "gflops_per_s": round(rates[""], 2),
        "update_gflops_per_s": round(rates["update_"], 2),
        "matmul_peak_fp32_gflops_per_s": round(peaks["float32"], 2),
        "matmul_peak_bf16_gflops_per_s": round(peaks["bfloat16"], 2),
    }
    for prefix, rate in rates.items():
        summary[f"{prefix}share_of_fp32_peak"] = round(rate / peaks["float32"], 4)
        summary[f"{prefix}share_of_bf16_peak"] = round(rate / peaks["bfloat16"], 4)
    summary["square_fp32_peak_gflops_per_s"] = round(peaks["square_fp32"], 2)
    summary["precision"] = runs[0]["precision"]  # what the warm-up iteration's Linears computed in
    return summary


def run_workers(systems: list[str], root: Path, workload: Workload, args: argparse.Namespace) -> dict[str, list[dict]]:
    """``args.repeats`` repetitions, each running every system once in a fresh subprocess, alternating."""
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled",
           "HF_HUB_DISABLE_PROGRESS_BARS": "1", "TOKENIZERS_PARALLELISM": "false"}  # fmt: skip
    env.pop("ACCELERATE_MIXED_PRECISION", None)  # only trl-bf16-autocast sets it, in its own process
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


def ratio_lines(workload_name: str, summaries: dict[str, dict]) -> list[dict]:
    """For each system but TRL float32: its speed-up and peak-RSS ratio over TRL float32 and, for the rlhf
    systems, over TRL bf16 (the fastest TRL bf16 variant that ran)."""
    trl_bf16 = [s for s in summaries if s.startswith("trl-bf16") and not s.endswith("-heap")]  # TRL as shipped
    best_bf16 = min(trl_bf16, key=lambda s: summaries[s]["s_per_iter_median"]) if trl_bf16 else None
    heap = "trl-bf16-eager-heap" if "trl-bf16-eager-heap" in summaries else None
    baselines = {"trl_fp32": "trl" if "trl" in summaries else None, "trl_bf16": best_bf16, "trl_bf16_heap": heap}
    lines = []
    for system, summary in summaries.items():
        line: dict = {"workload": workload_name, "ratios_for": system}
        for label, base in baselines.items():
            if base is None or base == system or (label != "trl_fp32" and system.startswith("trl")):
                continue
            other = summaries[base]
            line[label] = base
            line[f"speedup_over_{label}"] = round(other["s_per_iter_median"] / summary["s_per_iter_median"], 3)
            line[f"peak_rss_ratio_over_{label}"] = round(summary["peak_rss_mb"] / other["peak_rss_mb"], 3)
        if len(line) > 2:
            lines.append(line)
    return lines


def scaling(root: Path, workload: Workload, args: argparse.Namespace) -> None:
    """rlhf alone: seconds per iteration as the rollout batch, then the response length, vary."""
    cells = [replace(workload, prompts_per_step=b) for b in SCALING_BATCHES]
    cells += [replace(workload, new_tokens=n) for n in SCALING_NEW_TOKENS if n != workload.new_tokens]
    print("| prompts / step | new tokens | s / iteration | generation | experience | update | update / fp32 peak "
          "| update / bf16 peak |")  # fmt: skip
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for cell in cells:
        runs = run_workers(["rlhf"], root, cell, args)["rlhf"]
        peaks = {**measure_peaks(root, cell, args.threads), "square_fp32": square_fp32_peak(args.threads)}
        summary = summarise("rlhf", runs, workload_flops(root, cell), peaks)
        print(
            json.dumps({"workload": args.workload, **asdict(cell), "threads": args.threads, **summary}),
            file=sys.stderr,
        )
        phases = summary["phases_s"]
        print(
            f"| {cell.prompts_per_step} | {cell.new_tokens} | {summary['s_per_iter_median']:.3f} | "
            f"{phases['generation']:.3f} | {phases['experience']:.3f} | {phases['update']:.3f} | "
            f"{summary['update_share_of_fp32_peak']:.0%} | {summary['update_share_of_bf16_peak']:.0%} |"
        )


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workload", default="tiny", choices=sorted(WORKLOADS))
    parser.add_argument("--repeats", type=int, default=5, help="A/B repetitions (one subprocess per system each)")
    parser.add_argument("--iterations", type=int, default=3, help="timed PPO iterations per subprocess")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads for every system")
    parser.add_argument(
        "--systems", default="rlhf,trl", help=f"comma-separated, among: {', '.join(SYSTEMS)}; or all of them: all"
    )
    parser.add_argument(
        "--scaling", action="store_true", help="rlhf alone: a table over batch size and response length"
    )
    parser.add_argument("--rlhf-override", action="append", default=[], help="an extra rlhf config override")
    parser.add_argument("--worker", choices=SYSTEMS, help=argparse.SUPPRESS)
    parser.add_argument("--root", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--workload-json", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.systems = list(SYSTEMS) if args.systems == "all" else args.systems.split(",")
    unknown = [s for s in args.systems if s not in SYSTEMS]
    if unknown:
        parser.error(f"--systems: unknown {', '.join(unknown)}; allowed: {', '.join(SYSTEMS)}")
    return args


def main() -> None:
    args = parse_args()
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if args.worker:
        workload = Workload(**json.loads(args.workload_json))
        worker(args.worker, args.root, workload, args.iterations, args.threads, args.rlhf_override)
        return
    workload = WORKLOADS[args.workload]
    with tempfile.TemporaryDirectory(prefix="ppo-bench-") as tmp:
        root = Path(tmp)
        build(workload, root)
        if args.scaling:
            scaling(root, workload, args)
            return
        peaks = {**measure_peaks(root, workload, args.threads), "square_fp32": square_fp32_peak(args.threads)}
        flops = workload_flops(root, workload)
        runs = run_workers(args.systems, root, workload, args)
        # before and after the runs, the higher of the two: other load on the machine only lowers a peak
        after = {**measure_peaks(root, workload, args.threads), "square_fp32": square_fp32_peak(args.threads)}
        peaks = {key: max(peaks[key], after[key]) for key in peaks}
        summaries = {s: summarise(s, runs[s], flops, peaks) for s in args.systems}
    context = {"workload": args.workload, **asdict(workload), "threads": args.threads, "repeats": args.repeats}
    for system, summary in summaries.items():
        bf16 = RLHF_BF16 if system == "rlhf-bf16" else []
        overrides = {"rlhf_overrides": rlhf_overrides(args.threads) + bf16 + args.rlhf_override}
        print(json.dumps({**context, **(overrides if system.startswith("rlhf") else {}), **summary}))
    for line in ratio_lines(args.workload, summaries):
        print(json.dumps(line))


if __name__ == "__main__":
    main()
