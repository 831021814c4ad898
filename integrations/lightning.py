"""The Lightning callback: ``Trainer(callbacks=[GradWatch()])``.

A thin translation of Trainer events into calls on the torch engine:

* ``on_before_optimizer_step`` (after backward, AMP unscaling, DDP all-reduce; once per
  optimizer step with gradient accumulation; once per ``opt.step()`` in manual optimization)
  measures the gradients;
* ``on_train_batch_end`` finishes the logging steps and writes them: scalars through
  ``trainer.loggers`` (CSV, MLflow, W&B, any logger), histograms and text to TensorBoard event
  files. For a ``TensorBoardLogger`` gradwatch writes the scalars itself, into its own event
  file in the logger's run directory: one event per step holds them all, where the logger
  writes one event per scalar (3.5 ms against 29 ms for GPT-2's 383 scalars, measured).
  Only global rank 0 writes; every rank measures.
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import Logger, TensorBoardLogger
from lightning.pytorch.plugins.precision import MixedPrecision

from gradwatch.detectors import Explosion, Vanishing
from gradwatch.grouping import GroupBy, check_group_by
from gradwatch.guard import GradWatchWarning, Guard, attach_events, report_events
from gradwatch.integrations.torch import TorchEngine
from gradwatch.monitor import Cadence, Monitor, check_count, check_flag
from gradwatch.pictures import FlowPictures
from gradwatch.policies import Policy
from gradwatch.record import Record, Sink
from gradwatch.sinks import TensorBoardSink

__all__ = ["GradWatch", "GradWatchWarning"]

SUBDIRECTORY = "gradwatch"
log = logging.getLogger(__name__)


class _LoggerSink:
    """Scalars to the Trainer's loggers, at the step gradwatch measured."""

    def __init__(self, loggers: list[Logger]) -> None:
        self.loggers = loggers

    def write(self, record: Record) -> None:
        if record.scalars:
            for logger in self.loggers:
                logger.log_metrics(record.scalars, step=record.step)

    def flush(self) -> None:
        """Loggers flush on their own schedule."""

    def close(self) -> None:
        """Lightning finalizes its loggers itself."""


class _WithoutScalars:
    """Passes histograms, text and images on, leaving scalars (and their layout) to the loggers."""

    def __init__(self, sink: Sink) -> None:
        self.sink = sink

    def write(self, record: Record) -> None:
        self.sink.write(
            Record(
                record.step, histograms=record.histograms, texts=record.texts, images=record.images
            )
        )

    def flush(self) -> None:
        self.sink.flush()

    def close(self) -> None:
        self.sink.close()


def _check_log_dir(log_dir: object) -> str | None:
    if log_dir is None or isinstance(log_dir, (str, os.PathLike)):
        return None if log_dir is None else os.fspath(log_dir)
    raise TypeError(f"`log_dir` must be a path or None. Received: log_dir={log_dir!r}")


