"""One step's decision: detectors, the actions configured for them, and the clipping policy.

:meth:`Guard.update` is pure array code like the policies and detectors it combines, so every
adapter runs the same decision on its own tensors: numpy on the CPU and in tests, torch on a GPU
with no host synchronisation, TensorFlow inside Keras' compiled train step. The host reads a
decision only where it must act on it: every step for ``"skip"`` and ``"stop"`` (both drop the
offending step, which cannot be done without knowing), at the logging cadence for the events.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, NamedTuple

import numpy as np

from gradwatch.array_api import namespace_of
from gradwatch.checks import check_choice, check_protocol, set_fields
from gradwatch.detectors import (
    DETECTORS,
    Detector,
    DetectStats,
    Explosion,
    Latch,
    NonFinite,
    Vanishing,
    Verdict,
    entries_of,
    latch,
    new_latch,
)
from gradwatch.policies import Clip, ClipStats, Policy, as_policy

__all__ = [
    "ACTIONS",
    "GLOBAL",
    "Decision",
    "Guard",
    "GuardState",
    "check_action",
    "sort_events",
]

Array = Any

ACTIONS = ("warn", "skip", "stop", "ignore")
KINDS = ("nonfinite", "explosion", "vanishing")
GLOBAL = "global"  # the entry of the whole gradient, in events
_ALLOWED = {"nonfinite": ACTIONS, "explosion": ACTIONS, "vanishing": ("warn", "stop", "ignore")}


def check_action(kind: str, action: object) -> str:
    """Validate ``on_<kind>=``; skipping a step does not cure vanishing, so it is refused."""
    return check_choice(f"on_{kind}", action, _ALLOWED[kind])


class Decision(NamedTuple):
    """What to do with this step's gradients.

    Attributes:
        clip: the policy's decision, or None without a policy.
        skip: scalar bool: drop this optimizer step (a ``"skip"`` or ``"stop"`` detector fired:
            a stop drops the offending step too, so no checkpoint keeps its update).
        stop: scalar bool: end training after this step (a ``"stop"`` detector fired).
    """

    clip: Clip | None
    skip: Array
    stop: Array


class GuardState(NamedTuple):
    policy: Any
    detectors: tuple[Any, ...]
    latch: Latch  # [rows, 1 + groups]: every detector's latch (then new levels) in one update


@dataclass(frozen=True)
class Guard:
    """Detectors with their actions, and an optional clipping policy, for one optimizer.

    Kinds whose action is ``"ignore"`` are not evaluated at all. Only the global norm's verdict
    acts (``"skip"``, ``"stop"``): a group's spike is reported, since a small group's norm may
    jump tenfold harmlessly, and a NaN anywhere makes the global norm NaN too. Vanishing acts
    on any group, since it is a property of groups. ``explosion`` and ``vanishing`` given as
    None take the detectors' default settings; either may be a detector of your own (any
    :class:`~gradwatch.detectors.Detector`), which then acts as that kind does. The policy may
    be any :class:`~gradwatch.policies.Policy`.
    """

    policy: Policy | None = None
    on_nonfinite: str = "warn"
    on_explosion: str = "warn"
    on_vanishing: str = "warn"
    explosion: Detector = field(default_factory=Explosion)
    vanishing: Detector = field(default_factory=Vanishing)

    def __post_init__(self) -> None:
        for kind in KINDS:
            check_action(kind, getattr(self, f"on_{kind}"))
        set_fields(
            self,
            explosion=_check_detector("explosion", self.explosion, Explosion),
            vanishing=_check_detector("vanishing", self.vanishing, Vanishing),
        )

    @classmethod
    def configure(
        cls,
        clip: object = None,
        on_nonfinite: str = "warn",
        on_explosion: str = "warn",
        on_vanishing: str = "warn",
        explosion: Detector | None = None,
        vanishing: Detector | None = None,
    ) -> Guard:
        """A guard from a callback's arguments: ``clip`` as :func:`as_policy` takes it, and
        None for the detectors' default settings."""
        return cls(
            policy=as_policy(clip),
            on_nonfinite=on_nonfinite,
            on_explosion=on_explosion,
            on_vanishing=on_vanishing,
            explosion=Explosion() if explosion is None else explosion,
            vanishing=Vanishing() if vanishing is None else vanishing,
        )

    @cached_property
    def active(self) -> tuple[tuple[str, Any, str], ...]:
        """``(kind, detector, action)`` of every kind not ignored, in a fixed order."""
        detectors = {
            "nonfinite": NonFinite(),
            "explosion": self.explosion,
            "vanishing": self.vanishing,
        }
        actions = {k: getattr(self, f"on_{k}") for k in KINDS}
        return tuple((k, detectors[k], actions[k]) for k in KINDS if actions[k] != "ignore")

    @cached_property
    def rows(self) -> tuple[tuple[str, str], ...]:
        """``(kind, what)`` of each latch row: every active detector's findings, then the new
        levels accepted by the detectors that can accept one (``what == "accepted"``)."""
        found = [(kind, "found") for kind, _, _ in self.active]
        accepting = [kind for kind, d, _ in self.active if hasattr(d, "accepted")]
        return (*found, *((kind, "accepted") for kind in accepting))

    @cached_property
    def reads_every_step(self) -> bool:
        """Whether the host must know this step's verdict before the step: to drop it."""
        return any(action in ("skip", "stop") for _, _, action in self.active)

    @cached_property
    def can_stop(self) -> bool:
        """Whether a detector's action is ``"stop"`` (else ``Decision.stop`` is always false)."""
        return any(action == "stop" for _, _, action in self.active)

    def init(self, like: Array, groups: int) -> GuardState:
        policy = None if self.policy is None else self.policy.init(like)
        detectors = tuple(d.init(like, groups) for _, d, _ in self.active)
        names = ["clip", *(kind for kind, _, _ in self.active)]
        for name, part in zip(names, [policy, *detectors], strict=True):
            if part is not None and not isinstance(part, tuple):
                raise TypeError(
                    f"The state of `{name}` must be a tuple (a NamedTuple) of arrays, () for"
                    f" none: its init returned {type(part).__name__}."
                )
        return GuardState(policy, detectors, new_latch(like, (len(self.rows), 1 + groups)))

    def update(
        self,
        stats: DetectStats,
        clip_stats: ClipStats,
        state: GuardState,
        step: Array,
        scaler_skipped: Array | None = None,
    ) -> tuple[Decision, GuardState]:
        """Decide for one step.

        ``scaler_skipped`` (scalar bool, or None without a loss scaler): the loss scaler drops
        this step itself (its gradients overflowed the scaled range). Such a step is no
        fault: nothing is flagged, and no detector or policy learns from it.
        """
        xp = namespace_of(stats.global_norm)
        acting: dict[str, list[Array]] = {"skip": [], "stop": []}
        detector_states, verdicts = [], []
        shared = entries_of(stats) if self.active else None  # once for every detector
        for (kind, detector, action), d_state in zip(self.active, state.detectors, strict=True):
            verdict, d_state = detector.update(shared, d_state)
            if scaler_skipped is not None:
                verdict = verdict._replace(flag=verdict.flag & ~scaler_skipped)
            if action in acting:
                fired = xp.any(verdict.flag) if kind == "vanishing" else verdict.flag[0]
                acting[action].append(fired)
            detector_states.append(d_state)
            verdicts.append(verdict)
        for (_, detector, _), d_state, verdict in zip(
            self.active, detector_states, list(verdicts), strict=True
        ):
            if hasattr(detector, "accepted"):  # a new level is reported like a finding
                accepted = detector.accepted(d_state)
                if scaler_skipped is not None:
                    accepted = accepted & ~scaler_skipped
                verdicts.append(verdict._replace(flag=accepted))
        latched = state.latch
        if verdicts:  # one latch update for all rows, on their stacked verdicts
            stacked = Verdict(*(xp.stack(part) for part in zip(*verdicts, strict=True)))
            latched = latch(latched, stacked, step)
        # A stop drops its step too. Without a stop flag both may need a constant false.
        false = None if acting["stop"] else xp.zeros_like(stats.global_norm) != 0
        stop = _any(acting["stop"], false)
        skip = _any([*acting["skip"], *acting["stop"]], false)
        clip, policy_state = None, state.policy
        if self.policy is not None:
            clip, policy_state = self.policy.update(clip_stats, state.policy)
        new = GuardState(policy_state, tuple(detector_states), latched)
        if scaler_skipped is not None:  # the step never happened for the detectors and policy
            new = new._replace(
                policy=_keep(xp, scaler_skipped, state.policy, policy_state),
                detectors=_keep(xp, scaler_skipped, state.detectors, new.detectors),
            )
        return Decision(clip, skip, stop), new

    def state_dict(self, state: GuardState) -> dict[str, Any]:
        """The policy's and detectors' state as plain lists (they load with
        ``weights_only=True``), with the configuration they belong to.

        A configuration is the object's ``repr`` (a dataclass's names its settings). An object
        whose class keeps Python's default ``repr`` (``<HalveAbove object at 0x...>``, other
        at every run) is named by its class and its attributes instead, ``HalveAbove(limit=1.0)``,
        so that it resumes its state under the same settings; give your class a ``__repr__``
        (or make it a dataclass) when its attributes do not say its settings.
        """
        return {
            "config": self._config(),
            "policy": [] if state.policy is None else [v.tolist() for v in state.policy],
            "detectors": [[v.tolist() for v in d] for d in state.detectors],
        }

    def load_state_dict(
        self, fresh: GuardState, saved: dict[str, Any], like: Callable[[Array, Any], Array]
    ) -> tuple[GuardState, list[str]]:
        """``fresh`` with every part of ``saved`` that belongs to this configuration.

        A part saved under another configuration (another policy, a detector's other settings
        or action set) starts afresh; returns its names. ``like(template, values)`` makes an
        array of the template's kind from saved values. Never raises on a saved state.
        """
        config = saved.get("config") if isinstance(saved, dict) else None
        if not isinstance(config, dict):  # written before configurations were saved
            config = {"policy": None, "detectors": []}
        mine = self._config()
        afresh = []
        policy = fresh.policy
        if fresh.policy is not None:
            restored = None
            if config.get("policy") == mine["policy"]:
                restored = _restore(fresh.policy, saved.get("policy"), like)
            if restored is None:
                afresh.append(f"clipping policy {mine['policy']}")
            policy = restored if restored is not None else fresh.policy
        by_config = dict(zip(config.get("detectors", []), saved.get("detectors", []), strict=False))
        detectors = []
        for name, template in zip(mine["detectors"], fresh.detectors, strict=True):
            restored = _restore(template, by_config.get(name), like)
            if restored is None:
                afresh.append(f"detector {name}")
            detectors.append(restored if restored is not None else template)
        return fresh._replace(policy=policy, detectors=tuple(detectors)), afresh

    def restore(
        self, fresh: GuardState, saved: dict[str, Any], like: Callable[[Array, Any], Array]
    ) -> GuardState:
        """:meth:`load_state_dict`, with one warning naming the parts that start afresh."""
        state, afresh = self.load_state_dict(fresh, saved, like)
        if afresh:
            from gradwatch.reporting import GradWatchWarning  # reporting imports this module

            warnings.warn(
                "gradwatch: the checkpoint's state does not match this configuration; starting"
                f" afresh: {', '.join(afresh)}",
                GradWatchWarning,
                stacklevel=2,
            )
        return state

    def _config(self) -> dict[str, Any]:
        return {
            "policy": describe(self.policy),
            "detectors": [f"{kind}: {describe(detector)}" for kind, detector, _ in self.active],
        }

    def events(self, latch: Latch, groups: Sequence[str]) -> list[dict]:
        """The detections in a host copy of the latch (``[rows, 1 + groups]`` numpy arrays,
        one row per entry of :attr:`rows`), as plain records.

        An event's ``action`` is what was done: ``"skip"`` or ``"stop"`` only on the finding
        that caused it, ``"warn"`` on findings that were only reported, ``"accepted"`` on a
        new level an explosion detector took as normal (the global norm's only).
        """
        actions = {kind: action for kind, _, action in self.active}
        found = []
        for row, (kind, what) in enumerate(self.rows):
            for entry in np.flatnonzero(latch.fired[row]):
                if what == "accepted" and entry > 0:
                    continue
                if what == "accepted":
                    action = "accepted"
                elif entry == 0 or kind == "vanishing":
                    action = actions[kind]
                else:
                    action = "warn"
                found.append(
                    {
                        "step": int(latch.step[row, entry]),
                        "kind": kind,
                        "group": GLOBAL if entry == 0 else groups[entry - 1],
                        "value": float(latch.value[row, entry]),
                        "threshold": float(latch.threshold[row, entry]),
                        "action": action,
                    }
                )
        return sort_events(found)


