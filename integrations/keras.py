"""The Keras callback: ``model.fit(..., callbacks=[GradWatch()])`` (Keras 3, TensorFlow backend).

Keras callbacks never see gradients, so at ``on_train_begin`` the callback wraps the
optimizer's ``apply`` on the instance and rebuilds the train function: statistics, detectors,
clipping and skipping then run inside the compiled train step (see
:mod:`gradwatch.integrations._keras_capture`). The capture itself starts at the first
``apply``, while the step is traced: Keras builds a model without ``keras.Input``, or a
subclassed one, at its first batch, so its variables are known only then. A custom
``train_step`` is measured when it calls ``optimizer.apply`` or ``apply_gradients``. At
``on_train_end`` the optimizer gets its own ``apply`` back and the train function is dropped,
so the next ``fit`` traces a clean one. When ``fit`` ends by an exception instead (Keras then
skips ``on_train_end``), the same happens at the start of the next ``fit`` or
``train_on_batch``.

Event files go to ``<log_dir>/train``, the folder Keras' own ``TensorBoard`` callback writes
its ``batch_``/``epoch_`` metrics to, with the step = ``optimizer.iterations`` before the update.
"""

from __future__ import annotations

import inspect
import os
from pathlib import Path
from typing import Any, Literal

import keras

from gradwatch.adapter import Adapter
from gradwatch.cadence import ReadSchedule
from gradwatch.dashboard import Layout
from gradwatch.grouping import Grouping
from gradwatch.options import Rules
from gradwatch.reporting import GradWatchWarning, Reporter
from gradwatch.sinks import TensorBoardSink

__all__ = ["GradWatch", "GradWatchWarning"]

DEFAULT_LOG_DIR = "logs"
_KERAS_CLIPS = ("clipnorm", "global_clipnorm", "clipvalue")


