"""Which groups are at risk: far from the groups of their own kind, or zero, or NaN/Inf.

Groups are compared by :meth:`~gradwatch.pictures.FlowMatrix.measure`, the gradient/parameter norm
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

from gradwatch.pictures.history import FlowMatrix

__all__ = ["ALL_GROUPS", "DECADES", "MIN_KIND", "GroupRisk", "at_risk", "kind_of"]

# How far (in powers of ten) from its kind a group must be to be named. Healthy runs of a ResNet,
# a GPT-2 and an LSTM keep every group within 0.8 decades of its kind's median (1.3 where the
# kind is all groups); a 20-layer ReLU net's first layers are 3 decades below its median layer.
DECADES = 2.5
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
    the median of its kind, or its gradient was zero at half or more of its logged steps. It is
    named *exploding* when its gradient was NaN or Inf at any logged step, or when it stands out
    above the rest of its kind: it is among fewer than half of the kind's groups that are more
    than ``decades`` above all the others. The rules differ because gradients vanish along the
    depth, each layer a little below the next: a deep sigmoid net's first layers are named, not
    its last ones, which are no more than a little above their neighbours. In a healthy run no
    group is named. Dead groups (mostly zero) count in no reference.

    Example:
        >>> groups = ("embed", "h.0.fc", "h.1.fc", "h.2.fc", "h.3.fc", "h.4.fc", "head")
        >>> ratio = np.array([[1e-3], [1e-2], [0.0], [2e-2], [np.inf], [30.0], [1.0]])
        >>> ratio = ratio.repeat(2, axis=1)
        >>> flow = FlowMatrix(groups, np.array([0, 1]), ratio, ratio)
        >>> vanishing, exploding = at_risk(flow)
        >>> [(r.group, r.kind, r.zero_steps) for r in vanishing]
        [('h.1.fc', 'h.#.fc', 2)]
        >>> [(r.group, r.nonfinite_steps, round(r.decades, 1)) for r in exploding]
        [('h.3.fc', 2, nan), ('h.4.fc', 0, 3.2)]
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
    medians_array = np.array(medians)
    dead = np.array([n > 0 and 2 * z >= n for z, n in zip(zero, logged, strict=True)])
    kinds, members = _references(flow.groups, medians_array, dead)
    apart = {kind: _apart(medians_array, group, decades) for kind, group in members.items()}
    risks, above = [], []
    for i, group in enumerate(flow.groups):
        kind, median = kinds[i], medians[i]
        centre = float(np.median(medians_array[members[kind]])) if members[kind] else np.nan
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
        above.append(i in apart[kind])
    vanishing = [r for r, d in zip(risks, dead, strict=True) if d or r.decades < -decades]
    exploding = [r for r, a in zip(risks, above, strict=True) if a or r.nonfinite_steps]
    vanishing.sort(key=lambda r: (-r.zero_steps / max(r.logged_steps, 1), _or(r.decades, 0.0)))
    exploding.sort(key=lambda r: (-r.nonfinite_steps, -_or(r.decades, 0.0)))
    return vanishing[:top], exploding[:top]


def _references(
    groups: tuple[str, ...], medians: np.ndarray, dead: np.ndarray
) -> tuple[list[str], dict[str, list[int]]]:
    """Per group, what it is compared with (its kind, or ALL_GROUPS); per reference, the
    groups it holds that have a finite median and are not dead."""
    known = np.isfinite(medians) & ~dead
    members: dict[str, list[int]] = defaultdict(list)
    for i, group in enumerate(groups):
        if known[i]:
            members[kind_of(group)].append(i)
    kinds = [kind_of(g) if len(members[kind_of(g)]) >= MIN_KIND else ALL_GROUPS for g in groups]
    references = {kind: members[kind] for kind in kinds if kind != ALL_GROUPS}
    references[ALL_GROUPS] = list(np.flatnonzero(known))
    return kinds, references


def _apart(medians: np.ndarray, members: list[int], decades: float) -> set[int]:
    """The members (fewer than half) more than ``decades`` above all the other members.

    Example:
        >>> sorted(_apart(np.array([0.0, 0.5, 1.0, 5.0, 4.5]), [0, 1, 2, 3, 4], 3.0))
        [3, 4]
    """
    ordered = sorted(members, key=lambda i: -medians[i])
    apart: set[int] = set()
    for k in range(1, (len(ordered) + 1) // 2):  # a top of k groups, fewer than half
        if medians[ordered[k - 1]] - medians[ordered[k]] > decades:
            apart = set(ordered[:k])
    return apart


def _or(value: float, default: float) -> float:
    return value if np.isfinite(value) else default
