"""Which groups are most at risk: typical norms furthest below or above the other groups'."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from gradwatch.flow import FlowMatrix

__all__ = ["GroupRisk", "at_risk"]


class GroupRisk(NamedTuple):
    """A group's median log10 gradient norm, relative to the median over all groups."""

    group: str
    median_norm: float
    decades: float  # median log10 norm minus the median over groups: < 0 smaller, > 0 larger
    zero_steps: int
    nonfinite_steps: int


def at_risk(flow: FlowMatrix, top: int = 5) -> tuple[list[GroupRisk], list[GroupRisk]]:
    """The ``top`` groups with the smallest and the largest typical gradient norms.

    A zero norm counts as 1e-30 in the median, so a dead group sorts first.

    Example:
        >>> flow = FlowMatrix(("a", "b", "c"), np.array([0, 1]),
        ...                   np.array([[1.0, 1.0], [1e-6, 0.0], [1e2, np.inf]]), np.zeros((3, 2)))
        >>> smallest, largest = at_risk(flow, top=1)
        >>> smallest[0].group, smallest[0].zero_steps, largest[0].group, largest[0].nonfinite_steps
        ('b', 1, 'c', 1)
    """
    risks = []
    for i, group in enumerate(flow.groups):
        row = flow.norm[i]
        logged = row[~np.isnan(row)]
        finite = logged[np.isfinite(logged)]
        if finite.size == 0:
            median = float("nan")
        else:
            median = float(np.median(np.log10(np.maximum(finite, 1e-30))))
        zero = int((logged == 0).sum())
        nonfinite = int(np.isinf(logged).sum())
        risks.append((group, median, zero, nonfinite))
    medians = np.array([m for _, m, _, _ in risks])
    centre = float(np.nanmedian(medians)) if np.isfinite(medians).any() else 0.0
    rows = [
        GroupRisk(g, 10**m if np.isfinite(m) else float("nan"), m - centre, z, n)
        for g, m, z, n in risks
    ]
    ordered = sorted(rows, key=lambda r: (np.nan_to_num(r.decades, nan=np.inf), -r.zero_steps))
    largest = sorted(
        rows, key=lambda r: (-np.nan_to_num(r.decades, nan=np.inf), -r.nonfinite_steps)
    )
    count = min(top, len(rows))
    return ordered[:count], largest[:count]
