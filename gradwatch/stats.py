"""The statistics vocabulary: what is measured per tensor, and how tensors combine into groups.

Two kinds of functions live here:

* per-step functions (:func:`global_norm`, :func:`init_summary`, :func:`update_summary`) are
  pure array code over any Array-API namespace: no Python branching on array values and no host
  reads, so they run on numpy in tests and on torch tensors on a GPU without synchronising;
* host functions (:func:`aggregate`) combine per-tensor reductions into per-group statistics on
  numpy arrays, once per logging step, after the single device-to-host copy.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import numpy as np

from gradwatch.grouping import Grouping
from gradwatch.namespace import namespace_of

__all__ = [
    "GroupStats",
    "StepSummary",
    "TensorStats",
    "aggregate",
    "global_norm",
    "group_norms",
    "init_summary",
    "nonzero_sums",
    "reset_summary",
    "update_summary",
]

Array = Any


def global_norm(tensor_norms: Array) -> Array:
    """The L2 norm of all tensors together, from their L2 norms: ``sqrt(sum(norms**2))``.

    Taken as ``m * sqrt(sum((norms / m)**2))`` with ``m`` the largest norm, so that finite
    norms whose squares overflow float32 (from about 1.8e19) still give a finite result. Not
    finite when any tensor's norm is not finite (NaN or Inf in a gradient).

    Example:
        >>> float(global_norm(np.array([3.0, 4.0])))
        5.0
        >>> f"{float(global_norm(np.array([3e20, 4e20], dtype=np.float32))):.4g}"
        '5e+20'
    """
    xp = namespace_of(tensor_norms)
    if tensor_norms.shape[0] == 0:
        return xp.sum(tensor_norms)
    largest = xp.max(tensor_norms)
    scale = xp.where((largest > 0) & (largest < math.inf), largest, 1.0)
    scaled = tensor_norms / scale
    return scale * xp.sqrt(xp.sum(scaled * scaled))


class StepSummary(NamedTuple):
    """What every step leaves for the next logging step, so no spike goes unseen between logs.

    The first two count since the last logging step (:func:`reset_summary`), the last two
    since the start of the run.
    """

    max_global_norm: Array  # largest finite global norm since the last log
    nonfinite_steps: Array  # steps since the last log whose gradients were not finite
    skipped_steps: Array  # steps gradwatch dropped ("skip" or "stop"), in all
    scaler_skipped_steps: Array  # steps the loss scaler dropped (its overflow checks), in all


def init_summary(like: Array) -> StepSummary:
    """A fresh summary on the device and dtype of ``like`` (any array of that namespace)."""
    xp = namespace_of(like)
    zero = xp.zeros_like(xp.reshape(like, (-1,))[:1])[0]
    return StepSummary(zero, zero, zero, zero)


def reset_summary(summary: StepSummary) -> StepSummary:
    """The summary after a logging step: the per-interval fields start again, the totals stay."""
    zero = namespace_of(summary.max_global_norm).zeros_like(summary.max_global_norm)
    return summary._replace(max_global_norm=zero, nonfinite_steps=zero)


def update_summary(
    summary: StepSummary,
    norm: Array,
    skipped: Array | None = None,
    scaler_skipped: Array | None = None,
) -> StepSummary:
    """Fold one step into the summary: its global norm, whether gradwatch dropped it
    (``skipped``), and whether the loss scaler dropped it (``scaler_skipped``; such a step's
    non-finite gradients are the scaler's own overflow check, not a fault).

    Example:
        >>> s = init_summary(np.zeros(()))
        >>> for n in [1.0, np.nan, 7.0, 2.0]:
        ...     s = update_summary(s, np.asarray(n))
        >>> float(s.max_global_norm), float(s.nonfinite_steps)
        (7.0, 1.0)
    """
    xp = namespace_of(norm)
    finite = xp.isfinite(norm)
    nonfinite = ~finite
    if scaler_skipped is not None:
        nonfinite = nonfinite & ~scaler_skipped
        summary = summary._replace(
            scaler_skipped_steps=summary.scaler_skipped_steps
            + xp.astype(scaler_skipped, norm.dtype)
        )
    if skipped is not None:
        summary = summary._replace(
            skipped_steps=summary.skipped_steps + xp.astype(skipped, norm.dtype)
        )
    return summary._replace(
        max_global_norm=xp.maximum(summary.max_global_norm, xp.where(finite, norm, 0.0)),
        nonfinite_steps=summary.nonfinite_steps + xp.astype(nonfinite, norm.dtype),
    )


class TensorStats(NamedTuple):
    """Per-tensor reductions at a logging step, host arrays of shape ``[tensors]``.

    ``present`` marks tensors that had a gradient at this step; the other entries are ignored.
    A statistic that is None was not measured (the last step of a run, read after it ended,
    has only its gradient norms).
    """

    present: np.ndarray
    grad_norm: np.ndarray
    grad_max_abs: np.ndarray | None = None
    grad_nonfinite: np.ndarray | None = None
    param_norm: np.ndarray | None = None
    update_norm: np.ndarray | None = None


class GroupStats(NamedTuple):
    """Per-group statistics, arrays of shape ``[groups]``; ``present`` and None as in
    TensorStats."""

    present: np.ndarray
    grad_norm: np.ndarray
    grad_max_abs: np.ndarray | None
    grad_nonfinite: np.ndarray | None
    param_norm: np.ndarray | None
    grad_to_param: np.ndarray | None
    update_to_param: np.ndarray | None


def group_norms(tensor_norms: np.ndarray, group_of: np.ndarray, groups: int) -> np.ndarray:
    """Per group, the L2 norm of its tensors together: the root of their summed squared norms.

    ``group_of[i]`` is the group of tensor ``i``. A NaN or Inf norm makes only its group's norm
    non-finite.

    Example:
        >>> group_norms(np.array([3.0, 4.0, 1.0]), np.array([0, 0, 2]), 3).tolist()
        [5.0, 0.0, 1.0]
    """
    squares = np.square(tensor_norms, dtype=np.float64)
    return np.sqrt(np.bincount(group_of, weights=squares, minlength=groups))


def nonzero_sums(grouping: Grouping, tensors: np.ndarray, values: np.ndarray) -> dict[str, float]:
    """``values`` of the tensors at positions ``tensors`` summed by group, for the groups
    whose sum is not zero (a step's NaN/Inf counts, say), by group name.

    Example:
        >>> g = Grouping.build(["a.w", "a.b", "c.w"], "module")
        >>> nonzero_sums(g, np.array([0, 1, 2]), np.array([2.0, 1.0, 0.0]))
        {'a': 3.0}
    """
    tensors = np.asarray(tensors, dtype=np.int64)
    sums = np.bincount(grouping.index[tensors], weights=values, minlength=len(grouping.groups))
    return {grouping.groups[g]: float(sums[g]) for g in np.flatnonzero(sums)}


def _root_sum_square(grouping: Grouping, values: np.ndarray, present: np.ndarray) -> np.ndarray:
    return group_norms(values[present], grouping.index[present], len(grouping.groups))


def _ratio(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(denominator > 0, numerator / denominator, np.nan)


def aggregate(grouping: Grouping, stats: TensorStats) -> GroupStats:
    """Combine per-tensor reductions into per-group statistics.

    Norms combine as the root of summed squares, maxima as the maximum, counts as the sum.

    Example:
        >>> g = Grouping.build(["a.w", "a.b", "c.w"], "module")
        >>> t = TensorStats(
        ...     present=np.array([True, True, True]),
        ...     grad_norm=np.array([3.0, 4.0, 1.0]),
        ...     grad_max_abs=np.array([2.0, 3.0, 1.0]),
        ...     grad_nonfinite=np.array([0.0, 0.0, 0.0]),
        ...     param_norm=np.array([6.0, 8.0, 4.0]),
        ... )
        >>> s = aggregate(g, t)
        >>> s.grad_norm.tolist(), s.grad_max_abs.tolist(), s.grad_to_param.tolist()
        ([5.0, 1.0], [3.0, 1.0], [0.5, 0.25])
    """
    present = np.asarray(stats.present, dtype=bool)
    group_count = len(grouping.groups)
    group_present = np.zeros(group_count, dtype=bool)
    group_present[grouping.index[present]] = True
    grad_norm = _root_sum_square(grouping, stats.grad_norm, present)
    max_abs = nonfinite = param_norm = grad_to_param = update_to_param = None
    if stats.grad_max_abs is not None:
        max_abs = np.full(group_count, -np.inf)
        with np.errstate(invalid="ignore"):  # a NaN maximum is right for a NaN gradient
            np.maximum.at(max_abs, grouping.index[present], stats.grad_max_abs[present])
    if stats.grad_nonfinite is not None:
        nonfinite = np.zeros(group_count)
        np.add.at(nonfinite, grouping.index[present], stats.grad_nonfinite[present])
    if stats.param_norm is not None:
        param_norm = _root_sum_square(grouping, stats.param_norm, present)
        grad_to_param = _ratio(grad_norm, param_norm)
        if stats.update_norm is not None:
            update_norm = _root_sum_square(grouping, stats.update_norm, present)
            update_to_param = _ratio(update_norm, param_norm)
    return GroupStats(
        present=group_present,
        grad_norm=grad_norm,
        grad_max_abs=max_abs,
        grad_nonfinite=nonfinite,
        param_norm=param_norm,
        grad_to_param=grad_to_param,
        update_to_param=update_to_param,
    )
