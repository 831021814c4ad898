"""Which charts TensorBoard's Custom Scalars dashboard shows first, and what each plots.

A :class:`Layout` is plain data; the TensorBoard sink turns it into the ``custom_scalars``
plugin's layout proto. Each chart plots every scalar tag matching any of its regular
expressions as one line, so a model with several optimizers or fifty groups needs no new
configuration.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from gradwatch import keys

__all__ = ["Category", "Chart", "Layout", "default_layout"]


@dataclass(frozen=True)
class Chart:
    """One multi-line chart: every scalar tag matching one of ``tags`` (regular expressions)."""

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
    """A collapsible section of charts."""

    title: str
    charts: tuple[Chart, ...]


@dataclass(frozen=True)
class Layout:
    """The whole Custom Scalars dashboard."""

    categories: tuple[Category, ...]


def _prefix(tag: str) -> str:
    return "^" + re.escape(tag)


def default_layout() -> Layout:
    """The charts a user needs first: global norms and clipping, non-finite counts, groups.

    Example:
        >>> for chart in default_layout().categories[0].charts:
        ...     print(chart.title)
        global gradient norm: before and after clipping, threshold
        clip coefficient
        non-finite: steps since the last log, values per group
    """
    global_norms = Chart(
        "global gradient norm: before and after clipping, threshold",
        (
            _prefix(keys.total_tag(keys.GLOBAL)),
            _prefix(keys.total_tag(keys.CLIPPED)),
            _prefix(keys.clip_tag(keys.THRESHOLD)),
        ),
    )
    coefficient = Chart("clip coefficient", (_prefix(keys.clip_tag(keys.COEFFICIENT)),))
    nonfinite = Chart(
        "non-finite: steps since the last log, values per group",
        (_prefix(keys.total_tag(keys.NONFINITE_STEPS)), _prefix(f"{keys.GRAD_NONFINITE}/")),
    )
    per_group = Chart("gradient norm per group", (_prefix(f"{keys.GRAD_NORM}/"),))
    ratio = Chart("gradient / parameter norm per group", (_prefix(f"{keys.GRAD_TO_PARAM}/"),))
    return Layout(
        (
            Category("gradwatch: global", (global_norms, coefficient, nonfinite)),
            Category("gradwatch: per group", (per_group, ratio)),
        )
    )
