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

import torch


def _product_dtype(h: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype of the LM head's products: the inputs' own when they agree (bf16 weights stay bf16, as in
    the model's LM head, with no float32 copy of W), else float32 (float64 for float64 inputs)."""
    if h.dtype == weight.dtype:
        return weight.dtype
    return torch.promote_types(torch.float32, torch.promote_types(h.dtype, weight.dtype))


def _logits(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, temperature: float) -> torch.Tensor:
    """(C, V) temperature-scaled logits in float32 (float64 for float64 inputs); ``weight`` already in the
    product's dtype (``_product_dtype``)."""
    logits = h.to(weight.dtype) @ weight.T
    if bias is not None:
        logits = logits + bias
    return logits.to(torch.promote_types(torch.float32, logits.dtype)).div_(temperature)  # a fresh tensor


def _row_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(C,) dot products of the rows of two (C, V) tensors, as a batched matmul: no (C, V) product in memory."""
    return (a.unsqueeze(1) @ b.unsqueeze(2)).view(-1)


class ChunkedLogprobEntropy(torch.autograd.Function):
    """(logprob (N,), entropy (N,)) of ``targets`` under softmax((h W^T + b) / T), C rows of h at a time;
    see the module docstring for the formulas. Use ``chunked_logprobs_entropy``."""

    @staticmethod
    def forward(ctx, h, weight, bias, targets, temperature, chunk_tokens):
        with torch.autocast(h.device.type, enabled=False):  # the softmax statistics in float32 at least
            logprobs, entropy, lse = [], [], []
            w = weight.to(_product_dtype(h, weight))  # no copy unless h's and W's dtypes differ
            for start in range(0, h.shape[0], chunk_tokens):
                rows = slice(start, start + chunk_tokens)
                z = _logits(h[rows], w, bias, temperature)  # (C, V)
                z_lse = torch.logsumexp(z, dim=-1)  # (C,)
                p = (z - z_lse[:, None]).exp_()
                logprobs.append(z.gather(1, targets[rows, None]).squeeze(1) - z_lse)
                entropy.append(z_lse - _row_dot(p, z))
                lse.append(z_lse)
        ctx.save_for_backward(h, weight, bias, targets, torch.cat(lse))
        ctx.temperature, ctx.chunk_tokens = temperature, chunk_tokens
        ctx.set_materialize_grads(False)  # an unused output's gradient comes as None: its terms are skipped
        return torch.cat(logprobs), torch.cat(entropy)

    @staticmethod
    def backward(ctx, grad_logprob, grad_entropy):
        h, weight, bias, targets, lse = ctx.saved_tensors
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
            )
        return (
            grad_h if ctx.needs_input_grad[0] else None,
            grad_weight if ctx.needs_input_grad[1] else None,
            grad_bias if bias is not None and ctx.needs_input_grad[2] else None,
            None,
            None,
            None,
        )


def _chunked_backward(h, *, weight, bias, targets, lse, grad_logprob, grad_entropy, temperature, chunk_tokens):
    """(grad_h, grad_weight, grad_bias) in the inputs' dtypes; the weight's and bias' sums over chunks are
    accumulated in float32 (float64 for float64 inputs). A None output gradient contributes nothing."""
    acc_dtype = torch.promote_types(torch.float32, weight.dtype)
    w = weight.to(_product_dtype(h, weight))
    grad_h = torch.empty_like(h)
    grad_weight = torch.zeros(weight.shape, dtype=acc_dtype, device=weight.device)
    grad_bias = None if bias is None else torch.zeros(bias.shape, dtype=acc_dtype, device=bias.device)
    for start in range(0, h.shape[0], chunk_tokens):
        rows = slice(start, start + chunk_tokens)
        h_c = h[rows]
        z = _logits(h_c, w, bias, temperature)  # (C, V), recomputed
        p = (z - lse[rows, None]).exp_()
        # gz = g_lp * (onehot - p) + g_ent * (-p * (z - s)) = -p * (g_lp + g_ent * (z - s)) + g_lp * onehot,
        # built in place in z's storage
        if grad_entropy is None:
            coef = z.zero_()
        else:
            s = _row_dot(p, z)[:, None]
            coef = z.sub_(s).mul_(grad_entropy[rows, None].to(z.dtype))
        if grad_logprob is not None:
            g_lp = grad_logprob[rows, None].to(z.dtype)
            coef.add_(g_lp)
        gz = coef.mul_(p).neg_()
        if grad_logprob is not None:
            gz.scatter_add_(1, targets[rows, None], g_lp)
        gz.div_(temperature)  # d z / d logits = 1 / T
        if grad_bias is not None:
            grad_bias += gz.sum(dim=0).to(acc_dtype)
        gz = gz.to(w.dtype)
        grad_h[rows] = (gz @ w).to(h.dtype)
        if w.dtype == acc_dtype:  # no (V, H) temporary per chunk
            grad_weight.addmm_(gz.T, h_c.to(w.dtype))
        else:
            grad_weight += (gz.T @ h_c.to(w.dtype)).to(acc_dtype)
    grad_bias = None if grad_bias is None else grad_bias.to(bias.dtype)
    return grad_h, grad_weight.to(weight.dtype), grad_bias


def chunked_logprobs_entropy(
    h: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    temperature: float = 1.0,
    chunk_tokens: int,
    bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(logprob (N,), entropy (N,)) of the (N,) ``targets`` under softmax((h W^T + b) / T), for (N, H) hidden
    states ``h``, the LM head's (V, H) ``weight`` and optional (V,) ``bias``; float32 (float64 for float64
    inputs). Equal to ``logprobs_from_logits`` and ``entropy_from_logits`` of the (N, V) logits, with their
    gradients wrt h, W and b, without ever holding more than ``chunk_tokens`` rows of logits."""
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    return ChunkedLogprobEntropy.apply(h, weight, bias, targets, temperature, chunk_tokens)
