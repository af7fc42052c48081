"""This machine's matrix-product peaks, float32 and bfloat16, on the shapes of a workload's products.

A square 2048 x 2048 product runs faster than the workload's thin ones (128 or 256 columns, a few hundred
rows), so the peak a PPO update can be held against is the rate of *its* products: for every nn.Linear
(in_features, out_features) of policy and critic, the three products of one mini-batch's forward +
backward on M tokens: Y = X W^T (M x in x out), dX = dY W (M x out x in), dW = dY^T X (out x M x in).
Each product's best time over a few runs is kept; the peak is the workload's FLOPs over the sum of those
best times, each shape weighted by how often it occurs (a harmonic mean, like the time the update's
products would take at those rates). bf16 here is what AMX / avx512_bf16 run.
"""

from __future__ import annotations

import time
from collections import Counter

DTYPES = ("float32", "bfloat16")
MAX_RUNS = 20  # timed runs per product after one warm-up, stopping once they have taken ...
BUDGET_S = 0.3  # ... this long (small products: 20 runs; the LM head of a 151,936 vocabulary: 1)


def best_seconds(product) -> float:
    """Best wall time of ``product()`` over up to MAX_RUNS runs after a warm-up."""
    product()
    best, spent = float("inf"), 0.0
    for _ in range(MAX_RUNS):
        start = time.perf_counter()
        product()
        elapsed = time.perf_counter() - start
        best, spent = min(best, elapsed), spent + elapsed
        if spent > BUDGET_S:
            break
    return best


def linear_seconds(tokens: int, in_features: int, out_features: int, dtype: str) -> float:
    """Best time of one Linear's forward + backward products on ``tokens`` rows (three products)."""
    import torch

    kind = getattr(torch, dtype)
    x = torch.randn(tokens, in_features, dtype=kind)
    w = torch.randn(out_features, in_features, dtype=kind)
    dy = torch.randn(tokens, out_features, dtype=kind)
    return sum(best_seconds(p) for p in (lambda: x @ w.t(), lambda: dy @ w, lambda: dy.t() @ x))


def matmul_peaks(shapes: Counter, tokens: int, threads: int) -> dict[str, float]:
    """GFLOP/s of the workload's products per dtype: ``shapes`` maps (in_features, out_features) to its count,
    ``tokens`` is the rows of one mini-batch forward."""
    import torch

    torch.set_num_threads(threads)
    flops = sum(count * 3 * 2 * tokens * i * o for (i, o), count in shapes.items())
    peaks = {}
    for dtype in DTYPES:
        seconds = sum(count * linear_seconds(tokens, i, o, dtype) for (i, o), count in shapes.items())
        peaks[dtype] = flops / seconds / 1e9
    return peaks


def square_fp32_peak(threads: int) -> float:
    """Best float32 rate of square products 512-2048 (GFLOP/s): the peak the README's earlier tables used."""
    import torch

    torch.set_num_threads(threads)
    best = 0.0
    for n in (512, 1024, 2048):
        a, b = torch.randn(n, n), torch.randn(n, n)
        best = max(best, 2 * n**3 / best_seconds(lambda: a @ b) / 1e9)  # noqa: B023 (called at once)
    return best
