"""Which groups are at risk: far from the groups of their own kind, or zero, or NaN/Inf.

Groups are compared by :meth:`~gradwatch.flow.FlowMatrix.measure`, the gradient/parameter norm
ratio, which does not grow with a group's size. That is not enough to compare a LayerNorm with
the linear layer beside it: a norm's gains are near 1 and a weight matrix's entries near 0.02,
so in a healthy transformer the ratio of every LayerNorm is one to two decades below that of
every linear layer. So a group is compared with the groups of its *kind*: those whose names
differ from its name only in their numbers (``layer2.1.bn1`` and ``layer4.0.bn2`` are one kind,
``layer2.1.conv1`` another; so are Keras' ``dense_3`` and ``dense_7``), which in a stack of
blocks are the same layer of each block. A group whose kind has fewer than
:data:`MIN_KIND` groups is compared with all groups.
"""

from __future__ import annotations

import re
from collections import defaultdict
from typing import NamedTuple

import numpy as np

from gradwatch.flow import FlowMatrix

__all__ = ["ALL_GROUPS", "DECADES", "MIN_KIND", "GroupRisk", "at_risk", "kind_of"]

DECADES = 3.0  # how far (in powers of ten) from its kind's median a group must be to be named
MIN_KIND = 3  # the fewest groups a kind needs to be a group's reference
ALL_GROUPS = "all groups"  # the reference of a group whose kind is smaller
_ZERO_LOG = -30.0  # log10 a zero counts as in medians: a dead group sorts first


class GroupRisk(NamedTuple):
    """A group's median gradient/parameter ratio over the run, against its kind's."""

    group: str
    kind: str  # what it was compared with: its kind's pattern, or ALL_GROUPS
    median: float  # the group's median over its logged steps (0 when mostly zero)
    decades: float  # log10 of its median minus the median of its reference's log10 medians
    zero_steps: int
    nonfinite_steps: int
    logged_steps: int


def kind_of(group: str) -> str:
    """The group's name with every number replaced by ``#``.

    Example:
        >>> kind_of("layer3.0.bn2"), kind_of("transformer.h.11.ln_1"), kind_of("dense_7")
        ('layer#.#.bn#', 'transformer.h.#.ln_#', 'dense_#')
    """
    return re.sub(r"\d+", "#", group)


def at_risk(
    flow: FlowMatrix, top: int = 5, decades: float = DECADES
) -> tuple[list[GroupRisk], list[GroupRisk]]:
    """The groups at risk of vanishing and of exploding, at most ``top`` of each, worst first.

    A group is named *vanishing* when its median over the run is more than ``decades`` below
    the median of its kind, or its gradient was zero at half or more of its logged steps; it is
    named *exploding* when its median is more than ``decades`` above the median of its kind, or
    its gradient was NaN or Inf at any logged step. In a healthy run no group is named. Dead
    groups do not count in their kind's median, so that a kind mostly dead does not make its
    living members look exploding.

    Example:
        >>> groups = ("embed", "h.0.fc", "h.1.fc", "h.2.fc", "h.3.fc", "h.4.fc", "head")
        >>> ratio = np.array([[1e-3], [1e-2], [0.0], [2e-2], [np.inf], [3e-2], [1.0]])
        >>> ratio = ratio.repeat(2, axis=1)
        >>> flow = FlowMatrix(groups, np.array([0, 1]), ratio, ratio)
        >>> vanishing, exploding = at_risk(flow)
        >>> [(r.group, r.kind, r.zero_steps) for r in vanishing]
        [('h.1.fc', 'h.#.fc', 2)]
        >>> [(r.group, r.nonfinite_steps) for r in exploding]
        [('h.3.fc', 2)]
    """
    values, _ = flow.measure()
    medians, zero, nonfinite, logged = [], [], [], []
    for row in values:
        seen = row[~np.isnan(row)]
        finite = seen[np.isfinite(seen)]
        with np.errstate(divide="ignore"):
            logs = np.maximum(np.log10(finite), _ZERO_LOG)
        medians.append(float(np.median(logs)) if logs.size else np.nan)
        zero.append(int((seen == 0).sum()))
        nonfinite.append(int(np.isinf(seen).sum()))
        logged.append(int(seen.size))
    dead = [n > 0 and 2 * z >= n for z, n in zip(zero, logged, strict=True)]
    references = _references(flow.groups, np.array(medians), np.array(dead, dtype=bool))
    risks = []
    for i, group in enumerate(flow.groups):
        kind, centre = references[i]
        median = medians[i]
        risks.append(
            GroupRisk(
                group,
                kind,
                10**median if median > _ZERO_LOG else 0.0 if np.isfinite(median) else np.nan,
                median - centre,
                zero[i],
                nonfinite[i],
                logged[i],
            )
        )
    vanishing = [r for r, d in zip(risks, dead, strict=True) if d or r.decades < -decades]
    exploding = [r for r in risks if r.decades > decades or r.nonfinite_steps]
    vanishing.sort(key=lambda r: (-r.zero_steps / max(r.logged_steps, 1), _or(r.decades, 0.0)))
    exploding.sort(key=lambda r: (-r.nonfinite_steps, -_or(r.decades, 0.0)))
    return vanishing[:top], exploding[:top]


def _references(
    groups: tuple[str, ...], medians: np.ndarray, dead: np.ndarray
) -> list[tuple[str, float]]:
    """Per group, what it is compared with (its kind or ALL_GROUPS) and that median, over the
    groups with a finite median that are not dead (zero at half their steps or more)."""
    known = np.isfinite(medians) & ~dead
    overall = float(np.median(medians[known])) if known.any() else np.nan
    members: dict[str, list[int]] = defaultdict(list)
    for i, group in enumerate(groups):
        if known[i]:
            members[kind_of(group)].append(i)
    references = []
    for group in groups:
        kind = kind_of(group)
        if len(members[kind]) >= MIN_KIND:
            references.append((kind, float(np.median(medians[members[kind]]))))
        else:
            references.append((ALL_GROUPS, overall))
    return references


def _or(value: float, default: float) -> float:
    return value if np.isfinite(value) else default
