"""The options every adapter takes, checked and normalized in one place.

Each adapter's constructor hands its arguments to :func:`check_options` and keeps the
:class:`Options` it returns, so a bad argument fails at construction, with the same message
whichever adapter received it: the argument as the user passed it, what is allowed, and what
was received.

Sizes are bounded where a larger one would not fit in memory (or would be useless): at most
:data:`MAX_HISTOGRAM_BINS` buckets per histogram; for ``AutoClip(history=...)`` see
:data:`gradwatch.policies.MAX_HISTORY`.

Example:
    >>> options = check_options(
    ...     log_every_n_steps=10, histogram_every_n_steps=0, group_by="module", log_dir=None,
    ...     track_update_ratio=False, histogram_bins=30, clip=1.0, on_nonfinite="skip",
    ...     on_explosion="warn", on_vanishing="warn", explosion=None, vanishing=None,
    ... )
    >>> options.cadence(), options.guard.policy
    (Cadence(log_every_n_steps=10, histogram_every_n_steps=0), ClipByNorm(max_norm=1.0))
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from gradwatch import keys
from gradwatch.checks import OFF, check_count, check_flag, check_path, check_sinks
from gradwatch.grouping import check_group_by
from gradwatch.guard import Guard
from gradwatch.monitor import Cadence

__all__ = [
    "MAX_HISTOGRAM_BINS",
    "Options",
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
    :data:`gradwatch.keys.STATISTICS`; the gradient norm is always written, and
    ``update_to_param`` with ``track_update_ratio``.

    Example:
        >>> check_statistics(["param_norm"])
        ('grad_norm', 'param_norm')
        >>> check_statistics("default", track_update_ratio=True)
        ('grad_norm', 'grad_to_param', 'update_to_param')
    """
    allowed = ", ".join(repr(s) for s in keys.STATISTICS)
    if statistics == "default":
        chosen = set(keys.DEFAULT_STATISTICS)
    elif statistics == "all":
        chosen = set(keys.STATISTICS)
    elif isinstance(statistics, (list, tuple)) and all(s in keys.STATISTICS for s in statistics):
        chosen = set(statistics)
    else:
        raise ValueError(
            "`statistics` must be 'default', 'all', or a list of names from "
            f"{allowed}. Received: statistics={statistics!r}"
        )
    chosen |= {keys.GRAD_NORM} | ({keys.UPDATE_TO_PARAM} if track_update_ratio else set())
    if keys.UPDATE_TO_PARAM in chosen and not track_update_ratio and statistics != "all":
        raise ValueError(
            "`statistics` names 'update_to_param', which needs `track_update_ratio=True`."
            f" Received: statistics={statistics!r}"
        )
    return tuple(s for s in keys.STATISTICS if s in chosen)


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
        log_dir: the event files' directory as a string, or None (what None and ``""`` mean is
            the adapter's to say).
        track_update_ratio: also measure ``|update| / |param|`` at logging steps.
        histogram_bins: buckets per histogram, at most :data:`MAX_HISTOGRAM_BINS`.
        guard: the ``clip``, ``on_*``, ``explosion`` and ``vanishing`` options.
        sinks: extra sinks for the records.
        statistics: the per-group statistics written (see :func:`check_statistics`).
    """

    log_every_n_steps: int | None
    histogram_every_n_steps: int
    group_by: str | Callable[[str], str]
    log_dir: str | None
    track_update_ratio: bool
    histogram_bins: int
    guard: Guard
    sinks: tuple[Any, ...] = ()
    statistics: tuple[str, ...] = keys.DEFAULT_STATISTICS

    def cadence(self, log_every_n_steps: int | None = None) -> Cadence:
        """The cadence; ``log_every_n_steps`` is the framework's, used where the options have
        None."""
        return Cadence(self.log_every_n_steps or log_every_n_steps, self.histogram_every_n_steps)


def check_options(
    *,
    log_every_n_steps: object,
    histogram_every_n_steps: object,
    group_by: object,
    log_dir: object,
    track_update_ratio: object,
    histogram_bins: object,
    clip: object,
    on_nonfinite: object,
    on_explosion: object,
    on_vanishing: object,
    explosion: object,
    vanishing: object,
    sinks: object = (),
    statistics: object = "default",
    group_rules: tuple[str, ...] = ("module", "parameter"),
    group_member: str = "parameter name",
    default_log_every: str | None = None,
) -> Options:
    """Check every option an adapter received; the first bad one raises.

    The user's arguments are passed by name; three describe the adapter: ``group_rules``, the
    named ``group_by`` rules it knows; ``group_member``, what its ``group_by`` callable maps
    (for the message); and ``default_log_every``, where the adapter takes
    ``log_every_n_steps=None`` to mean the framework's own cadence, the name of that cadence
    (else None is refused).

    Raises:
        TypeError, ValueError: on the first bad argument, naming it.
    """
    if log_every_n_steps is None and default_log_every is not None:
        every = None
    else:
        meaning = f" or None ({default_log_every})" if default_log_every else ""
        every = check_count("log_every_n_steps", log_every_n_steps, meaning=meaning)
    histograms = check_count(
        "histogram_every_n_steps", histogram_every_n_steps, smallest=0, meaning=OFF
    )
    update_ratio = check_flag("track_update_ratio", track_update_ratio)
    if statistics == "all":
        update_ratio = True  # every statistic, the update ratio included
    return Options(
        log_every_n_steps=every,
        histogram_every_n_steps=histograms,
        group_by=check_group_by(group_by, group_rules, group_member),
        log_dir=check_path("log_dir", log_dir),
        track_update_ratio=update_ratio,
        histogram_bins=check_histogram_bins(histogram_bins),
        guard=Guard.configure(clip, on_nonfinite, on_explosion, on_vanishing, explosion, vanishing),
        sinks=check_sinks("sinks", sinks),
        statistics=check_statistics(statistics, update_ratio),
    )
