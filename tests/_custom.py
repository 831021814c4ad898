"""Policies and detectors as a user writes them: plain classes, no gradwatch base class.

``HalveAbove`` is the README's example. The contract harness (test_protocols.py) runs them with
the built-ins; test_custom_policy.py trains with them in every framework.
"""

from __future__ import annotations

import math
from typing import NamedTuple

from gradwatch.array_api import namespace_of
from gradwatch.detectors import Verdict
from gradwatch.policies import Clip


class HalveAbove:
    """Halve the gradients when their global norm exceeds ``limit``."""

    def __init__(self, limit):
        self.limit = limit

    def init(self, like):
        return ()  # no state

    def update(self, stats, state):
        xp = namespace_of(stats.global_norm)
        one = xp.ones_like(stats.global_norm)
        scale = xp.where(stats.global_norm > self.limit, 0.5 * one, one)
        return Clip(scale, self.limit * one), state


class ClipToMean:
    """Clip the global norm to ``factor`` times the mean of the finite norms before it; its
    state is a plain tuple (the sum and the count of those norms)."""

    def __init__(self, factor=2.0):
        self.factor = factor

    def init(self, like):
        xp = namespace_of(like)
        return (xp.zeros_like(like), xp.zeros_like(like))

    def update(self, stats, state):
        norm = stats.global_norm
        xp = namespace_of(norm)
        total, count = state
        one = xp.ones_like(norm)
        finite = xp.isfinite(norm)
        threshold = xp.where(count > 0, self.factor * total / xp.maximum(count, one), math.inf)
        over = finite & (norm > threshold)
        scale = xp.where(over, threshold / xp.where(over, norm, one), one)
        total = total + xp.where(finite, norm, 0.0 * one)
        count = count + xp.astype(finite, norm.dtype)
        return Clip(scale, threshold), (total, count)


class UnitCap:
    """Cap each output unit's gradient norm at ``cap`` (needs the unit norms, as AGC does)."""

    needs_unit_norms = True

    def __init__(self, cap):
        self.cap = cap

    def init(self, like):
        return ()

    def update(self, stats, state):
        norms = stats.unit_grad_norms
        xp = namespace_of(norms)
        one = xp.ones_like(norms)
        scale = xp.where(norms > self.cap, self.cap / xp.where(norms > 0, norms, one), one)
        return Clip(scale, self.cap * xp.ones_like(stats.global_norm)), state


class StreakState(NamedTuple):
    run: object  # [1 + groups] consecutive steps above the bound


class Streak:
    """Flag an entry (the global norm, or a group's) on the ``patience``-th step in a row
    above ``bound``."""

    def __init__(self, bound, patience=2):
        self.bound, self.patience = bound, patience

    def init(self, like, groups):
        xp = namespace_of(like)
        device = getattr(like, "device", None)
        return StreakState(xp.zeros((1 + groups,), dtype=like.dtype, device=device))

    def update(self, entries, state):
        values, finite = entries
        xp = namespace_of(values)
        threshold = xp.full_like(values, self.bound)
        run = xp.where(finite & (values > threshold), state.run + 1.0, 0.0)
        return Verdict(run == float(self.patience), values, threshold), StreakState(run)
