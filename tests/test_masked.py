"""Masked statistics."""

from __future__ import annotations

import pytest
import torch

from rlhf.core.masked import masked_mean, masked_var, masked_whiten
from tests.reference import ragged_mask


def test_mean_and_var_against_selected_elements():
    gen = torch.Generator().manual_seed(0)
    values = torch.randn(4, 6, generator=gen, dtype=torch.float64)
    mask = ragged_mask([0, 2, 6, 3], 6)
    selected = values[mask]
    assert masked_mean(values, mask).item() == pytest.approx(selected.mean().item(), abs=1e-12)
    assert masked_var(values, mask).item() == pytest.approx(selected.var().item(), abs=1e-12)
    assert masked_var(values, mask, unbiased=False).item() == pytest.approx(
        selected.var(unbiased=False).item(), abs=1e-12
    )
    # Per-row means; an all-masked row gives 0, not NaN.
    rows = masked_mean(values, mask, dim=1)
    assert rows[0].item() == 0.0
    assert rows[2].item() == pytest.approx(values[2].mean().item(), abs=1e-12)


def test_mean_of_nothing_is_zero():
    assert masked_mean(torch.ones(2, 3), torch.zeros(2, 3, dtype=torch.bool)).item() == 0.0


def test_whiten():
    gen = torch.Generator().manual_seed(1)
    values = 3 + 2 * torch.randn(5, 8, generator=gen, dtype=torch.float64)
    mask = ragged_mask([8, 1, 5, 0, 7], 8)
    white = masked_whiten(values, mask)
    assert white[mask].mean().item() == pytest.approx(0.0, abs=1e-9)
    assert white[mask].var().item() == pytest.approx(1.0, abs=1e-6)
    assert white[~mask].abs().sum() == 0
    kept = masked_whiten(values, mask, keep_mean=True)
    assert kept[mask].mean().item() == pytest.approx(values[mask].mean().item(), abs=1e-9)
