"""From what an engine read on the host to one named record: the same path for every adapter.

An engine measures a step on its device and, at a logging or histogram step, copies to the host
what a :class:`Reading` holds: per-tensor measures by name (:data:`gradwatch.stats.MEASURES`),
the :class:`~gradwatch.stats.StepSummary`, the clipping values (:data:`CLIP_ROW`) and histogram
rows (:data:`gradwatch.record.HISTOGRAM_HEAD`, then the counts). A :class:`Recorder` names them
as tags, attaches the detections read from the guard's latch, and returns the
:class:`~gradwatch.record.Record` that a :class:`~gradwatch.reporting.Reporter` reports and
writes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from gradwatch import tags
from gradwatch.detectors import Latch
from gradwatch.grouping import Grouping
from gradwatch.guard import GLOBAL, Guard
from gradwatch.record import HISTOGRAM_HEAD, Histogram, Record
from gradwatch.signal import SignalAlarms, signal_scalars
from gradwatch.stats import StepSummary, TensorStats, aggregate, global_norm, nonzero_sums

__all__ = [
    "CLIP_ROW",
    "Reading",
    "Recorder",
    "build_histogram_record",
    "build_record",
    "count_nonfinite",
]

CLIP_ROW = (tags.THRESHOLD, tags.COEFFICIENT, tags.CLIPPED)
"""An engine's clipping values of a logging step: the policy's bound, the smallest scale it
applied, and the global norm after clipping."""

_NONFINITE = "grad_nonfinite"


@dataclass
class Reading:
    """One step as an engine read it on the host.

    Attributes:
        step: the optimizer step.
        tensors: positions, among the grouping's tensors, of the tensors measured.
        measures: per-tensor values by :attr:`~gradwatch.stats.Measure.name`, over ``tensors``.
        summary: the step's summary; None for a histogram step between logging steps.
        clip: the :data:`CLIP_ROW` values, with a clipping policy.
        histograms: by group index, a row of :data:`~gradwatch.record.HISTOGRAM_HEAD` and
            counts; a row holding no finite value is left out of the record.
        signal: by group index, a row of :data:`gradwatch.signal.SIGNAL_ROW`, with
            ``track_signal=True``.
    """

    step: int
    tensors: np.ndarray
    measures: dict[str, np.ndarray] = field(default_factory=dict)
    summary: StepSummary | None = None
    clip: np.ndarray | None = None
    histograms: Mapping[int, np.ndarray] = field(default_factory=dict)
    signal: Mapping[int, np.ndarray] = field(default_factory=dict)


class Recorder:
    """Names the readings of one optimizer's steps, and attaches their detections.

    Args:
        grouping: the tensors and their groups.
        guard: the guard whose latch the detections are read from.
        statistics: the per-group statistics written (of those measured).
        optimizer: the optimizer's index in whole-model tags, or None for a lone optimizer.
        scaler: a loss scaler drops steps (their count is written).
        alarms: with the signal measured, its dead-units and saturation findings.
    """

    def __init__(
        self,
        grouping: Grouping,
        guard: Guard,
        *,
        statistics: Sequence[str] = tags.STATISTICS,
        optimizer: int | None = None,
        scaler: bool = False,
        alarms: SignalAlarms | None = None,
    ) -> None:
        self.grouping = grouping
        self.guard = guard
        self.statistics = tuple(statistics)
        self.optimizer = optimizer
        self.scaler = scaler
        self.alarms = alarms

    def record(
        self,
        reading: Reading,
        latch: Latch | None = None,
        counts: Mapping[int, Mapping[str, float]] | None = None,
    ) -> Record:
        """The record of ``reading``; with the host copy of the guard's ``latch``, the
        detections in it, their NaN/Inf counts taken from ``counts`` (by step, then group)
        and from the reading's own measures."""
        histograms = {
            self.grouping.groups[g]: Histogram.from_row(row)
            for g, row in reading.histograms.items()
            if np.isfinite(row[0]) or row[len(HISTOGRAM_HEAD) :].sum() > 0
        }
        if reading.summary is None:
            record = build_histogram_record(reading.step, self.grouping, histograms)
        else:
            record = build_record(
                reading.step,
                self.grouping,
                self._stats(reading),
                summary=reading.summary,
                histograms=histograms,
                optimizer=self.optimizer,
                skips=self.guard.reads_every_step,
                scaler=self.scaler,
                statistics=self.statistics,
            )
        record.scalars.update(signal_scalars(self.grouping, reading.signal))
        if reading.clip is not None:
            for name, value in zip(CLIP_ROW, reading.clip, strict=True):
                tag = tags.total_tag if name == tags.CLIPPED else tags.clip_tag
                record.scalars[tag(name, self.optimizer)] = float(value)
        if latch is not None:
            known = dict(counts or {})
            if _NONFINITE in reading.measures:
                known[reading.step] = nonzero_sums(
                    self.grouping, reading.tensors, reading.measures[_NONFINITE]
                )
            record.events = self.events(latch, known)
        if reading.signal and self.alarms is not None:
            found = self.alarms.events(reading.step, self.grouping, reading.signal)
            record.events = [*record.events, *found]
        return record

    def events(self, latch: Latch, counts: Mapping[int, Mapping[str, float]]) -> list[dict]:
        """The detections in a host copy of the guard's latch, with NaN/Inf counts by step."""
        events = self.guard.events(latch, self.grouping.groups)
        for step, by_group in counts.items():
            count_nonfinite(events, step, by_group)
        return events

    def _stats(self, reading: Reading) -> TensorStats:
        """The reading's measures placed at their tensors' positions among all tensors."""
        size = len(self.grouping.tensors)
        present = np.zeros(size, dtype=bool)
        present[reading.tensors] = True
        values = {}
        for name, value in reading.measures.items():
            values[name] = np.zeros(size, dtype=np.float64)
            values[name][reading.tensors] = value
        return TensorStats(present, values)


