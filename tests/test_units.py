"""AGC's output units on torch tensors: every unit measured and scaled as one tensor at a time
would, whatever the shapes, memory formats and dtypes of the tensors."""

from __future__ import annotations

import pytest

pytest.importorskip("torch")

import torch

from gradwatch.integrations._units import UnitLayout


def tensors() -> list[torch.Tensor]:
    torch.manual_seed(0)
    return [
        torch.randn(8, 3, 3, 3),  # a conv kernel: 8 units of 27
        torch.randn(8),  # its bias: one unit
        torch.randn(6, 27, 1, 1),  # the same units' size, another shape after dim 0
        torch.randn(5, 3, 3, 3).to(memory_format=torch.channels_last),
        torch.randn(4, 16),
        torch.randn(2, 16).bfloat16(),
        torch.randn(()),  # a scalar parameter: one unit
        torch.randn(3, 16),
        torch.randn(2**20 // 16, 16),  # measured where it is, not catenated
    ]


def one_at_a_time(tensor: torch.Tensor) -> torch.Tensor:
    if tensor.ndim > 1:
        return tensor.float().flatten(1).norm(dim=1)
    return tensor.float().norm().reshape(1)


def test_norms_are_each_units_norm():
    ts = tensors()
    layout = UnitLayout([t.shape for t in ts])
    norms = layout.norms(ts)
    assert layout.units == norms.numel() == 8 + 1 + 6 + 5 + 4 + 2 + 1 + 3 + 2**16
    assert sorted(norms.tolist()) == pytest.approx(
        sorted(torch.cat([one_at_a_time(t) for t in ts]).tolist()), rel=1e-5
    )
    whole = torch.stack([t.float().norm() for t in ts])  # what the engine measured already
    assert layout.norms(ts, whole).tolist() == pytest.approx(norms.tolist(), rel=1e-5)


def test_scaling_divides_each_unit_by_its_own_norm():
    """Scale every unit by 1 / its norm: each unit of each tensor then has norm 1, in place."""
    ts = tensors()
    layout = UnitLayout([t.shape for t in ts])
    before = [t.data_ptr() for t in ts]
    layout.scale_(ts, 1 / layout.norms(ts))
    assert [t.data_ptr() for t in ts] == before
    assert ts[3].is_contiguous(memory_format=torch.channels_last)
    for t in ts:
        tolerance = 1e-2 if t.dtype == torch.bfloat16 else 1e-5
        assert one_at_a_time(t).tolist() == pytest.approx(
            [1.0] * len(one_at_a_time(t)), rel=tolerance
        )
