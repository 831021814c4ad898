"""Detectors of non-finite, exploding and vanishing gradients: pure ``init``/``update`` pairs.

Like the policies, a detector is an immutable configuration with ``init(like, groups)`` and
``update(entries, state) -> (Verdict, state)``, array code with no Python branching on values and
no host reads. It looks at one step's :class:`Entries` (the global norm, then each group's, and
which are finite; a guard takes them once for all its detectors, :func:`entries_of` makes them
from norms). A verdict flags the global norm (``flag[0]``) and each group (``flag[1:]``). Any
object with these methods is a :class:`Detector`, the built-ins and your own alike.

Verdicts are taken every step on the device; the host reads them only now and then. So that a
detection between two reads is not lost, :func:`latch` keeps, per entry, whether it fired since
the last read, at which step first, and the value and threshold then.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol, runtime_checkable

from gradwatch.array_api import namespace_of
from gradwatch.checks import check_count, check_real, set_fields

__all__ = [
    "DETECTORS",
    "DetectStats",
    "Detector",
    "Entries",
    "Explosion",
    "Latch",
    "NonFinite",
    "Vanishing",
    "Verdict",
    "entries_of",
    "latch",
    "new_latch",
]

Array = Any
_TINY = 1e-30
_REST_FLOOR = 1e-2  # a group's rest is measured when it usually holds 1% of the squared norm


class DetectStats(NamedTuple):
    """One step's norms: the global norm (scalar) and the per-group norms (``[groups]``)."""

    global_norm: Array
    group_norms: Array


class Verdict(NamedTuple):
    """Per entry (``[1 + groups]``: the global norm, then each group): fired?, value, bound."""

    flag: Array
    value: Array
    threshold: Array


class Entries(NamedTuple):
    """What every detector looks at, taken once per step for all of them: the norms as one
    vector ``[1 + groups]`` (the global norm, then each group) and which of them are finite."""

    values: Array
    finite: Array


def entries_of(stats: DetectStats) -> Entries:
    """The :class:`Entries` of one step's norms, for a detector's ``update``.

    Example:
        >>> import numpy as np
        >>> entries = entries_of(DetectStats(np.float32(5.0), np.array([3.0, 4.0], np.float32)))
        >>> entries.values.tolist(), entries.finite.tolist()
        ([5.0, 3.0, 4.0], [True, True, True])
    """
    xp = namespace_of(stats.group_norms)
    values = xp.concat([xp.reshape(stats.global_norm, (1,)), stats.group_norms])
    return Entries(values, xp.isfinite(values))


@runtime_checkable
class Detector(Protocol):
    """What the ``explosion=`` and ``vanishing=`` arguments take: any object with these methods.

    ``init(like, groups)`` returns the detector's state: a tuple (best a NamedTuple) of arrays
    made like ``like`` (namespace, dtype, device), typically ``[1 + groups]`` each, ``()`` for
    none. ``update(entries, state)`` returns a :class:`Verdict` of ``[1 + groups]`` entries
    (the global norm, then each group) and the new state; pure array code, as for policies: no
    Python branching on array values, no host reads, inputs left unchanged, nothing kept on the
    object. Configurations are compared by ``repr`` (see :meth:`gradwatch.guard.Guard.state_dict`).

    A detector that can take a lasting new level as normal (as :class:`Explosion` does) also has
    ``accepted(state) -> [1 + groups] bool``: whether the step that gave ``state`` was accepted.
    A guard reports such a step as an event with action ``"accepted"`` and does not act on it.
    It is optional, and not a protocol member: a guard looks for it with ``hasattr``.

    Example:
        >>> import numpy as np
        >>> class Above:  # every entry above a fixed bound
        ...     def __init__(self, bound):
        ...         self.bound = bound
        ...     def init(self, like, groups):
        ...         return ()
        ...     def update(self, entries, state):
        ...         threshold = namespace_of(entries.values).full_like(entries.values, self.bound)
        ...         flag = entries.finite & (entries.values > threshold)
        ...         return Verdict(flag, entries.values, threshold), state
        >>> norms = DetectStats(np.float32(5.0), np.array([3.0, 4.0], np.float32))
        >>> verdict, _ = Above(3.5).update(entries_of(norms), ())
        >>> isinstance(Above(3.5), Detector), verdict.flag.tolist()
        (True, [True, False, True])
    """

    def init(self, like: Array, groups: int) -> Any: ...

    def update(self, entries: Entries, state: Any) -> tuple[Verdict, Any]: ...


