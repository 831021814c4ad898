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
from collections.abc import Mapping, Sequence
from typing import Any, Literal, NamedTuple

import numpy as np

from gradwatch.array_api import namespace_of
from gradwatch.grouping import Grouping

__all__ = [
    "MEASURES",
    "RATIOS",
    "Measure",
    "StepSummary",
    "TensorStats",
    "aggregate",
    "global_norm",
    "group_norms",
    "init_summary",
    "measures_for",
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
    fields = (xp.zeros_like(xp.reshape(like, (-1,))[:1])[0] for _ in StepSummary._fields)
    return StepSummary(*fields)  # no two fields one array: no aliasing


def reset_summary(summary: StepSummary) -> StepSummary:
    """The summary after a logging step: the per-interval fields start again, the totals stay."""
    zeros_like = namespace_of(summary.max_global_norm).zeros_like
    return summary._replace(
        max_global_norm=zeros_like(summary.max_global_norm),
        nonfinite_steps=zeros_like(summary.nonfinite_steps),
    )


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


class Measure(NamedTuple):
    """A per-tensor statistic, declared once for every engine and for the record builder.

    Attributes:
        name: its name in :class:`TensorStats` (and the per-group tag's prefix where it is
            written as it is).
        of: what it reduces: ``"grad"``, ``"param"``, or ``"update"`` (the change the
            optimizer step made to the parameter).
        reduce: how a tensor becomes one number: ``"norm"`` (L2), ``"max_abs"`` (largest
            absolute value, the infinity norm) or ``"nonfinite"`` (count of NaN/Inf values; 0
            wherever the tensor's norm is finite, so an engine may count only where it is not).
        combine: how the numbers of a group's tensors, and of a sharded tensor's shards, make
            one: ``"norm"`` (root of summed squares), ``"max"`` or ``"sum"``.
    """

    name: str
    of: Literal["grad", "param", "update"]
    reduce: Literal["norm", "max_abs", "nonfinite"]
    combine: Literal["norm", "max", "sum"]


GRAD_NORM = Measure("grad_norm", "grad", "norm", "norm")
MEASURES = (
    GRAD_NORM,
    Measure("grad_max_abs", "grad", "max_abs", "max"),
    Measure("grad_nonfinite", "grad", "nonfinite", "sum"),
    Measure("param_norm", "param", "norm", "norm"),
    Measure("update_norm", "update", "norm", "norm"),
)
"""Every per-tensor statistic, in the order engines transfer them."""

RATIOS = {
    "grad_to_param": ("grad_norm", "param_norm"),
    "update_to_param": ("update_norm", "param_norm"),
}
"""Per-group statistics that are ratios of two combined measures: ``name -> (numerator,
denominator)``."""


def measures_for(statistics: Sequence[str]) -> tuple[Measure, ...]:
    """The measures a logging step takes to write the per-group ``statistics``, in
    :data:`MEASURES` order; the gradient norm and the NaN/Inf count always (the events say how
    many values were not finite).

    Example:
        >>> [m.name for m in measures_for(["grad_norm", "grad_to_param"])]
        ['grad_norm', 'grad_nonfinite', 'param_norm']
    """
    names = {GRAD_NORM.name, "grad_nonfinite"}
    for statistic in statistics:
        names.update(RATIOS.get(statistic, (statistic,)))
    return tuple(m for m in MEASURES if m.name in names)


class TensorStats(NamedTuple):
    """Per-tensor measures of one step, host arrays of shape ``[tensors]``.

    ``present`` marks tensors that had a gradient at this step; the other entries are ignored.
    ``values`` holds the measures taken, by :attr:`Measure.name` (the last step of a run, read
    after it ended, has only its gradient norms).
    """

    present: np.ndarray
    values: Mapping[str, np.ndarray]


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


def _combine(rule: str, grouping: Grouping, values: np.ndarray, present: np.ndarray) -> np.ndarray:
    """Per group, its present tensors' ``values`` combined by ``rule`` (see :class:`Measure`)."""
    index, values = grouping.index[present], values[present]
    groups = len(grouping.groups)
    if rule == "norm":
        return group_norms(values, index, groups)
    if rule == "sum":
        return np.bincount(index, weights=values, minlength=groups).astype(np.float64)
    out = np.full(groups, -np.inf)
    with np.errstate(invalid="ignore"):  # a NaN maximum is right for a NaN gradient
        np.maximum.at(out, index, values)
    return out


def aggregate(grouping: Grouping, stats: TensorStats) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Per-group statistics from per-tensor measures: which groups had a gradient
    (``[groups]`` bools), and by name every measure taken, combined by its rule, and every
    ratio of :data:`RATIOS` whose parts were taken (NaN where the denominator is 0).

    Example:
        >>> g = Grouping.build(["a.w", "a.b", "c.w"], "module")
        >>> t = TensorStats(np.array([True, True, True]), {
        ...     "grad_norm": np.array([3.0, 4.0, 1.0]),
        ...     "grad_max_abs": np.array([2.0, 3.0, 1.0]),
        ...     "param_norm": np.array([6.0, 8.0, 4.0]),
        ... })
        >>> present, s = aggregate(g, t)
        >>> s["grad_norm"].tolist(), s["grad_max_abs"].tolist(), s["grad_to_param"].tolist()
        ([5.0, 1.0], [3.0, 1.0], [0.5, 0.25])
    """
    present = np.asarray(stats.present, dtype=bool)
    groups = np.zeros(len(grouping.groups), dtype=bool)
    groups[grouping.index[present]] = True
    out = {
        m.name: _combine(m.combine, grouping, np.asarray(stats.values[m.name]), present)
        for m in MEASURES
        if m.name in stats.values
    }
    for name, (numerator, denominator) in RATIOS.items():
        if numerator in out and denominator in out:
            with np.errstate(divide="ignore", invalid="ignore"):
                top, bottom = out[numerator], out[denominator]
                out[name] = np.where(bottom > 0, top / bottom, np.nan)
    return groups, out
