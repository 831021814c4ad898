"""gradwatch inside Keras' compiled train step (TensorFlow backend).

Keras callbacks never see gradients: they exist only inside the train step, where the trainer
hands them to ``optimizer.apply``. :class:`Capture` wraps that call on the optimizer instance;
it is created at the first call, once the model has built its variables.
In the traced graph, every step, it

* takes the gradients the optimizer receives (under ``mixed_float16`` the capture sits on the
  loss-scale optimizer's inner optimizer, so they are already unscaled; under a
  ``tf.distribute`` strategy it all-reduces them first, so statistics and decisions are those
  of the aggregated gradient),
* runs the core's :class:`~gradwatch.guard.Guard` (detectors and clipping policy, pure array
  code through :mod:`gradwatch.integrations._tf_namespace`) with its state in variables,
* clips, skips the step (``tf.cond`` around the optimizer's own ``apply``, so neither the
  weights nor the optimizer's variables change), and raises a stop flag,
* at logging steps stores per-tensor statistics, at histogram steps per-group histograms.

The callback reads those variables between train-function calls, at batches that may hold a
logging step (and, with a ``"stop"`` action, the stop flag after every batch).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import tensorflow as tf

from gradwatch import tags
from gradwatch.cadence import Cadence
from gradwatch.detectors import DetectStats, Latch, new_latch
from gradwatch.grouping import Grouping
from gradwatch.guard import Decision, Guard
from gradwatch.integrations import _tf_namespace
from gradwatch.policies import ClipStats, needs_unit_norms
from gradwatch.record import Record
from gradwatch.recording import Reading, Recorder
from gradwatch.stats import (
    GRAD_NORM,
    StepSummary,
    global_norm,
    init_summary,
    measures_for,
    reset_summary,
    update_summary,
)

__all__ = ["Capture", "cross_replica"]

_ON_READ = {
    # Every replica computes the same value (from the all-reduced gradient) and keeps its own
    # copy; a read outside the step returns the first replica's. Only under a strategy with
    # several replicas: on one device plain variables need no distribution machinery.
    "synchronization": tf.VariableSynchronization.ON_READ,
    "aggregation": tf.VariableAggregation.ONLY_FIRST_REPLICA,
}


class _Stored:
    """A (nested) NamedTuple of arrays kept in variables between steps; ``None`` stays None."""

    def __init__(self, value: Any, name: str, replicated: bool) -> None:
        self._structure = value
        self._initial = tf.nest.flatten(value)
        options = _ON_READ if replicated else {}
        self.variables = [
            None
            if leaf is None
            else tf.Variable(leaf, name=f"gradwatch_{name}_{i}", trainable=False, **options)
            for i, leaf in enumerate(self._initial)
        ]

    def _pack(self, leaves: list) -> Any:
        return tf.nest.pack_sequence_as(self._structure, leaves)

    def read(self) -> Any:
        return self._pack([None if v is None else tf.identity(v) for v in self.variables])

    def write(self, value: Any) -> None:
        for variable, leaf in zip(self.variables, tf.nest.flatten(value), strict=True):
            if variable is not None:
                variable.assign(leaf)

    def host(self) -> Any:
        """The value as numpy arrays (outside the step)."""
        return self._pack([None if v is None else v.numpy() for v in self.variables])

    def reset(self) -> None:
        self.write(self._pack(self._initial))


def _as_dense(gradient: Any) -> tf.Tensor:
    return tf.cast(tf.convert_to_tensor(gradient), tf.float32)


def cross_replica(fn: Callable[[], None]) -> None:
    """``fn()`` once, in the cross-replica context: from a replica's step through
    ``merge_call`` (every replica waits for it; Keras' optimizer updates its variables so)."""
    context = tf.distribute.get_replica_context()
    if context is None:
        fn()
    else:
        context.merge_call(lambda strategy: fn())


_ROW = (256, 128, 64, 32, 16)  # row lengths a large tensor is viewed in, for its norm


def _norm(tensor: tf.Tensor) -> tf.Tensor:
    """The L2 norm of ``tensor``.

    A large tensor is viewed as rows, and its squares are summed by a matrix-vector product
    with ones: XLA on the CPU runs that as one kernel with the squaring fused in, where it
    lowers ``tf.norm``'s full reduction to a slow windowed loop over squares it may first
    write out (shared with Adam's); on the benchmark MLP's 784x512 kernel that was most of
    gradwatch's cost (benchmarks/README.md).
    """
    size = tensor.shape.num_elements()
    row = next((n for n in _ROW if size and size >= 16 * n and size % n == 0), None)
    if row is None:
        return tf.norm(tensor)
    squares = tf.reshape(tf.square(tensor), (-1, row))
    return tf.sqrt(tf.reduce_sum(tf.linalg.matvec(squares, tf.ones((row,), tensor.dtype))))


def _nothing() -> tf.Tensor:
    return tf.constant(0)


def _unit_norms(tensor: tf.Tensor) -> tf.Tensor:
    """Norms of a Keras weight's output units: slices along the last axis (Dense kernels are
    ``[in, out]``, Conv kernels ``[..., in, out]``); a vector or scalar is one unit."""
    if tensor.shape.rank > 1:
        axes = list(range(tensor.shape.rank - 1))
        return tf.sqrt(tf.reduce_sum(tf.square(tensor), axis=axes))
    return tf.reshape(tf.norm(tensor), (1,))


class Capture:
    """The in-graph side of the Keras callback, for one optimizer and its variables."""

    def __init__(
        self,
        optimizer: Any,
        variables: Sequence[Any],
        grouping: Grouping,
        guard: Guard,
        cadence: Cadence,
        histogram_bins: int,
        strategy: tf.distribute.Strategy,
        track_update_ratio: bool = False,
        scaled: bool = False,
        statistics: Sequence[str] = tags.DEFAULT_STATISTICS,
        saved: dict[str, Any] | None = None,
    ) -> None:
        _tf_namespace.install()
        self.statistics = tuple(statistics)
        self.optimizer = optimizer
        self.grouping = grouping
        self.guard = guard
        self.cadence = cadence
        self.bins = histogram_bins
        self.strategy = strategy
        self.track_update_ratio = track_update_ratio
        self.scaled = scaled  # under a loss-scale optimizer, whose skipped steps are counted
        update = (tags.UPDATE_TO_PARAM,) if track_update_ratio else ()
        self.measures = measures_for([*statistics, *update])
        self.recorder = Recorder(grouping, guard, statistics=statistics, scaler=scaled)
        self._position = {id(v): i for i, v in enumerate(variables)}
        self._variables = list(variables)
        tensors, groups = len(self._variables), len(grouping.groups)

        def stored(value: Any, name: str) -> _Stored:
            return _Stored(value, name, replicated=strategy.num_replicas_in_sync > 1)

        # The capture starts inside the traced step (at its first `apply`): `init_scope`
        # creates the variables eagerly, out of the trace, as Keras initializes a layer's
        # deferred variables; the step captures them like the model's own.
        with tf.init_scope(), strategy.scope():
            like = tf.zeros((), tf.float32)
            state = guard.init(like, groups)
            if saved is not None:  # a resumed run's state, where it fits this configuration
                state = guard.restore(state, saved, lambda t, v: tf.constant(v, t.dtype))
            self.guard_state = stored(state, "guard")
            self.summary = stored(init_summary(like), "summary")
            # per tensor, at the last logging step: had it a gradient, and every measure taken
            self.present = stored(tf.zeros((tensors,)), "present")
            self.values = {m.name: stored(tf.zeros((tensors,)), m.name) for m in self.measures}
            self.clip = stored(tf.zeros((3,)), "clip")  # threshold, coefficient, clipped norm
            self.histograms = stored(tf.zeros((groups, histogram_bins + 4)), "histograms")
            self.marks = stored(tf.constant([-1, -1], tf.int64), "marks")  # logged, histogram
            self.stop = stored(tf.constant(False), "stop")
            self.last = stored(tf.zeros((tensors,)), "last")  # the newest step's norms
            self.last_step = stored(tf.constant(-1, tf.int64), "last_step")
            self.calls = stored(tf.constant(0, tf.int64), "calls")  # steps that reached apply
        self._last_index: list[int] = []

    # -- in the train step -------------------------------------------------------------------

    def apply(self, original: Callable, grads: list, trainable_variables: Any = None) -> None:
        """Replaces ``optimizer.apply(grads, trainable_variables)`` in the traced step."""
        variables = list(trainable_variables or self.optimizer._trainable_variables)
        present = [k for k, g in enumerate(grads) if g is not None]
        if not present or not variables:  # nothing to measure, or Keras' own error to raise
            return original(grads, trainable_variables)
        index = [self._position[id(variables[k])] for k in present]
        self._last_index = index  # at trace time: the tensors every traced step measures
        values = [_as_dense(grads[k]) for k in present]
        replicas = self.strategy.num_replicas_in_sync
        if replicas > 1:
            context = tf.distribute.get_replica_context()
            values = context.all_reduce(tf.distribute.ReduceOp.SUM, values)

        def read_params() -> list[tf.Tensor]:
            return [tf.cast(variables[k], tf.float32) for k in present]

        # A copy of the weights kept past the update costs a full copy per step (XLA cannot
        # update the variables in place while it lives): read them here only when needed.
        needs_copy = self.track_update_ratio or needs_unit_norms(self.guard.policy)
        params = read_params() if needs_copy else None
        norms = _without_overflow(values, tf.stack([_norm(v) for v in values]))
        total = global_norm(norms)
        segments = tf.constant(self.grouping.index[index], tf.int32)
        group_norms = tf.sqrt(
            tf.math.unsorted_segment_sum(tf.square(norms), segments, len(self.grouping.groups))
        )
        step = tf.convert_to_tensor(self.optimizer.iterations)
        if self.scaled:  # the loss-scale optimizer's wrapper compares it (count_scaler_skip)
            self.calls.write(self.calls.read() + 1)
        self.last.write(self._scatter(index, norms))
        self.last_step.write(step)
        decision, state = self.guard.update(
            DetectStats(total, group_norms),
            self._clip_stats(total, values, params),
            self.guard_state.read(),
            step,
        )
        self.guard_state.write(state)
        drop, logs = decision.skip, self.cadence.logs(step)
        if self.guard.can_stop:
            # After a stop, the steps left in this execution (steps_per_execution > 1) are
            # dropped too and not logged; the stop step itself is logged.
            stopped = self.stop.read()
            drop = drop | stopped
            logs = (logs & ~stopped) | (decision.stop & ~stopped)
            self.stop.write(stopped | decision.stop)
        dropped = drop if self.guard.reads_every_step else None
        self.summary.write(update_summary(self.summary.read(), total, dropped))
        clipped = values if decision.clip is None else self._clipped(decision, values)
        clip_row = None if decision.clip is None else self._clip_row(decision, clipped, total)

        # The gradients' statistics before the update, the weights' after it: a `cond` that
        # reads the weights before the update makes XLA copy every weight at every step (it
        # may not update them in place while the `cond` could still read them), and one that
        # reads the gradients after it keeps them all alive to the end of the step. So the
        # logged parameter norms are those after this step's update.
        self._gradients_at_cadence(step, logs, index, norms, values, clip_row)
        out = list(grads)
        if decision.clip is not None:  # each replica's share of the clipped aggregate
            for k, value in zip(present, clipped, strict=True):
                out[k] = tf.cast(value / replicas, grads[k].dtype)
        if self.guard.reads_every_step:
            self._unless_skipped(drop, original, out, trainable_variables)
        else:
            original(out, trainable_variables)
        before = params if self.track_update_ratio else None  # read before the update
        self._parameters_at_cadence(step, logs, index, read_params, before)

    def count_scaler_skip(self, calls_before: tf.Tensor) -> None:
        """After the loss-scale optimizer's ``apply``: when it did not reach the inner
        optimizer's (its own overflow check dropped the step), count the step."""
        skipped = tf.equal(self.calls.read(), calls_before)
        summary = self.summary.read()
        self.summary.write(
            summary._replace(
                scaler_skipped_steps=summary.scaler_skipped_steps + tf.cast(skipped, tf.float32)
            )
        )

    def _clip_stats(self, total: tf.Tensor, values: list, params: list) -> ClipStats:
        if not needs_unit_norms(self.guard.policy):
            return ClipStats(total)
        return ClipStats(
            total,
            tf.concat([_unit_norms(v) for v in values], 0),
            tf.concat([_unit_norms(p) for p in params], 0),
        )

    @staticmethod
    def _clipped(decision: Decision, values: list) -> list:
        clip = decision.clip
        assert clip is not None
        if clip.value is not None:
            return [tf.clip_by_value(v, -clip.value, clip.value) for v in values]
        if clip.scale.shape.rank == 0:
            return [v * clip.scale for v in values]
        out, offset = [], 0  # one scale per unit (AGC), in the order of _unit_norms
        for v in values:
            units = int(v.shape[-1]) if v.shape.rank > 1 else 1
            scale = clip.scale[offset : offset + units]
            out.append(v * (scale if v.shape.rank > 1 else scale[0]))
            offset += units
        return out

    @staticmethod
    def _clip_row(decision: Decision, clipped: list, total: tf.Tensor) -> tf.Tensor:
        """[threshold, coefficient, norm after clipping] of this step."""
        clip = decision.clip
        assert clip is not None
        if clip.value is None and clip.scale.shape.rank == 0:  # a scale <= 1 for every tensor
            after = total * clip.scale
        else:  # element- or unit-wise: measure what the optimizer gets
            after = global_norm(tf.stack([_norm(c) for c in clipped]))
        threshold = tf.cast(clip.threshold, tf.float32)
        return tf.stack([threshold, tf.reduce_min(clip.scale), after])

    def _gradients_at_cadence(self, step, logs, index, norms, values, clip_row) -> None:
        def logging_step() -> tf.Tensor:
            self.present.write(self._scatter(index, tf.ones_like(norms)))
            for measure in self.measures:
                if measure.of == "grad":
                    row = norms if measure is GRAD_NORM else _reduced(measure.reduce, values)
                    self.values[measure.name].write(self._scatter(index, row))
            if clip_row is not None:
                self.clip.write(clip_row)
            return tf.constant(0)

        def histogram_step() -> tf.Tensor:
            self._store_histograms(index, values)
            self.marks.write(tf.stack([self.marks.read()[0], step]))
            return tf.constant(0)

        tf.cond(logs, logging_step, _nothing)
        if self.cadence.histogram_every_n_steps:
            tf.cond(self.cadence.histograms(step), histogram_step, _nothing)

    def _parameters_at_cadence(self, step, logs, index, read_params, before) -> None:
        """The parameters' measures after the update (the update's against ``before``, the
        parameters before it). Marks the logging step as stored."""

        def logging_step() -> tf.Tensor:
            params = read_params()
            tensors = {"param": params}
            if before is not None:
                tensors["update"] = [a - b for a, b in zip(params, before, strict=True)]
            for measure in self.measures:
                if measure.of in tensors:
                    row = _reduced(measure.reduce, tensors[measure.of])
                    self.values[measure.name].write(self._scatter(index, row))
            self.marks.write(tf.stack([step, self.marks.read()[1]]))
            return tf.constant(0)

        tf.cond(logs, logging_step, _nothing)

    def _scatter(self, index, values) -> tf.Tensor:
        """Per-tensor values of the present tensors, at their places among all tensors."""
        columns = tf.constant(np.asarray(index)[:, None], tf.int32)
        return tf.scatter_nd(columns, values, (len(self._variables),))

    def _store_histograms(self, index, values) -> None:
        """Per group: [lo, hi, sum, sum of squares, counts...] over its finite values."""
        by_group: dict[int, list] = {}
        for i, v in zip(index, values, strict=True):
            by_group.setdefault(int(self.grouping.index[i]), []).append(tf.reshape(v, (-1,)))
        rows = [tf.fill((self.bins + 4,), np.float32(np.nan))] * len(self.grouping.groups)
        for group, parts in by_group.items():
            flat = tf.concat(parts, 0)
            finite = tf.math.is_finite(flat)
            lo = tf.reduce_min(tf.where(finite, flat, np.inf))
            hi = tf.reduce_max(tf.where(finite, flat, -np.inf))
            safe = tf.where(finite, flat, 0.0)
            width = tf.maximum(hi - lo, np.finfo(np.float32).tiny)
            bucket = tf.clip_by_value(
                tf.cast(tf.floor((safe - lo) / width * self.bins), tf.int32), 0, self.bins - 1
            )
            counts = tf.math.unsorted_segment_sum(tf.cast(finite, tf.float32), bucket, self.bins)
            moments = tf.stack([lo, hi, tf.reduce_sum(safe), tf.reduce_sum(tf.square(safe))])
            rows[group] = tf.concat([moments, counts], 0)
        self.histograms.write(tf.stack(rows))

    def _unless_skipped(self, skip, original: Callable, grads: list, variables: Any) -> None:
        """``original(grads, variables)`` unless ``skip``: weights and optimizer state stay."""

        def step() -> tf.Tensor:
            original(grads, variables)
            return tf.constant(0)

        def no_step() -> tf.Tensor:
            return tf.constant(0)

        if tf.__internal__.distribute.strategy_supports_no_merge_call():
            tf.cond(skip, no_step, step)
            return

        # The optimizer's update calls `merge_call`, which a `cond` in a replica context may
        # not contain: decide in the cross-replica context (as Keras' LossScaleOptimizer does).
        def decide(distribution, skip, grads, variables) -> None:
            first = distribution.experimental_local_results(skip)[0]  # equal on every replica

            def each_replica_steps() -> tf.Tensor:
                distribution.extended.call_for_each_replica(original, args=(grads, variables))
                return tf.constant(0)

            tf.cond(first, no_step, each_replica_steps)

        tf.distribute.get_replica_context().merge_call(decide, args=(skip, grads, variables))

    # -- on the host, between train-function calls ---------------------------------------------

    def collect(self, last_logged: int, last_histogram: int) -> tuple[list[Record], int, int]:
        """Records of the logging and histogram steps stored since the given ones; a logging
        step's record carries the detections since the last read."""
        logged, histogram = (int(m) for m in self.marks.host())
        rows = {}
        if histogram > last_histogram:
            rows = dict(enumerate(self.histograms.host()))
        records = []
        if logged > last_logged:
            present = np.flatnonzero(self.present.host() > 0)
            reading = Reading(
                logged,
                present,
                {name: v.host()[present] for name, v in self.values.items()},
                self._summary(),
                self.clip.host() if self.guard.policy is not None else None,
                rows if histogram == logged else {},
            )
            records.append(self.recorder.record(reading, self.drain()))
            if histogram == logged:
                rows = {}
        if rows:
            reading = Reading(histogram, np.zeros(0, dtype=np.int64), histograms=rows)
            records.append(self.recorder.record(reading))
        return sorted(records, key=lambda r: r.step), logged, histogram

    def should_stop(self) -> bool:
        return bool(self.stop.host())

    def drain(self) -> Latch:
        """A host copy of the latched detections since the last drain (then reset)."""
        state = self.guard_state.host()
        if state.latch.fired.shape[0]:
            fresh = new_latch(np.zeros((), np.float32), state.latch.fired.shape)
            self.guard_state.write(state._replace(latch=fresh))
        return state.latch

    def finish(self, last_logged: int) -> list[Record]:
        """The record of the newest step when it was not logged (its gradient norms only),
        with the detections not yet read."""
        step = int(self.last_step.host())
        if step < 0 or step <= last_logged:
            return []
        present = np.asarray(self._last_index, dtype=np.int64)
        norms = {GRAD_NORM.name: self.last.host()[present].astype(np.float64)}
        reading = Reading(step, present, norms, self._summary())
        return [self.recorder.record(reading, self.drain())]

    def _summary(self) -> StepSummary:
        """The host copy of the step summary, which then starts a new interval."""
        summary = self.summary.host()
        self.summary.write(reset_summary(summary))
        return StepSummary(*(float(v) for v in summary))


def _reduced(reduction: str, tensors: list) -> tf.Tensor:
    """Per tensor, one number: a :class:`~gradwatch.stats.Measure`'s reduction."""
    if reduction == "norm":
        return tf.stack([_norm(t) for t in tensors])
    if reduction == "max_abs":
        return tf.stack([tf.reduce_max(tf.abs(t)) for t in tensors])
    return tf.stack([tf.reduce_sum(tf.cast(~tf.math.is_finite(t), tf.float32)) for t in tensors])


_FLOAT32_MAX = float(np.finfo(np.float32).max)


def _without_overflow(values: list, norms: tf.Tensor) -> tf.Tensor:
    """``norms`` with infinite norms of finite gradients taken again scaled by their largest
    value (in one ``cond``, so a step without any costs one check): a sum of squares that
    overflows float32 (from about 1.8e19) is a large finite norm, not a non-finite one."""

    def scaled() -> tf.Tensor:
        again = []
        for v, n in zip(values, tf.unstack(norms), strict=True):
            largest = tf.reduce_max(tf.abs(v))
            ok = tf.math.is_finite(largest) & (largest > 0)
            safe = tf.where(ok, largest, 1.0)
            exact = tf.minimum(tf.norm(v / safe) * safe, _FLOAT32_MAX)
            again.append(tf.where(ok & tf.math.is_inf(n), exact, n))
        return tf.stack(again)

    return tf.cond(tf.reduce_any(tf.math.is_inf(norms)), scaled, lambda: norms)
