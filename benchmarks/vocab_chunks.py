"""Time and peak RSS of the actor's log-probs + entropy, forward and backward, over Qwen2.5's 151,936-token
vocabulary: the plain (B, A, V) logits against the chunked LM head (``hardware.logits_chunk_tokens``).

    python benchmarks/vocab_chunks.py                         # plain and chunks of 128, 512, 2048 tokens
    python benchmarks/vocab_chunks.py --chunks 0 256 --repeats 5 --threads 2

The model: Qwen2 architecture, vocab 151,936 (tied embeddings, as Qwen2.5-0.5B), hidden 256, 4 layers,
float32; the batch: 16 sequences of 32 prompt + 64 response tokens. Each variant runs in a fresh
subprocess (so ``ru_maxrss`` is its own peak): one warm-up step, then ``--repeats`` timed ones of
``rlhf.models.actions.action_logprobs`` with entropy and a backward pass of -(logprob + 0.01 entropy).
Printed: one JSON line per variant (median seconds, peak RSS after building the model and at the end,
the sum of the log-probs to show every variant computes the same numbers).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

VOCAB, HIDDEN, LAYERS = 151_936, 256, 4
BATCH, PROMPT, ACTIONS = 16, 32, 64


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def run_variant(chunk: int, repeats: int, threads: int) -> dict:
    """One variant in this process: ``chunk`` tokens per chunk of logits (0: the plain path)."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from rlhf.models.actions import action_logprobs

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=4 * HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    )
    model = Qwen2ForCausalLM(config)
    sequences = torch.randint(VOCAB, (BATCH, PROMPT + ACTIONS))
    attention_mask = torch.ones_like(sequences)
    built = peak_rss_mb()
    seconds, total = [], 0.0
    for _ in range(repeats + 1):  # the first one warms up
        model.zero_grad(set_to_none=True)
        started = time.perf_counter()
        logprobs, entropy = action_logprobs(
            model, sequences, attention_mask, ACTIONS, temperature=1.0, logits_chunk_tokens=str(chunk), entropy=True
        )
        (-(logprobs.mean() + 0.01 * entropy.mean())).backward()
        seconds.append(time.perf_counter() - started)
        total = float(logprobs.detach().double().sum())
    return {
        "chunk_tokens": chunk or "plain",
        "seconds": round(statistics.median(seconds[1:]), 3),
        "peak_rss_mb_built": round(built),
        "peak_rss_mb": round(peak_rss_mb()),
        "logprob_sum": round(total, 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chunks", type=int, nargs="+", default=[0, 128, 512, 2048], help="0 = plain path")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--variant", type=int, help=argparse.SUPPRESS)  # inside the subprocess
    args = parser.parse_args()
    if args.variant is not None:
        print(json.dumps(run_variant(args.variant, args.repeats, args.threads)))
        return
    root = Path(__file__).resolve().parents[1]
    print(json.dumps({"vocab": VOCAB, "hidden": HIDDEN, "layers": LAYERS, "batch": BATCH, "prompt": PROMPT}))
    for chunk in args.chunks:
        command = [sys.executable, __file__, "--variant", str(chunk), "--repeats", str(args.repeats)]
        command += ["--threads", str(args.threads)]
        out = subprocess.run(command, cwd=root, capture_output=True, text=True, check=True).stdout
        print(out.strip().splitlines()[-1], flush=True)


if __name__ == "__main__":
    main()
