"""The options every adapter takes, checked and normalized in one place.

Each adapter's constructor hands its arguments (its ``locals()``) to :func:`check_options` and
keeps the :class:`Options` it returns, so a bad argument fails at construction, with the same
message whichever adapter received it: the argument as the user passed it, what is allowed,
and what was received.

Sizes are bounded where a larger one would not fit in memory (or would be useless): at most
:data:`MAX_HISTOGRAM_BINS` buckets per histogram; for ``AutoClip(history=...)`` see
:data:`gradwatch.policies.MAX_HISTORY`.

Example:
    >>> options = check_options({"log_every_n_steps": 10, "clip": 1.0, "on_nonfinite": "skip"})
    >>> options.cadence(), options.guard.policy
    (Cadence(log_every_n_steps=10, histogram_every_n_steps=0), ClipByNorm(max_norm=1.0))
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from gradwatch import tags
from gradwatch.cadence import Cadence
from gradwatch.checks import (
    OFF,
    check_choice,
    check_count,
    check_flag,
    check_instance,
    check_log_dir,
    check_sinks,
)
from gradwatch.dashboard import Layout, build_dashboard
from gradwatch.grouping import Grouping, check_group_by
from gradwatch.guard import Guard
from gradwatch.signal import ALARM_ACTIONS, DeadUnits, Saturation

__all__ = [
    "MAX_HISTOGRAM_BINS",
    "OPTIONS",
    "Options",
    "Rules",
    "check_histogram_bins",
    "check_options",
    "check_statistics",
]

MAX_HISTOGRAM_BINS = 10_000
"""The most buckets per histogram: one row of them per group is built on the device and
copied to the host at every histogram step (TensorBoard draws about 30)."""


def check_statistics(statistics: object, track_update_ratio: bool = False) -> tuple[str, ...]:
    """The per-group statistics to write: ``"default"`` (the gradient norm and the
    gradient/parameter ratio: two charts a group), ``"all"``, or a list of names from
    :data:`gradwatch.tags.STATISTICS`; the gradient norm is always written, and
    ``update_to_param`` with ``track_update_ratio``.

    Example:
        >>> check_statistics(["param_norm"])
        ('grad_norm', 'param_norm')
        >>> check_statistics("default", track_update_ratio=True)
        ('grad_norm', 'grad_to_param', 'update_to_param')
    """
    allowed = ", ".join(repr(s) for s in tags.STATISTICS)
    if statistics == "default":
        chosen = set(tags.DEFAULT_STATISTICS)
    elif statistics == "all":
        chosen = set(tags.STATISTICS)
    elif isinstance(statistics, (list, tuple)) and all(s in tags.STATISTICS for s in statistics):
        chosen = set(statistics)
    else:
        raise ValueError(
            "`statistics` must be 'default', 'all', or a list of names from "
            f"{allowed}. Received: statistics={statistics!r}"
        )
    chosen |= {tags.GRAD_NORM} | ({tags.UPDATE_TO_PARAM} if track_update_ratio else set())
    if tags.UPDATE_TO_PARAM in chosen and not track_update_ratio and statistics != "all":
        raise ValueError(
            "`statistics` names 'update_to_param', which needs `track_update_ratio=True`."
            f" Received: statistics={statistics!r}"
        )
    return tuple(s for s in tags.STATISTICS if s in chosen)


def check_histogram_bins(histogram_bins: object) -> int:
    """Buckets per histogram: an int from 1 to :data:`MAX_HISTOGRAM_BINS`."""
    return check_count("histogram_bins", histogram_bins, largest=MAX_HISTOGRAM_BINS)


@dataclass(frozen=True)
class Options:
    """The checked options of one adapter instance.

    Attributes:
        log_every_n_steps: optimizer steps between logging steps; None where the framework's
            own cadence applies (the Lightning Trainer's ``log_every_n_steps``).
        histogram_every_n_steps: optimizer steps between histograms; 0 for none.
        group_by: a named rule of the adapter's, or a callable from tensor name to group name.
        log_dir: the event files' directory as a string; None: the adapter's default folder;
            False: no event files.
        track_update_ratio: also measure ``|update| / |param|`` at logging steps.
        track_signal: also measure the forward and backward signal at each group's module on
            the logging steps' batches (see :mod:`gradwatch.signal`).
        alarms: the signal's ``dead_units``, ``saturation``, ``on_dead_units`` and
            ``on_saturation`` options, as :class:`gradwatch.signal.SignalAlarms` takes them.
        histogram_bins: buckets per histogram, at most :data:`MAX_HISTOGRAM_BINS`.
        guard: the ``clip``, ``on_*``, ``explosion`` and ``vanishing`` options.
        sinks: extra sinks for the records.
        statistics: the per-group statistics written (see :func:`check_statistics`).
    """

    log_every_n_steps: int | None
    histogram_every_n_steps: int
    group_by: str | Callable[[str], str]
    log_dir: str | Literal[False] | None
    track_update_ratio: bool
    histogram_bins: int
    guard: Guard
    sinks: tuple[Any, ...] = ()
    statistics: tuple[str, ...] = tags.DEFAULT_STATISTICS
    track_signal: bool = False
    alarms: tuple[DeadUnits, Saturation, str, str] = (DeadUnits(), Saturation(), "warn", "warn")

    @property
    def writes_files(self) -> bool:
        """Whether event files are written (``log_dir`` is not False)."""
        return self.log_dir is not False

    def dashboard(
        self, grouping: Grouping, optimizers: Sequence[int | None] | None = (None,)
    ) -> Layout:
        """The run's Custom Scalars dashboard (see :func:`gradwatch.dashboard.build_dashboard`)."""
        return build_dashboard(
            grouping,
            clipping=self.guard.policy is not None,
            optimizers=optimizers,
            statistics=self.statistics + (tags.SIGNAL_STATISTICS if self.track_signal else ()),
        )

    def warn_if_clipped_twice(self, other: object, order: str) -> None:
        """One warning when a clip policy is set and the framework clips too: ``other`` names
        the framework's clipping setting (falsy when there is none), ``order`` says which
        clips first."""
        if self.guard.policy is not None and other:
            from gradwatch.reporting import GradWatchWarning  # reporting imports this module

            warnings.warn(
                f"GradWatch(clip={self.guard.policy}) and {other} both clip; {order}",
                GradWatchWarning,
                stacklevel=3,
            )

    def cadence(self, log_every_n_steps: int | None = None) -> Cadence:
        """The cadence; ``log_every_n_steps`` is the framework's, used where the options have
        None."""
        every = self.log_every_n_steps or log_every_n_steps
        if every is None:
            raise TypeError(
                "The options leave `log_every_n_steps` to the framework: pass its cadence as"
                " `cadence(log_every_n_steps)`. Received: log_every_n_steps=None"
            )
        return Cadence(every, self.histogram_every_n_steps)


OPTIONS = (
    "log_every_n_steps",
    "histogram_every_n_steps",
    "group_by",
    "log_dir",
    "track_update_ratio",
    "track_signal",
    "histogram_bins",
    "statistics",
    "clip",
    "on_nonfinite",
    "on_explosion",
    "on_vanishing",
    "explosion",
    "vanishing",
    "on_dead_units",
    "on_saturation",
    "dead_units",
    "saturation",
    "sinks",
)
"""The options every adapter takes, by the name of its argument."""


@dataclass(frozen=True)
class Rules:
    """How one adapter reads its options.

    Attributes:
        group_rules: the named ``group_by`` rules it knows.
        group_member: what its ``group_by`` callable maps (for messages).
        log_every_n_steps: what ``log_every_n_steps=None`` stands for (None: the framework's
            own cadence), and ``log_every_default`` says it in words.
    """

    group_rules: tuple[str, ...] = ("module", "parameter")
    group_member: str = "parameter name"
    log_every_n_steps: int | None = 50
    log_every_default: str = "50"


def check_options(arguments: Mapping[str, Any], rules: Rules = Rules()) -> Options:
    """Check the options among an adapter's ``arguments`` (its ``locals()`` at the top of its
    constructor: the names of :data:`OPTIONS`; an option it does not take has its default).

    Raises:
        TypeError, ValueError: on the first bad argument, naming it.
    """
    given = {name: arguments[name] for name in OPTIONS if name in arguments}
    every = given.get("log_every_n_steps")
    every = rules.log_every_n_steps if every is None else every
    if every is not None:
        meaning = f" or None ({rules.log_every_default})"
        every = check_count("log_every_n_steps", every, meaning=meaning)
    histograms = check_count(
        "histogram_every_n_steps",
        given.get("histogram_every_n_steps", 0),
        smallest=0,
        meaning=OFF,
    )
    update_ratio = check_flag("track_update_ratio", given.get("track_update_ratio", False))
    statistics = given.get("statistics", "default")
    if statistics == "all":
        update_ratio = True  # every statistic, the update ratio included
    group_by = given.get("group_by")
    group_by = rules.group_rules[0] if group_by is None else group_by
    return Options(
        log_every_n_steps=every,
        histogram_every_n_steps=histograms,
        group_by=check_group_by(group_by, rules.group_rules, rules.group_member),
        log_dir=check_log_dir(given.get("log_dir")),
        track_update_ratio=update_ratio,
        histogram_bins=check_histogram_bins(given.get("histogram_bins", 30)),
        guard=Guard.configure(
            given.get("clip"),
            given.get("on_nonfinite", "warn"),
            given.get("on_explosion", "warn"),
            given.get("on_vanishing", "warn"),
            given.get("explosion"),
            given.get("vanishing"),
        ),
        sinks=check_sinks("sinks", given.get("sinks", ())),
        statistics=check_statistics(statistics, update_ratio),
        track_signal=check_flag("track_signal", given.get("track_signal", False)),
        alarms=(
            check_instance("dead_units", given.get("dead_units"), DeadUnits, DeadUnits),
            check_instance("saturation", given.get("saturation"), Saturation, Saturation),
            check_choice("on_dead_units", given.get("on_dead_units", "warn"), ALARM_ACTIONS),
            check_choice("on_saturation", given.get("on_saturation", "warn"), ALARM_ACTIONS),
        ),
    )