class GradWatch(Callback):
    """Watch gradient flow: per-group gradient statistics in every logger and in TensorBoard.

    Args:
        log_every_n_steps: optimizer steps between logging steps; default: the Trainer's
            ``log_every_n_steps``. Steps in between cost one fused norm kernel and no host read.
        histogram_every_n_steps: optimizer steps between gradient histograms; 0 (default) for
            none.
        group_by: ``"module"`` (default: one group per module owning parameters, e.g.
            ``blocks.0.attn``), ``"parameter"``, or a callable from parameter name to group name.
        log_dir: directory of gradwatch's TensorBoard event files (histograms, text, and the
            scalars when the Trainer has a TensorBoardLogger or no logger). Default: a
            ``gradwatch`` folder inside the TensorBoardLogger's run directory (else inside
            ``trainer.log_dir``), so TensorBoard shows it as a run beside the user's own.
        track_update_ratio: also log ``update_to_param/<group>`` (needs a copy of the
            parameters at logging steps).
        histogram_bins: buckets per histogram.
        clip: a clipping policy (``ClipByNorm``, ``ClipByValue``, ``AutoClip``, ``ZClip``,
            ``AGC``), a float for ``ClipByNorm(float)``, or None.
        on_nonfinite, on_explosion: ``"warn"`` (default), ``"skip"`` (drop the optimizer step:
            parameters and optimizer state unchanged), ``"stop"`` (end training through
            Lightning's normal path) or ``"ignore"``.
        on_vanishing: ``"warn"`` (default), ``"stop"`` or ``"ignore"``.
        explosion, vanishing: the detectors' settings (:class:`gradwatch.detectors.Explosion`,
            :class:`gradwatch.detectors.Vanishing`).

    Detections are kept on ``callback.events``, warned as :class:`GradWatchWarning`, logged, and
    written as a TensorBoard text table (``gradwatch/events``) at the next logging step.

    Example::

        trainer = Trainer(callbacks=[GradWatch(histogram_every_n_steps=200)])
    """

    def __init__(
        self,
        log_every_n_steps: int | None = None,
        histogram_every_n_steps: int = 0,
        group_by: GroupBy = "module",
        log_dir: str | os.PathLike | None = None,
        track_update_ratio: bool = False,
        histogram_bins: int = 30,
        clip: Policy | float | None = None,
        on_nonfinite: str = "warn",
        on_explosion: str = "warn",
        on_vanishing: str = "warn",
        explosion: Explosion | None = None,
        vanishing: Vanishing | None = None,
    ) -> None:
        if log_every_n_steps is not None:
            check_count("log_every_n_steps", log_every_n_steps)
        self.log_every_n_steps = log_every_n_steps
        self.histogram_every_n_steps = check_count(
            "histogram_every_n_steps", histogram_every_n_steps, allow_zero=True
        )
        self.group_by = check_group_by(group_by)
        self.log_dir = _check_log_dir(log_dir)
        self.track_update_ratio = check_flag("track_update_ratio", track_update_ratio)
        self.histogram_bins = check_count("histogram_bins", histogram_bins)
        self.guard = Guard.configure(
            clip, on_nonfinite, on_explosion, on_vanishing, explosion, vanishing
        )
        self.events: list[dict] = []
        self.stopped_at: int | None = None
        self.engine: TorchEngine | None = None
        self.monitor: Monitor | None = None
        self._loaded_state: dict[str, Any] | None = None

    @property
    def state_key(self) -> str:
        group_by = self.group_by if isinstance(self.group_by, str) else self.group_by.__qualname__
        return self._generate_state_key(
            log_every_n_steps=self.log_every_n_steps,
            group_by=group_by,
            clip=repr(self.guard.policy),
        )

    # -- lifecycle ---------------------------------------------------------------------------

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        cadence = Cadence(
            self.log_every_n_steps or trainer.log_every_n_steps, self.histogram_every_n_steps
        )
        self.engine = TorchEngine(
            pl_module.named_parameters(),
            group_by=self.group_by,
            cadence=cadence,
            track_update_ratio=self.track_update_ratio,
            label_optimizers=len(trainer.optimizers) > 1,
            histogram_bins=self.histogram_bins,
            guard=self.guard,
        )
        self.events, self.stopped_at = [], None
        if self.guard.policy is not None and trainer.gradient_clip_val:
            warnings.warn(
                f"GradWatch(clip={self.guard.policy}) and Trainer(gradient_clip_val="
                f"{trainer.gradient_clip_val}) both clip; Lightning clips after gradwatch.",
                GradWatchWarning,
                stacklevel=2,
            )
        if self._loaded_state is not None:
            self.engine.load_state_dict(self._loaded_state)
            self._loaded_state = None
        # Every rank resolves the directory: `trainer.log_dir` is a collective (a broadcast).
        log_dir = self.log_dir or self.default_log_dir(trainer)
        if trainer.is_global_zero:
            pictures = FlowPictures(images=self.histogram_every_n_steps > 0)
            self.monitor = Monitor(self._sinks(trainer, log_dir), pictures=pictures)
        else:
            self.monitor = Monitor([])

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        if self.engine is None:
            return
        _unscale_if_lightning_did_not(trainer, optimizer)
        self.engine.before_optimizer_step(optimizer, step=trainer.global_step)

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        if self.engine is None or self.monitor is None:
            return
        for record in self.engine.after_optimizer_step():
            self._report(record.events)
            self.monitor.write(record)
        if not trainer.should_stop and self.engine.should_stop():
            # Every rank reads the same flag at the same step: gradients and norms agree.
            trainer.should_stop = True
            self.stopped_at = trainer.global_step
            events = self.engine.drain_events()
            self._report(events)
            self.monitor.write(attach_events(Record(trainer.global_step), events))
            log.warning("GradWatch stopped training at step %d: %s", trainer.global_step, events)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._close()

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        self._close()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._close()

    # -- checkpoints -------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        if self.engine is None:
            return dict(self._loaded_state or {})
        return self.engine.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._loaded_state = dict(state_dict)

    # -- internals ---------------------------------------------------------------------------

    def default_log_dir(self, trainer: pl.Trainer) -> str:
        """Where gradwatch's event files go when ``log_dir`` is not given."""
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                return str(Path(logger.log_dir) / SUBDIRECTORY)
        return str(Path(trainer.log_dir or trainer.default_root_dir) / SUBDIRECTORY)

    def _sinks(self, trainer: pl.Trainer, log_dir: str) -> list[Sink]:
        """Scalars: to gradwatch's event file if TensorBoard is a logger (or there is none),
        and to every other logger; histograms and text: to gradwatch's event file."""
        events = TensorBoardSink(log_dir)
        others = [lg for lg in trainer.loggers if not isinstance(lg, TensorBoardLogger)]
        if not others:
            return [events]
        with_tensorboard = len(others) < len(trainer.loggers)
        return [_LoggerSink(others), events if with_tensorboard else _WithoutScalars(events)]

    def _report(self, events: list[dict]) -> None:
        self.events.extend(events)
        report_events(events, log)

    def _close(self) -> None:
        if self.monitor is not None:
            self.monitor.close()


def _unscale_if_lightning_did_not(trainer: pl.Trainer, optimizer: torch.optim.Optimizer) -> None:
    """Lightning leaves gradients scaled for optimizers that unscale inside ``step`` (fused Adam).

    Unscaling them here is what ``GradScaler.step`` expects of a user who clips: it then steps
    with the unscaled gradients and the same inf check.
    """
    plugin = trainer.precision_plugin
    scaler = getattr(plugin, "scaler", None)
    if (
        isinstance(plugin, MixedPrecision)
        and scaler is not None
        and getattr(optimizer, "_step_supports_amp_scaling", False)
    ):
        scaler.unscale_(optimizer)
