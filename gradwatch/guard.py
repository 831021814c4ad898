"""One step's decision: detectors, the actions configured for them, and the clipping policy.

:meth:`Guard.update` is pure array code like the policies and detectors it combines, so every
adapter runs the same decision on its own tensors: numpy in tests, torch on a GPU with no host
synchronisation, keras.ops inside a compiled train step. The host reads a decision only where it
must act on it: every step for ``"skip"``, and at the logging cadence (or with a lag) for
``"stop"`` and for the events.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, NamedTuple

from gradwatch import keys
from gradwatch.detectors import (
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
from gradwatch.namespace import namespace_of
from gradwatch.policies import Clip, ClipStats, Policy, as_policy
from gradwatch.record import Record

__all__ = [
    "ACTIONS",
    "Decision",
    "GradWatchWarning",
    "Guard",
    "GuardState",
    "check_action",
    "attach_events",
    "events_markdown",
    "report_events",
]

Array = Any

ACTIONS = ("warn", "skip", "stop", "ignore")
KINDS = ("nonfinite", "explosion", "vanishing")
_ALLOWED = {"nonfinite": ACTIONS, "explosion": ACTIONS, "vanishing": ("warn", "stop", "ignore")}


def check_action(kind: str, action: object) -> str:
    """Validate ``on_<kind>=``; skipping a step does not cure vanishing, so it is refused."""
    allowed = _ALLOWED[kind]
    if action not in allowed:
        names = ", ".join(repr(a) for a in allowed)
        raise ValueError(f"`on_{kind}` must be one of {names}. Received: on_{kind}={action!r}")
    return action  # type: ignore[return-value]


class Decision(NamedTuple):
    """What to do with this step's gradients.

    Attributes:
        clip: the policy's decision, or None without a policy.
        skip: scalar bool: drop this optimizer step (a ``"skip"`` detector fired).
        stop: scalar bool: end training (a ``"stop"`` detector fired).
    """

    clip: Clip | None
    skip: Array
    stop: Array


class GuardState(NamedTuple):
    policy: Any
    detectors: tuple[Any, ...]
    latch: Latch  # [active detectors, 1 + groups]: every detector's latch in one update

    @property
    def latches(self) -> tuple[Latch, ...]:
        """The latch of each active detector, in the order of :attr:`Guard.active`."""
        rows = self.latch.fired.shape[0]
        return tuple(Latch(*(part[row] for part in self.latch)) for row in range(rows))


@dataclass(frozen=True)
class Guard:
    """Detectors with their actions, and an optional clipping policy, for one optimizer.

    Kinds whose action is ``"ignore"`` are not evaluated at all.
    """

    policy: Policy | None = None
    on_nonfinite: str = "warn"
    on_explosion: str = "warn"
    on_vanishing: str = "warn"
    explosion: Explosion = field(default_factory=Explosion)
    vanishing: Vanishing = field(default_factory=Vanishing)

    def __post_init__(self) -> None:
        for kind in KINDS:
            check_action(kind, getattr(self, f"on_{kind}"))
        if not isinstance(self.explosion, Explosion):
            raise TypeError(f"`explosion` must be an Explosion. Received: {self.explosion!r}")
        if not isinstance(self.vanishing, Vanishing):
            raise TypeError(f"`vanishing` must be a Vanishing. Received: {self.vanishing!r}")

    @classmethod
    def configure(
        cls,
        clip: object = None,
        on_nonfinite: str = "warn",
        on_explosion: str = "warn",
        on_vanishing: str = "warn",
        explosion: Explosion | None = None,
        vanishing: Vanishing | None = None,
    ) -> Guard:
        """A guard from a callback's arguments: ``clip`` as :func:`as_policy` takes it, and
        None for the detectors' default settings."""
        return cls(
            policy=as_policy(clip),
            on_nonfinite=on_nonfinite,
            on_explosion=on_explosion,
            on_vanishing=on_vanishing,
            explosion=explosion or Explosion(),
            vanishing=vanishing or Vanishing(),
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
    def reads_every_step(self) -> bool:
        """Whether an action needs the host to know this step's verdict before the step."""
        return any(action == "skip" for _, _, action in self.active)

    @cached_property
    def can_stop(self) -> bool:
        """Whether a detector's action is ``"stop"`` (else ``Decision.stop`` is always false)."""
        return any(action == "stop" for _, _, action in self.active)

    def init(self, like: Array, groups: int) -> GuardState:
        return GuardState(
            policy=None if self.policy is None else self.policy.init(like),
            detectors=tuple(d.init(like, groups) for _, d, _ in self.active),
            latch=new_latch(like, (len(self.active), 1 + groups)),
        )

    def update(
        self, stats: DetectStats, clip_stats: ClipStats, state: GuardState, step: Array
    ) -> tuple[Decision, GuardState]:
        xp = namespace_of(stats.global_norm)
        acting: dict[str, list[Array]] = {"skip": [], "stop": []}
        detector_states, verdicts = [], []
        shared = entries_of(stats) if self.active else None  # once for every detector
        for (kind, detector, action), d_state in zip(self.active, state.detectors, strict=True):
            verdict, d_state = detector.evaluate(shared, d_state)
            if action in acting:
                # Group spikes are reported; only the whole gradient's norm acts (a small
                # group's norm may jump tenfold harmlessly; a NaN anywhere makes the global
                # norm NaN too).
                fired = xp.any(verdict.flag) if kind == "vanishing" else verdict.flag[0]
                acting[action].append(fired)
            detector_states.append(d_state)
            verdicts.append(verdict)
        latched = state.latch
        if verdicts:  # one latch update for all detectors, on their stacked verdicts
            stacked = Verdict(*(xp.stack(part) for part in zip(*verdicts, strict=True)))
            latched = latch(latched, stacked, step)
        false = None
        if not (acting["skip"] and acting["stop"]):
            false = xp.zeros_like(stats.global_norm) != 0
        skip, stop = (_any(flags, false) for flags in acting.values())
        clip, policy_state = None, state.policy
        if self.policy is not None:
            clip, policy_state = self.policy.update(clip_stats, state.policy)
        decision = Decision(clip, skip, stop)
        return decision, GuardState(policy_state, tuple(detector_states), latched)

    def events(self, latches: tuple[Latch, ...], groups: tuple[str, ...]) -> list[dict]:
        """The detections in host copies of the latches, as plain records (step order)."""
        found = []
        for (kind, _, action), l_state in zip(self.active, latches, strict=True):
            for entry, fired in enumerate(l_state.fired):
                if fired:
                    found.append(
                        {
                            "step": int(l_state.step[entry]),
                            "kind": kind,
                            "group": "global" if entry == 0 else groups[entry - 1],
                            "value": float(l_state.value[entry]),
                            "threshold": float(l_state.threshold[entry]),
                            "action": action,
                        }
                    )
        return sorted(found, key=lambda e: (e["step"], e["kind"], e["group"]))


def _any(flags: list[Array], false: Array) -> Array:
    """Whether any of the scalar bools ``flags`` is set (``false`` when there are none)."""
    if not flags:
        return false
    found = flags[0]
    for flag in flags[1:]:
        found = found | flag
    return found


def attach_events(record: Record, events: list[dict]) -> Record:
    """Put detections on ``record``: kept as data, and written as a Markdown table."""
    record.events = events
    if events:
        record.texts[keys.EVENTS] = events_markdown(events)
    return record


def events_markdown(events: list[dict]) -> str:
    """Detections as a Markdown table (TensorBoard's text dashboard renders it)."""
    lines = [
        "| step | kind | group | value | threshold | action |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    lines += [
        f"| {e['step']} | {e['kind']} | `{e['group']}` | {e['value']:.4g} | {e['threshold']:.4g}"
        f" | {e['action']} |"
        for e in events
    ]
    return "\n".join(lines)


class GradWatchWarning(UserWarning):
    """A detection: non-finite, exploding or vanishing gradients."""


def report_events(events: list[dict], log: logging.Logger) -> None:
    """Tell the user about each detection: a :class:`GradWatchWarning` and a log record."""
    for event in events:
        message = (
            f"gradwatch: {event['kind']} gradient in {event['group']} at step {event['step']}"
            f" (value {event['value']:.4g}, threshold {event['threshold']:.4g});"
            f" action: {event['action']}"
        )
        warnings.warn(message, GradWatchWarning, stacklevel=3)
        log.warning(message)
