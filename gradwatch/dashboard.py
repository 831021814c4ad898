"""Which charts TensorBoard's Custom Scalars dashboard shows, and what each plots.

A :class:`Layout` is plain data; the TensorBoard sink turns it into the ``custom_scalars``
plugin's layout proto. Each chart plots every scalar tag matching one of its regular
expressions as one line. :func:`build_dashboard` makes the layout of one run from its groups,
so that every chart is readable: at most :data:`MAX_LINES` groups on a chart, each tag
named exactly, and the clipping charts only in a run that clips.
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

from gradwatch import tags
from gradwatch.checks import check_flag
from gradwatch.grouping import Grouping

__all__ = ["MAX_LINES", "Category", "Chart", "Layout", "build_dashboard"]

MAX_LINES = 10
"""The most groups one per-group chart draws; more are split over several charts."""

# Per-group statistics on the dashboard: (statistic, what it is, category starts collapsed).
_PER_GROUP = (
    (tags.GRAD_NORM, "gradient norm", False),
    (tags.GRAD_TO_PARAM, "gradient / parameter norm", False),
    (tags.GRAD_MAX_ABS, "largest absolute gradient value", True),
    (tags.GRAD_NONFINITE, "non-finite gradient values", True),  # zero while all is well
    (tags.PARAM_NORM, "parameter norm", True),
    (tags.UPDATE_TO_PARAM, "update / parameter norm", True),
    # with track_signal
    (tags.ACT_GRAD_RMS, "backward signal RMS (dL/d output)", False),
    (tags.ACT_GAIN, "backward signal gain to the next group", False),
    (tags.ACT_RMS, "forward signal RMS (outputs)", True),
    (tags.ACT_MEAN, "forward signal mean", True),
    (tags.ACT_DEAD, "dead outputs (fraction exactly zero)", True),
    (tags.ACT_SATURATED, "saturated outputs (fraction)", True),
)


@dataclass(frozen=True)
class Chart:
    """One multi-line chart: every scalar tag matching one of ``tags`` (regular expressions,
    matched from the start of the tag)."""

    title: str
    tags: tuple[str, ...]

    def __post_init__(self) -> None:
        for pattern in self.tags:
            try:
                re.compile(pattern)
            except re.error as error:
                raise ValueError(
                    f"Chart tags must be regular expressions. Received: {pattern!r} ({error})"
                ) from None


@dataclass(frozen=True)
class Category:
    """A collapsible section of charts; ``closed`` sections start collapsed."""

    title: str
    charts: tuple[Chart, ...]
    closed: bool = False


@dataclass(frozen=True)
class Layout:
    """The whole Custom Scalars dashboard."""

    categories: tuple[Category, ...]


def build_dashboard(
    grouping: Grouping,
    *,
    clipping: bool = False,
    optimizers: Sequence[int | None] | None = (None,),
    statistics: Sequence[str] = tags.DEFAULT_STATISTICS,
) -> Layout:
    r"""The Custom Scalars dashboard of a run: global norms first, then each per-group
    statistic on charts of at most :data:`MAX_LINES` groups, in depth order.

    ``n`` groups are split into ``ceil(n / MAX_LINES)`` consecutive charts of nearly equal
    size (41 groups: 9, 8, 8, 8 and 8), each listing its tags exactly; its title says which
    groups it holds. TensorBoard's layout has no setting for a logarithmic axis: each chart's
    own button toggles one.

    Args:
        grouping: the run's groups, in depth order, and their names in tags.
        clipping: a clip policy is configured: add the norm after clipping, the threshold and
            the clip coefficient (without one those tags are never written).
        optimizers: the labels whole-model tags carry, as ``tags.total_tag`` takes them
            (``(None,)``, the default: one optimizer; ``(0, 1)``: two), one global-norm chart
            each; None when the optimizers are not known in advance (a plain loop meets them
            as they step): one chart then matches every label.
        statistics: the per-group statistics the run writes (no chart for the others).

    Example:
        >>> grouping = Grouping.build([f"blocks.{i}.w" for i in range(12)], "module")
        >>> layout = build_dashboard(grouping)
        >>> [category.title for category in layout.categories]  # doctest: +NORMALIZE_WHITESPACE
        ['gradwatch: global', 'gradwatch: gradient norm per group',
         'gradwatch: gradient / parameter norm per group']
        >>> for chart in layout.categories[1].charts:
        ...     print(chart.title)
        grad_norm: groups 1-6 of 12 (blocks.0 … blocks.5)
        grad_norm: groups 7-12 of 12 (blocks.6 … blocks.11)
        >>> print(*layout.categories[1].charts[1].tags[:2])
        ^grad_norm/blocks\.6$ ^grad_norm/blocks\.7$
    """
    if not isinstance(grouping, Grouping):
        raise TypeError(f"`grouping` must be a Grouping. Received: grouping={grouping!r}")
    clipping = check_flag("clipping", clipping)
    if optimizers is not None and (isinstance(optimizers, str) or not list(optimizers)):
        raise ValueError(
            "`optimizers` must be a non-empty sequence of labels, or None. Received: "
            f"optimizers={optimizers!r}"
        )
    categories = [Category("gradwatch: global", _global_charts(clipping, optimizers))]
    chunks = _chunks(len(grouping.groups))
    for statistic, meaning, closed in _PER_GROUP:
        if statistic not in statistics:
            continue
        charts = tuple(_group_chart(grouping, statistic, chunk) for chunk in chunks)
        if charts:
            categories.append(Category(f"gradwatch: {meaning} per group", charts, closed))
    return Layout(tuple(categories))


def _global_charts(clipping: bool, optimizers: Sequence[int | None] | None) -> tuple[Chart, ...]:
    """The global norm (before and after clipping, the threshold) of each optimizer; the clip
    coefficient and the non-finite steps of all of them."""
    any_label = optimizers is None
    labels: list[int | None] = [None] if optimizers is None else list(optimizers)

    def exact(tag_of, statistic: str, label: int | None) -> str:
        return _exact(tag_of(statistic, label), any_label)

    charts = []
    for label in labels:
        title = "global gradient norm"
        patterns = [exact(tags.total_tag, tags.GLOBAL, label)]
        if clipping:
            title += ": before and after clipping, threshold"
            patterns += [
                exact(tags.total_tag, tags.CLIPPED, label),
                exact(tags.clip_tag, tags.THRESHOLD, label),
            ]
        if len(labels) > 1:
            title += f" (optimizer {label})"
        charts.append(Chart(title, tuple(patterns)))
    if clipping:
        coefficient = tuple(exact(tags.clip_tag, tags.COEFFICIENT, label) for label in labels)
        charts.append(Chart("clip coefficient (1: not clipped)", coefficient))
    nonfinite = tuple(exact(tags.total_tag, tags.NONFINITE_STEPS, label) for label in labels)
    charts.append(Chart("non-finite steps since the last log", nonfinite))
    return tuple(charts)


def _chunks(n: int) -> list[range]:
    """``range(n)`` cut into the fewest consecutive pieces of at most ``MAX_LINES``, the
    longer pieces first, none longer than another by more than one."""
    pieces = math.ceil(n / MAX_LINES)
    if not pieces:
        return []
    size, extra = divmod(n, pieces)
    bounds = [i * size + min(i, extra) for i in range(pieces + 1)]
    return [range(a, b) for a, b in itertools.pairwise(bounds)]


def _group_chart(grouping: Grouping, statistic: str, chunk: range) -> Chart:
    first, last = chunk[0], chunk[-1]
    n = len(grouping.groups)
    if first == last:
        title = f"{statistic}: group {first + 1} of {n} ({grouping.groups[first]})"
    else:
        names = f"{grouping.groups[first]} … {grouping.groups[last]}"
        title = f"{statistic}: groups {first + 1}-{last + 1} of {n} ({names})"
    return Chart(title, tuple(_exact(tags.group_tag(statistic, grouping.tags[g])) for g in chunk))


def _exact(tag: str, any_optimizer: bool = False) -> str:
    """A pattern matching ``tag`` only (and, with ``any_optimizer``, its optimizer labels)."""
    label = f"(?:{re.escape(tags.OPTIMIZER)}[0-9]+)?" if any_optimizer else ""
    return f"^{re.escape(tag)}{label}$"