def _zeros(like: Array, size: int) -> Array:
    xp = namespace_of(like)
    return xp.zeros((size,), dtype=like.dtype, device=getattr(like, "device", None))


class NoState(NamedTuple):
    """State of a detector that keeps none."""


@dataclass(frozen=True)
class NonFinite:
    """Flags a step whose gradient holds NaN or Inf (its global norm is then not finite)."""

    def init(self, like: Array, groups: int) -> NoState:
        return NoState()

    def update(self, entries: Entries, state: NoState) -> tuple[Verdict, NoState]:
        values, finite = entries
        return Verdict(~finite, values, namespace_of(values).full_like(values, math.inf)), state


class ExplosionState(NamedTuple):
    log_mean: Array  # [1 + groups] running mean of log norms (plain during warm-up, then EMA)
    count: Array  # [1 + groups] finite, non-spike norms seen
    streak: Array  # [1 + groups] consecutive steps above the baseline's bound
    accepted: Array  # [1 + groups] 1 where the last step's level was accepted as the new normal


@dataclass(frozen=True)
class Explosion:
    """Flags a norm far above its own recent typical value, or above an absolute ceiling.

    Rule: after ``warmup_steps`` norms, the global norm fires when ``norm > factor * exp(m)``,
    where ``m`` is an exponential moving average (weight ``beta``) of its log norm; or when
    ``norm > max_norm`` if that is set (from step 0). A group's norm is held to the same test
    against its own ``m``, with the bound raised by two factors:

    - the rise of the rest of the gradient (the other groups together, against their baseline
      taken from the global and the group's), counted between 1 and ``factor``;
    - ``sqrt(factor)`` while the global norm stays under ``sqrt(factor)`` times its baseline.

    Why this rule: gradient norms vary multiplicatively and drift over orders of magnitude
    during training (schedules, loss decreasing), so the baseline is taken on log norms: ``exp(m)``
    is a running geometric mean, unmoved by the occasional large value that would drag an
    arithmetic mean, and a fixed ``factor`` (10x) means the same thing at any scale. Norms that
    fire do not update the baseline, so an explosion cannot teach the detector that it is normal;
    ``beta=0.98`` (a memory of ~50 steps) still follows real drift. The warm-up skips the first
    steps, whose norms are often unrepresentative.

    Why groups are asked more: a group's norm is noisier than the global norm, and healthy runs
    move it in two ways that are not explosions. A hard batch lifts every layer at once (in a
    small GPT-2 the global norm rose 7-9x in one step and some groups 10-20x): that is one event
    of the whole gradient, judged on the global norm, so a group must rise ``factor`` times more
    than the rest did. And a group can leap while the whole gradient hardly moves: a LayerNorm's
    gain (a sliver of the gradient) swinging as attention comes into use, or a group coming back
    from a dip that its baseline followed; so while the whole is quiet a group must rise
    ``factor**1.5`` (~32x) on its own. A group that breaks still fires: a 1000x spike in one
    group clears both. A group's norm that is not flagged is learnt, so a group that settles at
    a new level is absorbed into its baseline instead of being flagged at every step.

    A lasting change of level is not a spike: when an entry stays above ``factor * exp(m)``
    for ``accept_after`` consecutive steps (a loss re-weighted, a schedule's jump), that step
    is not flagged, its norm becomes the new baseline, and :meth:`accepted` says so.
    So ``on_explosion="skip"`` drops at most ``accept_after - 1`` steps in a row, never every
    step for good. ``None`` never accepts. The ``max_norm`` ceiling is absolute: never accepted.
    """

    factor: float = 10.0
    warmup_steps: int = 20
    beta: float = 0.98
    max_norm: float | None = None
    accept_after: int | None = 10

    def __post_init__(self) -> None:
        max_norm, accept = self.max_norm, self.accept_after
        if max_norm is not None:
            max_norm = check_real("max_norm", max_norm, "None or a number > 0", lambda m: m > 0)
        if accept is not None:
            accept = check_count("accept_after", accept, smallest=2, meaning=" (or None: never)")
        set_fields(
            self,
            factor=check_real("factor", self.factor, "a number > 1", lambda f: f > 1),
            warmup_steps=check_count("warmup_steps", self.warmup_steps),
            beta=check_real("beta", self.beta, "in (0, 1)", lambda b: 0 < b < 1),
            max_norm=max_norm,
            accept_after=accept,
        )

    def init(self, like: Array, groups: int) -> ExplosionState:
        return ExplosionState(*(_zeros(like, 1 + groups) for _ in ExplosionState._fields))

    def update(self, entries: Entries, state: ExplosionState) -> tuple[Verdict, ExplosionState]:
        values, finite = entries
        xp = namespace_of(values)
        # log(max(norm, tiny)); a non-finite norm gives log(tiny) or inf here, never learnt from
        log_value = xp.log(xp.where(values > _TINY, values, _TINY))
        warm = state.count >= self.warmup_steps
        raised = xp.exp(self._group_raise(entries, state))
        bound = xp.where(warm, xp.exp(state.log_mean) * self.factor * raised, math.inf)
        above = finite & (values > bound)
        streak = xp.where(above, state.streak + 1.0, 0.0)
        accepted = above & (streak >= (self.accept_after or math.inf))
        flag = above & ~accepted
        threshold = bound
        if self.max_norm is not None:
            threshold = xp.minimum(bound, self.max_norm)
            flag = flag | (finite & (values > self.max_norm))
        learn = finite & ~flag
        # Warm-up: the plain mean of the log norms learnt (their count is then count + 1);
        # afterwards: an exponential moving average. Both move the mean by a step towards
        # the new log norm. An accepted level replaces the mean.
        weight = xp.where(warm, 1 - self.beta, 1.0 / (state.count + 1.0))
        moved = state.log_mean + weight * (log_value - state.log_mean)
        log_mean = xp.where(accepted, log_value, xp.where(learn, moved, state.log_mean))
        count = state.count + xp.astype(learn, state.count.dtype)
        streak = xp.where(accepted, 0.0, streak)
        new = ExplosionState(log_mean, count, streak, xp.astype(accepted, count.dtype))
        return Verdict(flag, values, threshold), new

    def accepted(self, state: ExplosionState) -> Array:
        """Per entry, whether the step that gave ``state`` was accepted as a new level."""
        return state.accepted > 0

    def _group_raise(self, entries: Entries, state: ExplosionState) -> Array:
        """Per entry, the log of the factor by which its bound is raised: 0 for the global
        entry; for groups, on a step whose global norm is not finite or not yet warm, that of
        ``sqrt(factor)``. Worked in logs, so that no norm is squared into an overflow."""
        values, finite = entries
        xp = namespace_of(values)
        log_factor = math.log(self.factor)
        known = finite[0] & (values[0] > 0) & (state.count[0] >= self.warmup_steps)
        # the whole gradient's rise over its baseline
        log_rise = xp.where(known, xp.log(xp.where(known, values[0], 1.0)) - state.log_mean[0], 0.0)
        # each group's part of the global norm now, and the rest's share of the squared norm
        # at the baselines (1 - (group's baseline / global's)^2)
        part = xp.minimum(
            xp.where(finite & known, values, 0.0) / xp.where(known, values[0], 1.0), 1.0
        )
        rest_usual = 1.0 - xp.exp(2.0 * xp.minimum(state.log_mean - state.log_mean[0], 0.0))
        has_rest = known & (rest_usual > _REST_FLOOR)
        # log(rest now / rest at its baseline): the whole's rise, times sqrt(share now / usual)
        rest_rise = log_rise + 0.5 * (
            xp.log(xp.maximum(1.0 - part * part, _TINY))
            - xp.log(xp.where(has_rest, rest_usual, 1.0))
        )
        rest_rise = xp.minimum(xp.maximum(xp.where(has_rest, rest_rise, 0.0), 0.0), log_factor)
        quiet = xp.where(log_rise < 0.5 * log_factor, 0.5 * log_factor, xp.zeros_like(log_rise))
        raised = rest_rise + quiet
        return xp.concat([xp.zeros_like(raised[:1]), raised[1:]])  # the global entry: 0


