"""The forward and backward signal through depth, per group: what it is summed from, and the
tags it becomes.

On a logging step's batch (every micro-batch of that optimizer step), an adapter reduces the
outputs ``y`` of each group's module, and the gradient ``dL/dy`` that reaches them in
backward, each to a number or two (:data:`Entry`); :func:`fold` sums those into one row of
:data:`SIGNAL_ROW` per group. The dead and saturated fractions are taken
on the activation that ends the module, or follows it (a ``ReLU`` registered after a
``Linear``), and only there; saturation only for bounded activations.
:func:`signal_scalars` turns the rows into tags:

* ``act_rms``, ``act_mean``: the forward signal's scale and mean;
* ``act_grad_rms``: the backward signal's scale, the RMS of ``dL/dy``;
* ``act_gain``: the backward signal's RMS at a group over that at the next group toward the
  output (in depth order): the average gain of the Jacobians in between. About 1 is healthy;
  well below 1 the signal vanishes on its way back, well above it explodes;
* ``act_dead``: the fraction of outputs exactly zero (dead ReLU units);
* ``act_saturated``: the fraction of a bounded activation's outputs at its bounds
  (``|tanh| > 0.99``, ``sigmoid`` outside ``[0.01, 0.99]``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from itertools import pairwise

import numpy as np

from gradwatch import tags
from gradwatch.checks import check_choice, check_count, check_real
from gradwatch.grouping import Grouping

__all__ = [
    "SIGNAL_ROW",
    "DeadUnits",
    "Entry",
    "Saturation",
    "SignalAlarms",
    "fold",
    "signal_scalars",
]

SIGNAL_ROW = (
    "sum_squares",  # of the module's outputs
    "sum",
    "count",
    "grad_sum_squares",  # of dL/d(output)
    "grad_count",
    "outputs",  # values the dead fraction is taken over (the activation's outputs)
    "zeros",
    "bounded",  # values of a bounded activation
    "saturated",
)
"""The sums an adapter takes per group on a logging step, in this order."""

_COLUMN = {name: i for i, name in enumerate(SIGNAL_ROW)}

# What an adapter takes at each hook call: one number, with its group, what it is, and over
# how many values it was taken (an :data:`Entry`). :func:`fold` sums them into rows.
NORM = "norm"  # L2 norm of a module's outputs
SUM = "sum"  # their sum
GRAD_NORM = "grad_norm"  # L2 norm of dL/d(output)
NONZERO = "nonzero"  # outputs of the activation not exactly zero
SATURATED = "saturated"  # outputs of a bounded activation at its bounds
LOSS_SCALE = "loss_scale"  # a loss scaler's factor (group -1): divides the backward signal
Entry = tuple[int, str, float]


def fold(entries: Sequence[Entry], values: np.ndarray) -> dict[int, np.ndarray]:
    """Rows of :data:`SIGNAL_ROW` by group, from what the hooks took (``values[i]`` is what
    ``entries[i]`` names).

    Example:
        >>> fold([(0, NORM, 4.0), (0, SUM, 4.0), (0, NONZERO, 4.0)], np.array([3.0, 4, 3]))
        {0: array([9., 4., 4., 0., 0., 4., 1., 0., 0.])}
    """
    rows: dict[int, np.ndarray] = {}
    scale = 1.0
    for (group, kind, count), value in zip(entries, values, strict=True):
        if kind == LOSS_SCALE:
            scale = float(value)
            continue
        row = rows.setdefault(group, np.zeros(len(SIGNAL_ROW)))
        if kind == NORM:
            row[_COLUMN["sum_squares"]] += value * value
        elif kind == SUM:
            row[_COLUMN["sum"]] += value
            row[_COLUMN["count"]] += count
        elif kind == GRAD_NORM:
            row[_COLUMN["grad_sum_squares"]] += value * value
            row[_COLUMN["grad_count"]] += count
        elif kind == NONZERO:
            row[_COLUMN["outputs"]] += count
            row[_COLUMN["zeros"]] += count - value
        elif kind == SATURATED:
            row[_COLUMN["bounded"]] += count
            row[_COLUMN["saturated"]] += value
    if scale != 1.0:
        for row in rows.values():
            row[_COLUMN["grad_sum_squares"]] /= scale * scale
    return rows


def signal_scalars(grouping: Grouping, rows: Mapping[int, np.ndarray]) -> dict[str, float]:
    """The signal tags of one logging step, from the rows of :data:`SIGNAL_ROW` by group
    index (groups whose module did not run on the batch are left out).

    Example:
        >>> g = Grouping.build(["a.weight", "b.weight"], "module")
        >>> rows = {0: np.array([4.0, 0, 1, 16, 1, 1, 0, 0, 0]),
        ...         1: np.array([1.0, 1, 1, 4, 1, 1, 1, 0, 0])}
        >>> scalars = signal_scalars(g, rows)
        >>> scalars["act_rms/a"], scalars["act_gain/a"], scalars["act_dead/b"]
        (2.0, 2.0, 1.0)
    """
    scalars: dict[str, float] = {}
    backward: list[tuple[int, float]] = []  # (group, dL/dy RMS) in depth order
    for g in sorted(rows):
        row, name = rows[g], grouping.tags[g]
        value = {column: float(row[i]) for column, i in _COLUMN.items()}
        if value["count"] <= 0:
            continue
        scalars[tags.group_tag(tags.ACT_RMS, name)] = np.sqrt(value["sum_squares"] / value["count"])
        scalars[tags.group_tag(tags.ACT_MEAN, name)] = value["sum"] / value["count"]
        if value["grad_count"] > 0:
            rms = float(np.sqrt(value["grad_sum_squares"] / value["grad_count"]))
            scalars[tags.group_tag(tags.ACT_GRAD_RMS, name)] = rms
            backward.append((g, rms))
        if value["outputs"] > 0:
            scalars[tags.group_tag(tags.ACT_DEAD, name)] = value["zeros"] / value["outputs"]
        if value["bounded"] > 0:
            saturated = value["saturated"] / value["bounded"]
            scalars[tags.group_tag(tags.ACT_SATURATED, name)] = saturated
    for (g, rms), (_, after) in pairwise(backward):
        gain = rms / after if after > 0 else (1.0 if rms == 0 else np.inf)
        scalars[tags.group_tag(tags.ACT_GAIN, grouping.tags[g])] = float(gain)
    return {tag: float(v) for tag, v in scalars.items()}


ALARM_ACTIONS = ("warn", "stop", "ignore")
"""What a signal alarm may do: it fires after its step was taken, so it cannot skip it."""
DEAD_UNITS = "dead_units"
SATURATION = "saturation"


@dataclass(frozen=True)
class DeadUnits:
    """A group whose activation outputs are exactly zero in more than ``threshold`` of them
    for ``patience`` logging steps in a row: units that no longer pass a signal or learn
    (dying ReLUs). A healthy ReLU layer zeroes about half."""

    threshold: float = 0.9
    patience: int = 5

    def __post_init__(self) -> None:
        check_real("threshold", self.threshold, "in (0, 1)", lambda t: 0 < t < 1)
        check_count("patience", self.patience)


@dataclass(frozen=True)
class Saturation:
    """A group whose bounded activation (tanh, sigmoid) has more than ``threshold`` of its
    outputs at its bounds for ``patience`` logging steps in a row: its slope there is near
    zero, so the backward signal through it vanishes."""

    threshold: float = 0.5
    patience: int = 5

    def __post_init__(self) -> None:
        check_real("threshold", self.threshold, "in (0, 1)", lambda t: 0 < t < 1)
        check_count("patience", self.patience)


class SignalAlarms:
    """The dead-units and saturation findings of a run, over its logging steps.

    Each fires once when a group's fraction has stayed above its threshold for ``patience``
    logging steps, and again only after it fell back below. Events are dicts like the other
    detections' (``kind`` ``"dead_units"`` or ``"saturation"``).
    """

    def __init__(
        self,
        dead_units: DeadUnits | None = None,
        saturation: Saturation | None = None,
        on_dead_units: str = "warn",
        on_saturation: str = "warn",
    ) -> None:
        self.rules: dict[str, tuple[DeadUnits | Saturation, str, tuple[str, str]]] = {
            DEAD_UNITS: (
                dead_units or DeadUnits(),
                check_choice("on_dead_units", on_dead_units, ALARM_ACTIONS),
                ("zeros", "outputs"),
            ),
            SATURATION: (
                saturation or Saturation(),
                check_choice("on_saturation", on_saturation, ALARM_ACTIONS),
                ("saturated", "bounded"),
            ),
        }
        self._streaks: dict[str, dict[int, int]] = {kind: {} for kind in self.rules}

    def events(self, step: int, grouping: Grouping, rows: Mapping[int, np.ndarray]) -> list[dict]:
        """The findings of one logging step, from its rows of :data:`SIGNAL_ROW`."""
        events = []
        for kind, (rule, action, (part, whole)) in self.rules.items():
            if action == "ignore":
                continue
            streaks = self._streaks[kind]
            for g, row in rows.items():
                total = row[_COLUMN[whole]]
                fraction = row[_COLUMN[part]] / total if total > 0 else 0.0
                streaks[g] = streaks.get(g, 0) + 1 if fraction > rule.threshold else 0
                if streaks[g] == rule.patience:
                    events.append(
                        {
                            "step": step,
                            "kind": kind,
                            "group": grouping.groups[g],
                            "value": float(fraction),
                            "threshold": float(rule.threshold),
                            "action": action,
                        }
                    )
        return events
