"""The benchmark script runs its systems on its workloads and prints the figures it promises (a smoke test:
its numbers are measured by running it, never asserted here), and its Qwen-vocabulary tokenizer keeps a
random response's length through decode and re-tokenisation, as both systems' reward inputs need."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.helpers import REPO

SCRIPT = "benchmarks/ppo_vs_trl.py"
SYSTEMS = ("rlhf", "rlhf-bf16", "trl", "trl-bf16-autocast", "trl-bf16-weights", "trl-bf16-eager")
SYSTEMS += ("trl-bf16-eager-heap",)


def test_ppo_vs_trl_lists_its_systems_and_workloads_and_rejects_unknown_ones():
    out = subprocess.run([sys.executable, SCRIPT, "--help"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "qwen-vocab" in out.stdout and all(system in out.stdout for system in SYSTEMS)
    out = subprocess.run(
        [sys.executable, SCRIPT, "--systems", "rlhf,trl-fp16"], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 2 and "unknown trl-fp16" in out.stderr and "trl-bf16-weights" in out.stderr


def test_qwen_vocab_tokenizer_reloads_beside_a_qwen2_config_and_keeps_response_lengths(tmp_path, monkeypatch):
    import torch
    from transformers import AutoTokenizer, Qwen2Config

    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    from workloads import WORKLOADS, word_tokenizer

    workload = WORKLOADS["qwen-vocab"]
    assert workload.vocab_size == 151_936
    # The reward model's folder: transformers reloads a tokenizer saved beside a Qwen2 config as Qwen2Tokenizer.
    word_tokenizer(workload).save_pretrained(tmp_path)
    Qwen2Config(vocab_size=workload.vocab_size).save_pretrained(tmp_path)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    assert len(tokenizer) == workload.vocab_size
    sampled = torch.randint(0, workload.vocab_size, (8, 64), generator=torch.Generator().manual_seed(0))
    lengths = [len(tokenizer(text)["input_ids"]) for text in tokenizer.batch_decode(sampled, skip_special_tokens=True)]
    # 256 of the 151,936 ids are bare byte symbols, which may merge with a neighbour: almost always 64.
    assert sum(length == 64 for length in lengths) >= 7 and all(60 <= length <= 64 for length in lengths)


@pytest.mark.slow
def test_ppo_vs_trl_benchmark_runs_every_system_in_its_precision():
    out = subprocess.run(
        [sys.executable, SCRIPT, "--repeats", "1", "--iterations", "1", "--systems", "all"],
        cwd=REPO, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    lines = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    by_system = {line["system"]: line for line in lines if "system" in line}
    assert set(by_system) == set(SYSTEMS)
    for figures in by_system.values():
        assert figures["iterations"] == 1 and figures["workload"] == "tiny" and figures["prompts_per_step"] == 64
        assert all(figures["phases_s"][phase] > 0 for phase in ("generation", "experience", "update"))
        assert figures["generated_tokens_per_s"] > 0 and figures["peak_rss_mb"] > 0
        assert 0 < figures["matmul_peak_fp32_gflops_per_s"] < figures["matmul_peak_bf16_gflops_per_s"]
        assert 0 < figures["update_share_of_bf16_peak"] < figures["update_share_of_fp32_peak"] < 2
    # What the Linear layers computed in (weights/output dtype, autocast), per system, in the update (grad).
    update = {system: figures["precision"]["linear/grad"] for system, figures in by_system.items()}
    assert update["rlhf"] == update["trl"] == {"weight": "float32", "output": "float32", "autocast": False}
    assert update["trl-bf16-autocast"] == {"weight": "float32", "output": "bfloat16", "autocast": True}
    assert update["trl-bf16-weights"]["weight"] == "bfloat16" and not update["trl-bf16-weights"]["autocast"]
    assert by_system["rlhf-bf16"]["precision"]["linear/no_grad"]["weight"] == "bfloat16"
    ratios = {line["ratios_for"]: line for line in lines if "ratios_for" in line}
    assert ratios["rlhf"]["speedup_over_trl_fp32"] > 0 and ratios["rlhf-bf16"]["speedup_over_trl_bf16"] > 0
    assert ratios["rlhf"]["trl_bf16"] in ("trl-bf16-autocast", "trl-bf16-weights", "trl-bf16-eager")
    # TRL bf16 is TRL as shipped; the variant with rlhf's malloc settings is a separate baseline.
    assert ratios["rlhf-bf16"]["trl_bf16_heap"] == "trl-bf16-eager-heap" and "trl_bf16" not in ratios["trl-bf16-eager"]
