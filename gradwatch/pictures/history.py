"""The history of per-group gradient norms that the gradient-flow pictures are drawn from.

Fed with records (live, from an adapter's monitor) or with values read back from event files
(``gradwatch report``), so both draw the same pictures from the same data.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from gradwatch import tags
from gradwatch.checks import check_count
from gradwatch.record import Record

__all__ = ["BACKWARD", "NORM", "RATIO", "FlowHistory", "FlowMatrix"]

_NORM_PREFIX = f"{tags.GRAD_NORM}/"
_RATIO_PREFIX = f"{tags.GRAD_TO_PARAM}/"
_SIGNAL = (tags.ACT_GRAD_RMS, tags.ACT_RMS, tags.ACT_GAIN)  # kept with track_signal
RATIO = "gradient norm / parameter norm"
NORM = "gradient norm (not size-free)"
BACKWARD = "backward signal RMS"


@dataclass(frozen=True)
class FlowMatrix:
    """Per-group values at logged steps, groups in depth order.

    ``norm`` and ``ratio`` are ``[groups, steps]``: NaN where a group was not logged at a step
    (or, in ``ratio``, where its parameters are all zero), ``inf`` where its gradient was not
    finite, 0 where it was exactly zero. With ``track_signal``, ``backward``, ``forward`` and
    ``gain`` are the same for each group module's ``act_grad_rms`` (the RMS of
    ``dL/d(output)``), ``act_rms`` and ``act_gain``; None without it.
    """

    groups: tuple[str, ...]
    steps: np.ndarray
    norm: np.ndarray
    ratio: np.ndarray
    backward: np.ndarray | None = None
    forward: np.ndarray | None = None
    gain: np.ndarray | None = None

    def measure(self) -> tuple[np.ndarray, str]:
        """What the pictures and the report compare groups by, and its name.

        The gradient/parameter norm ratio, which does not grow with a group's size (both norms
        grow as the square root of its number of elements): a raw norm makes a convolution with
        9·C² weights look larger than the BatchNorm after it, with 2·C. Where no ratio was
        logged at all (records without ``grad_to_param``), the raw norm, named as such.

        Example:
            >>> flow = FlowMatrix(("a",), np.array([0]), np.array([[4.0]]), np.array([[0.5]]))
            >>> flow.measure()
            (array([[0.5]]), 'gradient norm / parameter norm')
        """
        if np.isnan(self.ratio).all() and not np.isnan(self.norm).all():
            return self.norm, NORM
        return self.ratio, RATIO


class FlowHistory:
    """Per-group gradient norms and gradient/parameter norm ratios at every logged step.

    Groups keep the order in which they first appear, which is the order of the model's
    parameters (depth order): records name them in that order. When more than ``max_columns``
    steps have been logged, adjacent pairs of steps are merged, keeping the larger value of
    each group (a spike, or a non-finite gradient, stays visible) at the later step.

    Example:
        >>> history = FlowHistory()
        >>> history.add(0, {"grad_norm/emb": 1.0, "grad_norm/head": 0.5})
        True
        >>> history.add(5, {"loss": 0.1})  # not a logging step of gradwatch's
        False
        >>> _ = history.add(10, {"grad_norm/emb": float("nan"), "grad_norm/head": 0.0})
        >>> m = history.matrix()
        >>> m.groups, m.steps.tolist(), m.norm.tolist()
        (('emb', 'head'), [0, 10], [[1.0, inf], [0.5, 0.0]])
    """

    def __init__(self, max_columns: int = 512) -> None:
        self.max_columns = check_count("max_columns", max_columns)
        if self.max_columns < 2:
            raise ValueError(f"`max_columns` must be >= 2. Received: max_columns={max_columns!r}")
        self._groups: dict[str, int] = {}
        self._steps: list[int] = []
        self._norm: list[dict[int, float]] = []
        self._ratio: list[dict[int, float]] = []
        self._signal: dict[str, list[dict[int, float]]] = {name: [] for name in _SIGNAL}

    def __len__(self) -> int:
        return len(self._steps)

    @property
    def groups(self) -> tuple[str, ...]:
        return tuple(self._groups)

    def update(self, record: Record) -> bool:
        """Add the per-group norms of a logging-step record; return whether it had any."""
        return self.add(record.step, record.scalars)

    def add(self, step: int, scalars: Mapping[str, float]) -> bool:
        """Add one step's ``grad_norm/<group>`` and ``grad_to_param/<group>`` scalars, and
        those of the signal (``act_grad_rms``, ``act_rms``, ``act_gain``).

        A step equal to the last one logged (a second optimizer's record) joins its column.
        """
        norm, ratio = {}, {}
        signal: dict[str, dict[int, float]] = {name: {} for name in _SIGNAL}
        for tag, value in scalars.items():
            statistic, _, group = tag.partition("/")
            if statistic in signal:
                signal[statistic][self._index(group)] = _finite_or_inf(value)
            elif tag.startswith(_NORM_PREFIX):
                norm[self._index(tag[len(_NORM_PREFIX) :])] = _finite_or_inf(value)
            elif tag.startswith(_RATIO_PREFIX):
                group = tag[len(_RATIO_PREFIX) :]
                gradient = float(scalars.get(_NORM_PREFIX + group, np.nan))
                if np.isnan(value) and np.isfinite(gradient):
                    continue  # parameters all zero: a ratio without meaning, not a bad gradient
                ratio[self._index(group)] = _finite_or_inf(value)
        if not norm:
            return False
        if self._steps and self._steps[-1] == step:
            self._norm[-1].update(norm)
            self._ratio[-1].update(ratio)
            for name, values in signal.items():
                self._signal[name][-1].update(values)
        else:
            self._steps.append(int(step))
            self._norm.append(norm)
            self._ratio.append(ratio)
            for name, values in signal.items():
                self._signal[name].append(values)
            if len(self._steps) > self.max_columns:
                self._halve()
        return True

    def matrix(self) -> FlowMatrix:
        """Everything logged so far, as ``[groups, steps]`` arrays."""
        return FlowMatrix(
            groups=self.groups,
            steps=np.asarray(self._steps, dtype=np.int64),
            norm=self._dense(self._norm),
            ratio=self._dense(self._ratio),
            **{
                field: self._dense(columns) if any(columns) else None
                for field, columns in zip(
                    ("backward", "forward", "gain"), self._signal.values(), strict=True
                )
            },
        )

    def _index(self, group: str) -> int:
        return self._groups.setdefault(group, len(self._groups))

    def _dense(self, columns: list[dict[int, float]]) -> np.ndarray:
        dense = np.full((len(self._groups), len(columns)), np.nan)
        for j, column in enumerate(columns):
            for i, value in column.items():
                dense[i, j] = value
        return dense

    def _halve(self) -> None:
        """Merge adjacent pairs of steps (the last one stays alone when the count is odd)."""
        pairs = range(0, len(self._steps) - 1, 2)
        rest = slice(2 * len(pairs), None)
        self._steps = [self._steps[i + 1] for i in pairs] + self._steps[rest]

        def halved(columns: list[dict[int, float]]) -> list[dict[int, float]]:
            return [_merge(columns[i], columns[i + 1]) for i in pairs] + columns[rest]

        self._norm, self._ratio = halved(self._norm), halved(self._ratio)
        self._signal = {name: halved(columns) for name, columns in self._signal.items()}


def _merge(a: dict[int, float], b: dict[int, float]) -> dict[int, float]:
    merged = dict(a)
    for i, value in b.items():
        merged[i] = max(merged.get(i, value), value)  # inf (non-finite) wins over any value
    return merged


def _finite_or_inf(value: float) -> float:
    value = float(value)
    return value if np.isfinite(value) else float("inf")
