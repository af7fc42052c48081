"""Log-probs and entropy of an LM head's distribution over a large vocabulary, a few rows at a time.

The plain way computes the (N, V) logits, a float32 copy, the log-softmax and, in the backward pass, their
(N, V) gradients: with Qwen2.5's 151,936-token vocabulary that is 0.6 MB per token per tensor, more than
the whole trunk's activations. Here the LM head and the log-softmax are one autograd function that goes
over C rows at a time and keeps only the hidden states, the weight and the targets (plus one float per
row); the backward pass recomputes each chunk's logits. The same idea as Liger-Kernel's fused linear
cross-entropy (Hsu et al. 2024, "Liger Kernel: Efficient Triton Kernels for LLM Training"), with the
entropy as a second output, written in torch from the gradients below.

With z = (h W^T + b) / T, p = softmax(z), lse = logsumexp(z), s = sum_j p_j z_j:

    logprob = z[target] - lse          d logprob / dz = onehot(target) - p
    entropy = lse - s                  d entropy / dz = -p * (z - s)

and the raw logits' gradient is dz / T; grad_h = g W, grad_W = g^T h, grad_b = sum of g over rows.
"""

from __future__ import annotations

import functools
import warnings

import torch


def _product_dtype(h: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype of the LM head's products: the inputs' own when they agree (bf16 weights stay bf16, as in
    the model's LM head, with no float32 copy of W), else float32 (float64 for float64 inputs)."""
    if h.dtype == weight.dtype:
        return weight.dtype
    return torch.promote_types(torch.float32, torch.promote_types(h.dtype, weight.dtype))


def _scaled_logits(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, temperature: float):
    """((C, V) logits z = (h W^T + b) / T in the product's dtype, the (C, H) h / T it multiplied). The 1 / T
    goes on the C x H rows, not on the C x V logits; ``weight`` is already in the product's dtype."""
    scaled = h.to(weight.dtype)
    if temperature != 1.0:
        scaled = scaled / temperature
    z = scaled @ weight.T
    if bias is not None:
        z += (bias / temperature).to(z.dtype)
    return z, scaled


class ChunkedLogprobEntropy(torch.autograd.Function):
    """(logprob (N,), entropy (N,)) of ``targets`` under softmax((h W^T + b) / T), C rows of h at a time;
    see the module docstring for the formulas. Use ``chunked_logprobs_entropy``.

    Per chunk: the (C, V) logits z (the LM head's product), then ``_softmax_statistics`` (forward) or
    ``_softmax_gradient`` (backward), compiled into a few fused passes over z with ``fused``."""

    @staticmethod
    def forward(ctx, h, weight, bias, targets, temperature, chunk_tokens, fused):
        with torch.autocast(h.device.type, enabled=False):  # the softmax statistics in float32 at least
            logprobs, entropy, lse = [], [], []
            w = weight.to(_product_dtype(h, weight))  # no copy unless h's and W's dtypes differ
            statistics = _fused("stats") if fused else _softmax_statistics
            for start in range(0, h.shape[0], chunk_tokens):
                rows = slice(start, start + chunk_tokens)
                z, _ = _scaled_logits(h[rows], w, bias, temperature)  # (C, V)
                for out, value in zip((lse, logprobs, entropy), statistics(z, targets[rows]), strict=True):
                    out.append(value)
        ctx.save_for_backward(h, weight, bias, targets, torch.cat(lse))
        ctx.temperature, ctx.chunk_tokens, ctx.fused = temperature, chunk_tokens, fused
        ctx.set_materialize_grads(False)  # an unused output's gradient comes as None: its terms are skipped
        return torch.cat(logprobs), torch.cat(entropy)

    @staticmethod
    def backward(ctx, grad_logprob, grad_entropy):
        h, weight, bias, targets, lse = ctx.saved_tensors
        if grad_logprob is None and grad_entropy is None:
            return None, None, None, None, None, None, None
        with torch.autocast(h.device.type, enabled=False):
            grad_h, grad_weight, grad_bias = _chunked_backward(
                h,
                weight=weight,
                bias=bias,
                targets=targets,
                lse=lse,
                grad_logprob=grad_logprob,
                grad_entropy=grad_entropy,
                temperature=ctx.temperature,
                chunk_tokens=ctx.chunk_tokens,
                fused=ctx.fused,
            )
        return (
            grad_h if ctx.needs_input_grad[0] else None,
            grad_weight if ctx.needs_input_grad[1] else None,
            grad_bias if bias is not None and ctx.needs_input_grad[2] else None,
            None,
            None,
            None,
            None,
        )


def _chunked_backward(
    h, *, weight, bias, targets, lse, grad_logprob, grad_entropy, temperature, chunk_tokens, fused=False
):
    """(grad_h, grad_weight, grad_bias) in the inputs' dtypes; the weight's and bias' sums over chunks are
    accumulated in float32 (float64 for float64 inputs). A None output gradient contributes nothing."""
    acc_dtype = torch.promote_types(torch.float32, weight.dtype)
    w = weight.to(_product_dtype(h, weight))
    grad_h = torch.empty_like(h)
    grad_weight = torch.zeros(weight.shape, dtype=acc_dtype, device=weight.device)
    grad_bias = None if bias is None else torch.zeros(bias.shape, dtype=acc_dtype, device=bias.device)
    gradient = _fused("grad") if fused else _softmax_gradient
    for start in range(0, h.shape[0], chunk_tokens):
        rows = slice(start, start + chunk_tokens)
        z, scaled = _scaled_logits(h[rows], w, bias, temperature)  # (C, V), recomputed; scaled = h / T
        zeros = torch.zeros_like(lse[rows])  # an unused output's gradient
        g_lp, g_ent = (zeros if g is None else g[rows].to(lse.dtype) for g in (grad_logprob, grad_entropy))
        gz = gradient(z, lse[rows], targets[rows], g_lp, g_ent, with_entropy=grad_entropy is not None)
        if grad_bias is not None:
            grad_bias += gz.sum(dim=0, dtype=acc_dtype) / temperature  # d z / d b = 1 / T
        gz = gz.to(w.dtype)
        grad_h[rows] = ((gz @ w) / temperature).to(h.dtype)  # d z / d h = W / T
        if w.dtype == acc_dtype:  # no (V, H) temporary per chunk; d z / d W = h / T
            grad_weight.addmm_(gz.T, scaled)
        else:
            grad_weight += (gz.T @ scaled).to(acc_dtype)
    grad_bias = None if grad_bias is None else grad_bias.to(bias.dtype)
    return grad_h, grad_weight.to(weight.dtype), grad_bias


def _softmax_statistics(z: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(lse, logprob, entropy), (C,) each in float32 (float64 for float64 z), of the (C, V) logits ``z``, with
    d = z - max, e = exp(d), S = sum e: lse = max + log S, logprob = d[target] - log S, entropy = log S - sum(e d) / S.
    One expression, which inductor fuses into two passes over z (its max, then the sums)."""
    stats = torch.promote_types(torch.float32, z.dtype)
    top = z.amax(dim=-1, keepdim=True).to(stats)
    d = z.to(stats) - top
    e = d.exp()
    total = e.sum(dim=-1)
    log_total = total.log()
    logprob = d.gather(1, targets[:, None]).squeeze(1) - log_total
    return top.squeeze(1) + log_total, logprob, log_total - (e * d).sum(dim=-1) / total


def _softmax_gradient(
    z: torch.Tensor,
    lse: torch.Tensor,
    targets: torch.Tensor,
    grad_logprob: torch.Tensor,
    grad_entropy: torch.Tensor,
    *,
    with_entropy: bool,
) -> torch.Tensor:
    """(C, V) gradient wrt the logits ``z``, in z's dtype: with d = z - lse = log p and s = sum(p z),
    -p * (g_lp + g_ent * (z - s)) + g_lp * onehot(target), where z - s = d - sum(p d). One expression: fused,
    one pass over z (two ``with_entropy``, for sum(p d))."""
    d = z.to(lse.dtype) - lse[:, None]
    p = d.exp()
    coef = grad_logprob[:, None]
    if with_entropy:
        coef = coef + grad_entropy[:, None] * (d - (p * d).sum(dim=-1, keepdim=True))
    target = torch.arange(z.shape[1], device=z.device)[None, :] == targets[:, None]
    return (torch.where(target, grad_logprob[:, None], 0.0) - p * coef).to(z.dtype)


_FUSED = {"stats": _softmax_statistics, "grad": _softmax_gradient}


@functools.cache
def _fused(name: str):
    """``_FUSED[name]`` compiled by torch.compile (inductor; dynamic shapes, so chunks of any length share one
    compiled kernel). Compiled on first use: a few seconds, cached on disk by inductor for later runs. Where it
    cannot compile (no C++ compiler, say) the same expression runs eagerly, with one warning."""
    eager, compiled = _FUSED[name], torch.compile(_FUSED[name], dynamic=True)
    state = {"kernel": compiled}

    def run(*args, **kwargs):
        try:
            return state["kernel"](*args, **kwargs)
        except Exception as error:  # inductor's failures have no common type; the eager result is the same
            if state["kernel"] is eager:
                raise
            warnings.warn(f"torch.compile of the chunked log-probs failed, so they run eagerly: {error}", stacklevel=2)
            state["kernel"] = eager
            return eager(*args, **kwargs)

    return run


def chunked_logprobs_entropy(
    h: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    temperature: float = 1.0,
    chunk_tokens: int,
    bias: torch.Tensor | None = None,
    fused: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(logprob (N,), entropy (N,)) of the (N,) ``targets`` under softmax((h W^T + b) / T), for (N, H) hidden
    states ``h``, the LM head's (V, H) ``weight`` and optional (V,) ``bias``; float32 (float64 for float64
    inputs). Equal to ``logprobs_from_logits`` and ``entropy_from_logits`` of the (N, V) logits, with their
    gradients wrt h, W and b, without ever holding more than ``chunk_tokens`` rows of logits. ``fused``: the
    element-wise work over each chunk's logits runs as torch.compile'd kernels (float32/bf16/fp16 inputs), a
    few passes over the logits instead of a dozen: worth its compile time over large vocabularies only."""
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    return ChunkedLogprobEntropy.apply(h, weight, bias, targets, temperature, chunk_tokens, fused)
