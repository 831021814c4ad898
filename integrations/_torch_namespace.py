"""A thin Array-API-style namespace over torch, for the core's pure array code on a device.

``array_api_compat``'s torch namespace makes each Python scalar a tensor of its own (an extra
operation, so an extra kernel on a GPU) and asks ``torch.result_type``, which
``torch.compile`` cannot trace. The core uses a handful of functions; these hand Python
scalars to torch as they are, which torch folds into the operation.
Registering it with :func:`gradwatch.array_api.register` makes ``namespace_of(tensor)`` return
it for torch tensors.
"""

from __future__ import annotations

from typing import Any

import torch

from gradwatch import array_api

__all__ = ["install"]

bool, int64, float32, float64 = torch.bool, torch.int64, torch.float32, torch.float64
log, exp, sqrt, floor, isfinite = torch.log, torch.exp, torch.sqrt, torch.floor, torch.isfinite
zeros, full, arange, where, any, sum = (
    torch.zeros,
    torch.full,
    torch.arange,
    torch.where,
    torch.any,
    torch.sum,
)
zeros_like, ones_like, full_like, reshape = (
    torch.zeros_like,
    torch.ones_like,
    torch.full_like,
    torch.reshape,
)
concat, stack, max = torch.cat, torch.stack, torch.amax


def _tensor(value: Any, like: Any) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value
    return torch.full((), value, dtype=like.dtype, device=like.device)


def maximum(a: Any, b: Any) -> torch.Tensor:
    if not isinstance(b, torch.Tensor):
        return torch.clamp(a, min=b)
    return torch.maximum(_tensor(a, b), b)


def minimum(a: Any, b: Any) -> torch.Tensor:
    if not isinstance(b, torch.Tensor):
        return torch.clamp(a, max=b)
    return torch.minimum(_tensor(a, b), b)


def astype(a: Any, dtype: Any) -> torch.Tensor:
    return a.to(dtype)


def take(a: Any, indices: Any, axis: int | None = None) -> torch.Tensor:
    return torch.index_select(a, axis or 0, indices)


def _is_torch(array: Any) -> bool:
    return isinstance(array, torch.Tensor)


def install() -> None:
    """Let the core run on torch tensors through this namespace (safe to call more than once)."""
    import sys

    array_api.register(_is_torch, sys.modules[__name__])
