"""Clipping policies: immutable configuration, and pure ``init``/``update`` array functions.

Each policy is a frozen dataclass. ``init(like)`` returns its state (a small NamedTuple of arrays
on the device of ``like``); ``update(stats, state)`` returns a :class:`Clip` decision and the new
state. ``update`` never branches in Python on array values and never reads an array on the host,
so the same code runs on numpy in tests, on torch tensors on a GPU without synchronising, and
inside a compiled train step. Adapters apply the decision with their framework's own tensors:

* ``Clip.scale`` multiplies every gradient (a scalar) or every unit (a ``[units]`` vector, AGC);
* ``Clip.value``, when not ``None``, bounds every gradient element to ``[-value, value]``.

Any object with these two methods is a :class:`Policy`, the built-ins and your own alike; a
policy that needs more than the global norm declares it (``needs_unit_norms = True``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, NamedTuple, Protocol, runtime_checkable

from gradwatch.array_api import namespace_of
from gradwatch.checks import (
    check_choice,
    check_count,
    check_positive,
    check_real,
    did_you_mean,
    meets,
    set_fields,
)

__all__ = [
    "AGC",
    "AutoClip",
    "Clip",
    "ClipByNorm",
    "ClipByValue",
    "ClipStats",
    "MAX_HISTORY",
    "POLICIES",
    "Policy",
    "ZClip",
    "as_policy",
    "needs_unit_norms",
]

Array = Any
_TINY = 1e-12

MAX_HISTORY = 10_000_000
"""The most norms :class:`AutoClip` keeps: 40 MB of float32, sorted at every step."""


class ClipStats(NamedTuple):
    """What a policy may look at: the global gradient norm, and for AGC the unit norms."""

    global_norm: Array
    unit_grad_norms: Array | None = None
    unit_param_norms: Array | None = None


class Clip(NamedTuple):
    """A clipping decision.

    Attributes:
        scale: multiplier for the gradients: a scalar, or one per unit (AGC); 1 leaves them.
        threshold: the bound the norm was held to (for logging), a scalar.
        value: for element-wise clipping, the bound on each element's magnitude; else None.
    """

    scale: Array
    threshold: Array
    value: Array | None = None


class EmptyState(NamedTuple):
    """State of a policy that keeps none."""


def _positive_as_given(name: str, value: object) -> int | float:
    """A positive finite number, an int kept an int (a configuration prints as it was written)."""
    return check_real(name, value, "a positive finite number", lambda v: v > 0)


def _scale_to(xp: Any, norm: Array, threshold: Array) -> Array:
    """``min(1, threshold / norm)``; 1 where the norm is not finite (that is not clipping's job)."""
    over = (norm > threshold) & (norm < math.inf)
    return xp.where(over, threshold / xp.where(norm > _TINY, norm, _TINY), 1.0)


def _scalar(like: Array, value: float) -> Array:
    xp = namespace_of(like)
    return xp.full((), value, dtype=like.dtype, device=getattr(like, "device", None))


@dataclass(frozen=True)
class ClipByNorm:
    """Global-norm clipping: scale all gradients by ``min(1, max_norm / ||g||)``.

    Pascanu, Mikolov and Bengio, "On the difficulty of training recurrent neural networks",
    ICML 2013 (Algorithm 1). The rule of ``torch.nn.utils.clip_grad_norm_`` (which divides by
    ``||g|| + 1e-6``) and of Keras' ``global_clipnorm`` (``clip_by_global_norm``). Unlike both,
    a non-finite norm leaves the gradients unscaled (the detectors handle it).

    Example:
        >>> import numpy as np
        >>> policy = ClipByNorm(1.0)
        >>> clip, _ = policy.update(ClipStats(np.float32(4.0)), policy.init(np.zeros(())))
        >>> float(clip.scale)
        0.25
    """

    max_norm: float

    def __post_init__(self) -> None:
        set_fields(self, max_norm=check_positive("max_norm", self.max_norm))

    def init(self, like: Array) -> EmptyState:
        return EmptyState()

    def update(self, stats: ClipStats, state: EmptyState) -> tuple[Clip, EmptyState]:
        xp = namespace_of(stats.global_norm)
        threshold = _scalar(stats.global_norm, self.max_norm)
        return Clip(_scale_to(xp, stats.global_norm, threshold), threshold), state


@dataclass(frozen=True)
class ClipByValue:
    """Element-wise clipping of every gradient value to ``[-max_value, max_value]``.

    The rule of ``torch.nn.utils.clip_grad_value_`` and Keras' ``clipvalue``; no paper is
    implemented. The scale is 1: the bound is applied per element by the adapter.
    """

    max_value: float

    def __post_init__(self) -> None:
        set_fields(self, max_value=check_positive("max_value", self.max_value))

    def init(self, like: Array) -> EmptyState:
        return EmptyState()

    def update(self, stats: ClipStats, state: EmptyState) -> tuple[Clip, EmptyState]:
        xp = namespace_of(stats.global_norm)
        value = _scalar(stats.global_norm, self.max_value)
        return Clip(xp.ones_like(stats.global_norm), value, value=value), state


class AutoClipState(NamedTuple):
    history: Array  # [history] norms seen, oldest overwritten first; +inf marks an empty slot
    count: Array  # how many finite norms have been seen (scalar)
    ordered: Array  # the same norms in ascending order, empty slots (+inf) last


@dataclass(frozen=True)
class AutoClip:
    """AutoClip: clip to the ``percentile``-th percentile of the global norms seen so far.

    Seetharaman, Wichern, Pardo and Le Roux, "AutoClip: Adaptive Gradient Clipping for Source
    Separation Networks", MLSP 2020, as the authors' reference code (github.com/pseeth/autoclip,
    ``autoclip.py``) does it: the current norm joins the history, the threshold is numpy's
    ``np.percentile`` of the history (linear interpolation), and the norm is clipped to it as
    ``clip_grad_norm_`` would. Two differences: non-finite norms never join the history, and
    it keeps only the last ``history`` norms (the reference keeps all; a bound keeps memory and
    the percentile's cost fixed).

    Example:
        >>> import numpy as np
        >>> policy, state = AutoClip(percentile=50.0, history=8), None
        >>> state = policy.init(np.zeros((), dtype=np.float64))
        >>> for norm in [1.0, 2.0, 3.0, 100.0]:
        ...     clip, state = policy.update(ClipStats(np.float64(norm)), state)
        >>> float(clip.threshold), bool(clip.threshold == np.percentile([1, 2, 3, 100], 50))
        (2.5, True)
    """

    percentile: float = 10.0
    history: int = 1000

    def __post_init__(self) -> None:
        p = check_real("percentile", self.percentile, "in (0, 100]", lambda p: 0 < p <= 100)
        history = check_count("history", self.history, largest=MAX_HISTORY)
        set_fields(self, percentile=float(p), history=history)

    def init(self, like: Array) -> AutoClipState:
        xp = namespace_of(like)
        device = getattr(like, "device", None)
        history = xp.full((self.history,), math.inf, dtype=like.dtype, device=device)
        count = xp.zeros((), dtype=like.dtype, device=device)
        return AutoClipState(history, count, xp.full_like(history, math.inf))

    def update(self, stats: ClipStats, state: AutoClipState) -> tuple[Clip, AutoClipState]:
        norm = stats.global_norm
        xp = namespace_of(norm)
        finite = xp.isfinite(norm)
        slots = xp.arange(self.history, device=getattr(norm, "device", None))
        position = xp.astype(state.count % self.history, slots.dtype)
        replaced = (slots == position) & finite
        history = xp.where(replaced, norm, state.history)
        leaving = xp.sum(xp.where(replaced, state.history, 0.0))  # +inf while slots are empty
        ordered = _reordered(xp, state.ordered, slots, leaving, xp.where(finite, norm, 0.0))
        ordered = xp.where(finite, ordered, state.ordered)
        count = state.count + xp.astype(finite, state.count.dtype)
        threshold = _percentile(xp, ordered, count, self.percentile)
        threshold = xp.where(count > 0, threshold, math.inf)
        state = AutoClipState(history, count, ordered)
        return Clip(_scale_to(xp, norm, threshold), threshold), state


def _reordered(xp: Any, ordered: Array, slots: Array, leaving: Array, arriving: Array) -> Array:
    """``ordered`` (ascending) with one ``leaving`` value taken out and ``arriving`` put in
    its place in the order: two counts and two gathers, no sort."""
    last = ordered.shape[0] - 1
    out = xp.sum(xp.astype(ordered < leaving, slots.dtype))  # where ``leaving`` first sits
    shifted = xp.take(ordered, xp.where(slots < out, slots, xp.minimum(slots + 1, last)))
    rest = xp.where(slots == last, math.inf, shifted)  # without ``leaving``, +inf last
    into = xp.sum(xp.astype(rest < arriving, slots.dtype))
    moved = xp.take(rest, xp.where(slots <= into, slots, slots - 1))
    return xp.where(slots == into, arriving, moved)


def _percentile(xp: Any, ordered: Array, count: Array, percentile: float) -> Array:
    """numpy's linear-interpolation percentile of the finite entries of ``ordered``
    (ascending, +inf last), of which there are ``min(count, len(ordered))`` (at least one is
    assumed)."""
    last = xp.minimum(xp.maximum(count, 1.0), float(ordered.shape[0])) - 1.0
    rank = last * (percentile / 100.0)
    below = xp.floor(rank)
    above = xp.minimum(below + 1.0, last)
    index = xp.astype(xp.concat([xp.reshape(below, (1,)), xp.reshape(above, (1,))]), xp.int64)
    pair = xp.take(ordered, index)  # one gather for both neighbours
    low, high = pair[0], pair[1]
    return low + (high - low) * (rank - below)


class ZClipState(NamedTuple):
    mean: Array  # EMA of the global norm, each spike counted at the norm it was clipped to
    variance: Array  # EMA of its squared deviation from the updated mean
    count: Array  # finite norms seen


_ZCLIP_MODES = ("zscore", "percentile")


@dataclass(frozen=True)
class ZClip:
    """ZClip: clip global norms whose z-score against running statistics exceeds ``z_threshold``.

    Kumar, Owen, Roy Chowdhury and Güra, "ZClip: Adaptive Spike Mitigation for LLM
    Pre-Training", 2025 (arXiv:2504.02507), and the authors' reference code
    (github.com/bluorion-com/ZClip, ``zclip.py``). With ``mu`` and ``sigma**2`` the running
    mean and variance of the norm ``g``, and ``z = (g - mu) / (sigma + eps)``:

    * ``mode="zscore"`` (the default, as in the reference with its default
      ``clip_option="adaptive_scaling"``): when ``z > z_threshold``, ``g`` is clipped to
      ``mu + (z_threshold**2 / z) * sigma``, the paper's reciprocal clipping
      ``xi(z) = z_thres**2 / z`` (Figure 3): continuous at the threshold, and the larger the
      spike, the closer to the mean it is clipped.
    * ``mode="percentile"`` (the reference's ``mode="percentile"``): when
      ``g > mu + z_threshold * sigma``, ``g`` is clipped to that bound.

    As in the reference code, the first ``warmup_steps`` norms are not clipped; their plain
    mean and (population) variance seed the statistics. Afterwards each step updates
    ``mu <- alpha * mu + (1 - alpha) * x`` and then ``sigma**2 <- alpha * sigma**2 +
    (1 - alpha) * (x - mu)**2`` with the new ``mu``, where ``x`` is the clipped norm on a spike
    and the norm itself otherwise, so one spike does not inflate the statistics. Non-finite
    norms are neither clipped nor counted (the detectors handle them). The reference's
    ``max_grad_norm`` (a fixed cap on top, also applied during warm-up), ``clip_factor``,
    ``skip_update_on_spike`` and ``clip_option="mean"`` are not offered. ``Clip.threshold`` is
    the bound a spike was clipped to, otherwise the largest norm that passes unclipped
    (``inf`` during warm-up).

    The defaults are the reference code's: ``alpha=0.97``, ``z_threshold=2.5`` (the values the
    paper reports), 25 warm-up steps, ``eps=1e-6``.

    Example:
        >>> import numpy as np
        >>> policy = ZClip(warmup_steps=2)
        >>> state = policy.init(np.zeros((), dtype=np.float64))
        >>> for norm in [1.0, 3.0, 12.0]:  # mean 2, std 1, then z = 10
        ...     clip, state = policy.update(ClipStats(np.float64(norm)), state)
        >>> round(float(clip.threshold), 3)  # 2 + 2.5**2 / 10 * 1
        2.625
    """

    alpha: float = 0.97
    z_threshold: float = 2.5
    warmup_steps: int = 25
    eps: float = 1e-6
    mode: Literal["zscore", "percentile"] = "zscore"

    def __post_init__(self) -> None:
        set_fields(
            self,
            alpha=check_real("alpha", self.alpha, "in (0, 1)", lambda a: 0 < a < 1),
            z_threshold=_positive_as_given("z_threshold", self.z_threshold),
            warmup_steps=check_count("warmup_steps", self.warmup_steps),
            eps=_positive_as_given("eps", self.eps),
            mode=check_choice("mode", self.mode, _ZCLIP_MODES),
        )

    def init(self, like: Array) -> ZClipState:
        zero = _scalar(like, 0.0)
        return ZClipState(zero, zero, zero)

    def update(self, stats: ClipStats, state: ZClipState) -> tuple[Clip, ZClipState]:
        norm = stats.global_norm
        xp = namespace_of(norm)
        finite = xp.isfinite(norm)
        safe = xp.where(finite, norm, xp.zeros_like(norm))
        warm = state.count >= self.warmup_steps
        armed = finite & warm
        std = xp.sqrt(state.variance)
        z_thr = self.z_threshold
        if self.mode == "zscore":
            z = (safe - state.mean) / (std + self.eps)
            spike = armed & (z > z_thr)
            bound = state.mean + (z_thr * z_thr / xp.where(spike, z, z_thr)) * std
            passes = state.mean + z_thr * (std + self.eps)  # the largest norm with z <= z_thr
        else:
            passes = state.mean + z_thr * std
            spike = armed & (safe > passes)
            bound = passes
        threshold = xp.where(spike, bound, passes)
        threshold = xp.where(warm, threshold, math.inf)
        scale = _scale_to(xp, norm, xp.where(spike, bound, math.inf))
        # Warm-up: running mean and population variance (Welford); afterwards the EMAs.
        effective = xp.where(spike, bound, safe)
        count = state.count + 1.0
        delta = effective - state.mean
        warm_mean = state.mean + delta / count
        warm_variance = state.variance + (delta * (effective - warm_mean) - state.variance) / count
        ema_mean = self.alpha * state.mean + (1 - self.alpha) * effective
        ema_variance = self.alpha * state.variance + (1 - self.alpha) * (effective - ema_mean) ** 2
        new = ZClipState(
            mean=xp.where(finite, xp.where(warm, ema_mean, warm_mean), state.mean),
            variance=xp.where(finite, xp.where(warm, ema_variance, warm_variance), state.variance),
            count=xp.where(finite, count, state.count),
        )
        return Clip(scale, threshold), new


@dataclass(frozen=True)
class AGC:
    """Unit-wise adaptive gradient clipping (AGC).

    Brock, De, Smith and Simonyan, "High-Performance Large-Scale Image Recognition Without
    Normalization", ICML 2021 (Section 4). Each unit's gradient norm is capped at
    ``clipping * max(||w_unit||, eps)``, as timm's ``adaptive_clip_grad`` does (same defaults,
    ``clip_factor=0.01``, ``eps=1e-3``). A unit is one output unit (the adapters decide): in
    torch a slice along a weight's first dimension (a row of a Linear weight, an output channel
    of a Conv kernel), in Keras along its last axis; a vector or scalar parameter is one unit.
    The paper leaves the final classifier layer unclipped; group it out with your own code if
    you follow it.

    Example:
        >>> import numpy as np
        >>> stats = ClipStats(np.float32(5.0), np.array([1.0, 0.001]), np.array([10.0, 10.0]))
        >>> clip, _ = AGC(clipping=0.01).update(stats, None)
        >>> clip.scale.tolist()
        [0.1, 1.0]
    """

    clipping: float = 0.01
    eps: float = 1e-3
    needs_unit_norms: ClassVar[bool] = True

    def __post_init__(self) -> None:
        clipping = _positive_as_given("clipping", self.clipping)
        set_fields(self, clipping=clipping, eps=_positive_as_given("eps", self.eps))

    def init(self, like: Array) -> EmptyState:
        return EmptyState()

    def update(self, stats: ClipStats, state: EmptyState) -> tuple[Clip, EmptyState]:
        if stats.unit_grad_norms is None or stats.unit_param_norms is None:
            raise ValueError("AGC needs `unit_grad_norms` and `unit_param_norms` in its stats.")
        xp = namespace_of(stats.unit_grad_norms)
        limit = self.clipping * xp.maximum(stats.unit_param_norms, self.eps)
        scale = _scale_to(xp, stats.unit_grad_norms, limit)
        return Clip(scale, _scalar(stats.global_norm, self.clipping)), state


@runtime_checkable
class Policy(Protocol):
    """What the ``clip=`` argument takes: any object with these two methods.

    ``init(like)`` returns the policy's state: a tuple (best a NamedTuple) of arrays made like
    ``like`` (its namespace, dtype and device), ``()`` for none. ``update(stats, state)``
    returns a :class:`Clip` and the new state, with no Python branching on array values and no
    host reads, written against ``namespace_of(stats.global_norm)``: it then runs on numpy, on
    torch tensors and inside Keras' compiled step. It must not change its inputs, nor keep
    anything on the object: checkpoints save the state, and configurations are compared by
    ``repr`` (see :meth:`gradwatch.guard.Guard.state_dict`).

    A policy declares what it needs beyond the global norm with class attributes, read with
    defaults by the adapters (not protocol members, so a plain class need not set them):

    * ``needs_unit_norms = True``: ``stats.unit_grad_norms`` and ``stats.unit_param_norms``
      hold each output unit's norms (see :class:`AGC` for what a unit is), and ``Clip.scale``
      may be a ``[units]`` vector, one scale per unit in the same order. Read it with
      :func:`needs_unit_norms`.

    Example:
        >>> import numpy as np
        >>> from gradwatch.array_api import namespace_of
        >>> class HalveAbove:  # halve the gradients when their global norm exceeds a limit
        ...     def __init__(self, limit):
        ...         self.limit = limit
        ...     def init(self, like):
        ...         return ()
        ...     def update(self, stats, state):
        ...         xp = namespace_of(stats.global_norm)
        ...         one = xp.ones_like(stats.global_norm)
        ...         scale = xp.where(stats.global_norm > self.limit, 0.5 * one, one)
        ...         return Clip(scale, self.limit * one), state
        >>> policy = as_policy(HalveAbove(1.0))
        >>> isinstance(policy, Policy), needs_unit_norms(policy), needs_unit_norms(AGC())
        (True, False, True)
        >>> clip, _ = policy.update(ClipStats(np.float32(3.0)), policy.init(np.float32(0.0)))
        >>> float(clip.scale)
        0.5
    """

    def init(self, like: Array) -> Any: ...

    def update(self, stats: ClipStats, state: Any) -> tuple[Clip, Any]: ...


POLICIES: tuple[type, ...] = (ClipByNorm, ClipByValue, AutoClip, ZClip, AGC)
"""The built-in policies."""


def needs_unit_norms(policy: object) -> bool:
    """Whether ``policy`` declares ``needs_unit_norms = True`` (False when it says nothing)."""
    return bool(getattr(policy, "needs_unit_norms", False))


def as_policy(clip: object) -> Policy | None:
    """The ``clip=`` argument of the callbacks: a policy, a float (``ClipByNorm``), or None.

    A policy is any object meeting :class:`Policy`, a built-in or your own. A policy class
    passed without calling it gets a hint.

    Example:
        >>> as_policy(2) == ClipByNorm(2.0), as_policy(AutoClip()) == AutoClip()
        (True, True)
        >>> as_policy(AutoClip)
        Traceback (most recent call last):
        ...
        TypeError: `clip` must be None, a positive float (the max global norm), or a policy: \
an object with init(like) and update(stats, state) methods (ClipByNorm, ClipByValue, AutoClip, \
ZClip, AGC, or your own). Received: clip=<class 'gradwatch.policies.AutoClip'>; did you mean \
AutoClip()?
    """
    if clip is None or meets(clip, Policy):
        return clip  # type: ignore[return-value]
    names = ", ".join(p.__name__ for p in POLICIES)
    allowed = (
        "None, a positive float (the max global norm), or a policy: an object with init(like)"
        f" and update(stats, state) methods ({names}, or your own)"
    )
    try:
        max_norm = check_real("clip", clip, allowed, lambda v: v > 0)
    except TypeError:
        hint = did_you_mean(clip, (Policy,))
        raise TypeError(f"`clip` must be {allowed}. Received: clip={clip!r}{hint}") from None
    return ClipByNorm(float(max_norm))