def build_record(
    step: int,
    grouping: Grouping,
    tensors: TensorStats,
    *,
    summary: StepSummary,
    histograms: Mapping[str, Histogram] | None = None,
    optimizer: int | None = None,
    skips: bool = False,
    scaler: bool = False,
    statistics: Sequence[str] = tags.STATISTICS,
) -> Record:
    """Name every statistic of one logging step.

    ``statistics`` are the per-group statistics written (of those measured).
    ``summary`` is the host copy of the step's :class:`StepSummary`; ``skips`` writes the
    count of steps gradwatch dropped, ``scaler`` that of the loss scaler's. ``optimizer`` is
    the optimizer's index when a model has several, else ``None``.
    """
    present_groups, per_group = aggregate(grouping, tensors)
    scalars: dict[str, float] = {}
    for statistic in statistics:
        values = per_group.get(statistic)
        if values is None:  # not measured
            continue
        for g in np.flatnonzero(present_groups):
            scalars[tags.group_tag(statistic, grouping.tags[g])] = float(values[g])
    present = np.asarray(tensors.present, dtype=bool)
    norm = global_norm(np.asarray(tensors.values["grad_norm"], dtype=np.float64)[present])
    scalars[tags.total_tag(tags.GLOBAL, optimizer)] = float(norm)
    scalars[tags.total_tag(tags.MAX_SINCE_LAST_LOG, optimizer)] = float(summary.max_global_norm)
    scalars[tags.total_tag(tags.NONFINITE_STEPS, optimizer)] = float(summary.nonfinite_steps)
    if skips:
        scalars[tags.total_tag(tags.SKIPPED_STEPS, optimizer)] = float(summary.skipped_steps)
    if scaler:
        scalars[tags.amp_tag(optimizer)] = float(summary.scaler_skipped_steps)
    record = build_histogram_record(step, grouping, histograms or {})
    record.scalars = scalars
    return record


def build_histogram_record(
    step: int, grouping: Grouping, histograms: Mapping[str, Histogram]
) -> Record:
    """Name the per-group gradient histograms (by group name) of one step."""
    names = grouping.tag_names()
    named = {tags.group_tag(tags.GRAD_HISTOGRAM, names[g]): h for g, h in histograms.items()}
    return Record(step=step, histograms=named)


def count_nonfinite(events: list[dict], step: int, counts: Mapping[str, float]) -> list[dict]:
    """Put on the non-finite findings of ``step`` how many NaN/Inf values were found:
    ``counts`` by group (the global finding gets their sum). The detectors see only norms;
    an engine counts the values where it can (at a logging step, at a dropped step)."""
    for event in events:
        if event["kind"] == "nonfinite" and event["step"] == step:
            total = sum(counts.values()) if event["group"] == GLOBAL else counts.get(event["group"])
            if total:
                event["count"] = int(total)
    return events