class VanishingState(NamedTuple):
    below: Array  # [1 + groups] consecutive steps below the bound


@dataclass(frozen=True)
class Vanishing:
    """Flags a group whose gradient stays tiny for ``patience`` consecutive steps.

    A group is below the bound when its norm is under ``floor``, or under ``ratio`` times the
    largest group norm of the step (its layers learn ``1/ratio`` times slower than the fastest),
    or exactly zero. It fires once, on the step the run of such steps reaches ``patience``,
    and can fire again only after it has recovered. The global entry (``flag[0]``) fires when
    the whole gradient is below ``floor``.
    """

    floor: float = 1e-10
    ratio: float = 1e-4
    patience: int = 10

    def __post_init__(self) -> None:
        set_fields(
            self,
            floor=check_real("floor", self.floor, "a number >= 0", lambda f: f >= 0),
            ratio=check_real("ratio", self.ratio, "in [0, 1)", lambda r: 0 <= r < 1),
            patience=check_count("patience", self.patience),
        )

    def init(self, like: Array, groups: int) -> VanishingState:
        return VanishingState(_zeros(like, 1 + groups))

    def update(self, entries: Entries, state: VanishingState) -> tuple[Verdict, VanishingState]:
        values, finite = entries
        xp = namespace_of(values)
        groups = values[1:]
        largest = xp.max(xp.where(finite[1:], groups, 0.0))
        group_bound = xp.maximum(self.ratio * largest, self.floor)
        threshold = xp.concat(
            [xp.full_like(values[:1], self.floor), xp.zeros_like(groups) + group_bound]
        )
        below = finite & ((values < threshold) | (values == 0))
        run = xp.where(below, state.below + 1.0, 0.0)
        flag = run == float(self.patience)
        return Verdict(flag, values, threshold), VanishingState(run)