def _check_detector(name: str, value: object, default: type) -> Any:
    """``value`` when it is a detector, not a built-in of another kind; the default for None."""
    allowed = (
        f"a detector: an object with init(like, groups) and update(entries, state) methods"
        f" ({default.__name__}, or your own)"
    )
    detector = check_protocol(name, value, Detector, allowed, default)
    if isinstance(detector, DETECTORS) and not isinstance(detector, default):
        raise TypeError(
            f"`{name}` must be None or {allowed}, not a built-in detector of another kind."
            f" Received: {name}={value!r}"
        )
    return detector


def describe(part: object) -> str:
    """How a policy's or detector's configuration is saved: its ``repr``, or, for a class
    that keeps Python's default one (which names a memory address), its class and attributes.

    Example:
        >>> from gradwatch.policies import AutoClip
        >>> class HalveAbove:
        ...     def __init__(self, limit):
        ...         self.limit = limit
        >>> describe(AutoClip()), describe(HalveAbove(1.0)), describe(None)
        ('AutoClip(percentile=10.0, history=1000)', 'HalveAbove(limit=1.0)', 'None')
    """
    if type(part).__repr__ is not object.__repr__:
        return repr(part)
    settings = ", ".join(f"{k}={v!r}" for k, v in sorted(getattr(part, "__dict__", {}).items()))
    return f"{type(part).__qualname__}({settings})"


