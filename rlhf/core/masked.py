"""Masked statistics over response positions.

All functions take a tensor and a boolean ``mask`` of the same shape (True = counts). They are
pure torch so the math modules and their tests need nothing else.
"""

from __future__ import annotations

import torch


def masked_sum(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Sum of ``values`` where ``mask`` is True (over all elements, or along ``dim``)."""
    masked = torch.where(mask, values, torch.zeros_like(values))
    return masked.sum() if dim is None else masked.sum(dim=dim)


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of ``values`` where ``mask`` is True; 0 where nothing is masked in (no NaN)."""
    count = mask.sum() if dim is None else mask.sum(dim=dim)
    return masked_sum(values, mask, dim) / count.clamp(min=1)


def masked_var(values: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of the masked-in elements (Bessel-corrected unless ``unbiased`` is False)."""
    mean = masked_mean(values, mask)
    sq_dev = masked_mean((values - mean) ** 2, mask)
    count = mask.sum()
    if unbiased and count > 1:
        sq_dev = sq_dev * count / (count - 1)
    return sq_dev


def masked_whiten(
    values: torch.Tensor, mask: torch.Tensor, keep_mean: bool = False, eps: float = 1e-8
) -> torch.Tensor:
    """Normalise the masked-in elements to unit variance (and zero mean unless ``keep_mean``).

    Masked-out positions are returned as 0 so they can never leak into a later sum.
    """
    mean = masked_mean(values, mask)
    var = masked_var(values, mask)
    whitened = (values - mean) * torch.rsqrt(var + eps)
    if keep_mean:
        whitened = whitened + mean
    return torch.where(mask, whitened, torch.zeros_like(whitened))