DETECTORS: tuple[type, ...] = (NonFinite, Explosion, Vanishing)
"""The built-in detectors."""


class Latch(NamedTuple):
    """Per entry, since the last host read: fired?, first step it did, value and bound then."""

    fired: Array
    step: Array
    value: Array
    threshold: Array


def new_latch(like: Array, shape: int | tuple[int, ...]) -> Latch:
    """An empty latch of ``shape`` (entries, or detectors x entries); steps are int64 so that
    no step count is ever rounded."""
    xp = namespace_of(like)
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    device = getattr(like, "device", None)
    values, thresholds = (xp.zeros(shape, dtype=like.dtype, device=device) for _ in range(2))
    steps = xp.zeros(shape, dtype=xp.int64, device=device)
    fired = xp.zeros(shape, dtype=xp.bool, device=device)
    return Latch(fired, steps, values, thresholds)  # no two fields one array: no aliasing


def latch(state: Latch, verdict: Verdict, step: Array) -> Latch:
    """Keep the first firing of each entry since the last read (the read resets the latch)."""
    xp = namespace_of(verdict.value)
    first = verdict.flag & ~state.fired
    return Latch(
        fired=state.fired | verdict.flag,
        step=xp.where(first, step, state.step),
        value=xp.where(first, verdict.value, state.value),
        threshold=xp.where(first, verdict.threshold, state.threshold),
    )