def sort_events(events: list[dict]) -> list[dict]:
    """Step order; within a step the whole gradient's findings first, then the groups'."""
    return sorted(events, key=lambda e: (e["step"], e["group"] != GLOBAL, e["kind"], e["group"]))


def _restore(template: Any, values: Any, like: Callable[[Array, Any], Array]) -> Any:
    """``template`` (a NamedTuple of arrays) filled with saved ``values``, or None when they do
    not fit it (another number of fields, or other shapes)."""
    if not isinstance(values, (list, tuple)) or len(values) != len(template):
        return None
    try:
        leaves = [like(t, v) for t, v in zip(template, values, strict=True)]
    except (TypeError, ValueError):
        return None
    if any(tuple(a.shape) != tuple(t.shape) for a, t in zip(leaves, template, strict=True)):
        return None
    return type(template)(*leaves) if hasattr(template, "_fields") else type(template)(leaves)


def _keep(xp: Any, keep: Array, old: Any, new: Any) -> Any:
    """``new`` with ``old``'s arrays wherever ``keep`` (a scalar bool) is set, leaf by leaf."""
    if old is None:
        return None
    if isinstance(old, tuple):
        parts = (_keep(xp, keep, o, n) for o, n in zip(old, new, strict=True))
        return type(old)(*parts) if hasattr(old, "_fields") else tuple(parts)
    return xp.where(keep, old, new)


def _any(flags: list[Array], false: Array) -> Array:
    """Whether any of the scalar bools ``flags`` is set (``false`` when there are none)."""
    if not flags:
        return false
    found = flags[0]
    for flag in flags[1:]:
        found = found | flag
    return found