class GradWatch(Adapter, keras.callbacks.Callback):
    """Watch gradient flow in ``model.fit``: per-layer statistics in TensorBoard, and actions.

    Args:
        log_dir: TensorBoard directory; gradwatch writes to ``<log_dir>/train`` beside Keras'
            own ``TensorBoard`` callback. None (default): that callback's ``log_dir`` when it
            is in the same ``fit``, else ``"logs"``. False: no event files (see ``sinks``).
        **options: the options of every adapter (:class:`gradwatch.adapter.Adapter`);
            ``group_by`` is ``"layer"`` (default), ``"variable"`` or a callable from a
            variable's path.

    ``param_norm``, and so ``grad_to_param`` and ``update_to_param``, are taken after the
    step's update: read before it, the weights would be copied at every step inside XLA (the
    update itself is measured against a copy of the weights from before it). Clipping is
    taken on the aggregated gradient under ``tf.distribute``; for ``AGC`` a unit is a slice
    along a weight's last axis. ``"skip"`` leaves the weights and the optimizer's own
    variables, ``iterations`` included, untouched; ``"stop"`` drops that step the same way,
    with any later one in the same execution, and sets ``model.stop_training`` at the end of
    the batch. The last step is written when ``fit`` ends.
    """

    RULES = Rules(group_rules=("layer", "variable"), group_member="variable path")

    def __init__(
        self, log_dir: str | os.PathLike | Literal[False] | None = None, **options: Any
    ) -> None:
        super().__init__(log_dir=log_dir, **options)
        if self.options.track_signal:
            raise ValueError(
                "`track_signal=True` is not available in the Keras callback yet (the Lightning"
                " callback and TorchGradWatch have it). Received: track_signal=True"
            )
        self.grouping: Grouping | None = None
        self._capture: Any = None
        self._target: Any = None
        self._outer: Any = None
        self._marks = (-1, -1)
        self._saved: dict[str, list] = {}

    # -- lifecycle ---------------------------------------------------------------------------

    def on_train_begin(self, logs: dict | None = None) -> None:
        if keras.config.backend() != "tensorflow":
            raise RuntimeError(
                "gradwatch's Keras callback needs the TensorFlow backend (KERAS_BACKEND="
                f"'tensorflow'); this Keras runs on {keras.config.backend()!r}."
            )
        model = self.model
        optimizer = model.optimizer
        own = [f"{k}={v}" for k in _KERAS_CLIPS if (v := getattr(optimizer, k, None))]
        self.options.warn_if_clipped_twice(
            own and f"the optimizer's own {', '.join(own)}",
            "Keras clips after gradwatch (per replica under tf.distribute).",
        )
        # Under mixed_float16 the inner optimizer receives the unscaled gradients.
        target = getattr(optimizer, "inner_optimizer", optimizer)
        self._target, self._capture, self.grouping = target, None, None
        original = type(target).apply.__get__(target)

        def apply(grads: list, trainable_variables: Any = None) -> None:
            capture = self._started(trainable_variables)
            return capture.apply(original, list(grads), trainable_variables)

        object.__setattr__(target, "apply", apply)  # bypasses Keras' attribute tracking
        if target is not optimizer:  # count the steps the loss scaler drops itself
            outer = type(optimizer).apply.__get__(optimizer)

            def scaled_apply(grads: list, trainable_variables: Any = None) -> Any:
                capture = self._started(trainable_variables)
                before = capture.calls.read()
                result = outer(grads, trainable_variables)
                capture.count_scaler_skip(before)
                return result

            object.__setattr__(optimizer, "apply", scaled_apply)
            self._outer = optimizer
        model.make_train_function(force=True)

        def make_train_function(force: bool = False) -> Any:
            # Reached only when a `fit` ended by an exception (Keras calls `on_train_end`
            # only when `fit` returns): the next `fit` or `train_on_batch` starts clean.
            self._restore()
            return model.make_train_function(force=True)

        object.__setattr__(model, "make_train_function", make_train_function)
        self._marks = (-1, -1)
        options = self.options
        self._reads = ReadSchedule(
            options.cadence(),
            int(target.iterations.numpy()),
            getattr(model, "steps_per_execution", 1),
        )
        log_dir = options.log_dir
        if options.writes_files and log_dir is None:
            log_dir = _sibling_tensorboard_log_dir() or DEFAULT_LOG_DIR
        files = [TensorBoardSink(Path(log_dir) / "train")] if isinstance(log_dir, str) else []
        self.reporter = Reporter.open(
            [*files, *options.sinks],
            self._layout,
            pictures=options.histogram_every_n_steps > 0,
        )

    def _layout(self) -> Layout:
        """The Custom Scalars layout, made at the first record: the groups are known then."""
        return self.options.dashboard(self.grouping)  # type: ignore[arg-type]

    def _started(self, trainable_variables: Any) -> Any:
        """The capture, started at the first optimizer step (inside the traced train step,
        or eagerly under ``run_eagerly``): a model built at its first batch (a ``Sequential``
        without ``keras.Input``, a subclassed model) has its variables only then."""
        if self._capture is not None:
            return self._capture
        from gradwatch.integrations._keras_capture import Capture, cross_replica

        model, target = self.model, self._target

        def start() -> None:
            variables = list(model.trainable_variables)
            known = {id(v) for v in variables}
            given = trainable_variables
            if given is None:  # Keras requires a built optimizer then
                given = target._trainable_variables
            variables += [v for v in given if id(v) not in known]
            options = self.options
            paths = [v.path for v in variables]
            self.grouping = Grouping.build(paths, options.group_by)
            self._capture = Capture(
                target,
                variables,
                self.grouping,
                options.guard,
                options.cadence(),
                options.histogram_bins,
                model.distribute_strategy,
                options.track_update_ratio,
                scaled=target is not model.optimizer,
                statistics=options.statistics,
                saved=(self._saved.get("guards") or [None])[0],
            )

        cross_replica(start)
        return self._capture

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        if self._capture is None or self.reporter is None:
            return
        guard = self.options.guard
        stop = guard.can_stop and self.stopped_at is None and self._capture.should_stop()
        if stop or self._reads.batch_ended():
            self._collect(stop)
        if stop:
            self.model.stop_training = True

    def _collect(self, stop: bool = False) -> None:
        """Write the logging and histogram steps the graph stored since the last read; with
        ``stop``, the newest logging step is the one a stop dropped."""
        records, *marks = self._capture.collect(*self._marks)
        if tuple(marks) != self._marks:
            self._reads.caught_up(max(marks), int(self._target.iterations.numpy()))
        self._marks = tuple(marks)
        self.reporter.publish(records, self._marks[0] if stop else None)

    def state_dict(self) -> dict[str, list]:
        """The clipping and detector state as plain lists, to resume a later ``fit`` with
        :meth:`load_state_dict` (the step count is the optimizer's own ``iterations``)."""
        if self._capture is None:
            return dict(self._saved)
        return {"guards": [self.options.guard.state_dict(self._capture.guard_state.host())]}

    def load_state_dict(self, state: dict[str, list]) -> None:
        """Resume from :meth:`state_dict`, when the next ``fit`` starts measuring."""
        self._saved = dict(state) if isinstance(state, dict) else {}

    def on_train_end(self, logs: dict | None = None) -> None:
        self._restore()

    def _restore(self) -> None:
        """Write the last step, give the optimizer its own ``apply`` back and close the files
        (idempotent)."""
        model = self.model
        if "make_train_function" in vars(model):
            object.__delattr__(model, "make_train_function")
        if self.reporter is not None and not self.reporter.closed:
            last = []
            if self._capture is not None:
                self._collect()
                last = self._capture.finish(self._marks[0])
            self.reporter.close(last)
        for optimizer in (self._target, self._outer):
            if optimizer is not None and "apply" in vars(optimizer):
                object.__delattr__(optimizer, "apply")
        if self._target is not None:
            model.train_function = None  # the next fit traces the user's own step
        self._target = self._outer = None


def _sibling_tensorboard_log_dir() -> str | None:
    """The ``log_dir`` of a ``keras.callbacks.TensorBoard`` in the same ``fit``, if any.

    Callbacks do not see each other; the ``CallbackList`` that calls ``on_train_begin`` does.
    """
    frame = inspect.currentframe()
    try:
        while frame is not None:
            owner = frame.f_locals.get("self")
            if isinstance(owner, keras.callbacks.CallbackList):
                for callback in owner.callbacks:
                    if isinstance(callback, keras.callbacks.TensorBoard):
                        return os.fspath(callback.log_dir)
                return None
            frame = frame.f_back
        return None
    finally:
        del frame
