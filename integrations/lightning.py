"""The Lightning callback: ``Trainer(callbacks=[GradWatch()])``.

A thin translation of Trainer events into calls on the torch engine:

* ``on_before_optimizer_step`` (after backward, AMP unscaling, DDP all-reduce; once per
  optimizer step with gradient accumulation; once per ``opt.step()`` in manual optimization)
  measures the gradients;
* ``on_train_batch_end`` finishes the logging steps and writes them: scalars through
  ``trainer.loggers`` (CSV, MLflow, W&B, any logger), histograms and text to TensorBoard event
  files. For a ``TensorBoardLogger`` gradwatch writes the scalars itself, into its own event
  file in the logger's run directory: one event per step holds them all, where the logger
  writes one event per scalar (several times slower for a model's hundreds of scalars).
  Only global rank 0 writes; every rank measures.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import Logger, TensorBoardLogger
from lightning.pytorch.plugins.precision import MixedPrecision

from gradwatch.adapter import Adapter
from gradwatch.grouping import GroupBy
from gradwatch.integrations.torch_engine import TorchEngine
from gradwatch.options import Rules
from gradwatch.record import Record, Sink
from gradwatch.reporting import GradWatchWarning, Reporter
from gradwatch.signal import SignalAlarms
from gradwatch.sinks import TensorBoardSink

__all__ = ["GradWatch", "GradWatchWarning"]

SUBDIRECTORY = "gradwatch"  # inside a logger's run folder
RUNS = "gradwatch_logs"  # without a logger: a folder of runs (no importable package's name)
log = logging.getLogger(__name__)


class _LoggerSink:
    """Scalars to the Trainer's loggers (TensorBoard's excepted), at the step gradwatch measured.

    Where Lightning logs that step itself, they join its row (a CSV row holds the step's own
    metrics and gradwatch's): they go through ``log_dict`` just before Lightning sends the
    step's metrics to its loggers. That reaches every logger, so only when none is a
    TensorBoardLogger (gradwatch writes TensorBoard's scalars into its own file). Other steps
    (the first, the last, those of another cadence) get a row of their own.
    """

    def __init__(self, trainer: pl.Trainer, loggers: list[Logger]) -> None:
        self.trainer = trainer
        self.loggers = loggers
        self.shared_row = len(loggers) == len(trainer.loggers)

    def write(self, record: Record) -> None:
        if not record.scalars:
            return
        if self.shared_row and self._lightning_logs(record.step):
            module = self.trainer.lightning_module
            module.log_dict(record.scalars, on_step=True, on_epoch=False, batch_size=1)
            return
        for logger in self.loggers:
            logger.log_metrics(record.scalars, step=record.step)

    def _lightning_logs(self, step: int) -> bool:
        """Whether Lightning sends this batch's metrics to its loggers, at ``step``."""
        trainer = self.trainer
        return (
            trainer.training
            and trainer.lightning_module.automatic_optimization
            and len(trainer.optimizers) == 1
            and trainer.fit_loop.epoch_loop._batches_that_stepped == step
            and trainer._logger_connector.should_update_logs
        )

    def flush(self) -> None:
        """Loggers flush on their own schedule."""

    def close(self) -> None:
        """Lightning finalizes its loggers itself."""


class GradWatch(Adapter, Callback):
    """Watch gradient flow: per-group gradient statistics in every logger and in TensorBoard.

    Takes the options of every adapter, by name (:class:`gradwatch.adapter.Adapter`), with
    ``log_every_n_steps`` defaulting to the Trainer's, and:

    Args:
        log_dir: directory of gradwatch's TensorBoard event files (every statistic, histogram,
            picture and text, whatever the loggers; loggers other than TensorBoard get the
            scalars too). None (default): a ``gradwatch`` folder inside the first logger's run
            directory, so TensorBoard shows it as a run beside the user's own; without a
            logger, ``<default_root_dir>/gradwatch_logs/version_N``, a new one per fit.
            False: no event files (the loggers still get the scalars).

    ``"stop"`` ends training through Lightning's normal path, so every checkpoint holds the
    weights from before the dropped step. The last step is written when training ends,
    however it ends; detections are also written as a TensorBoard text table
    (``gradwatch/events``).

    Example::

        trainer = Trainer(callbacks=[GradWatch(histogram_every_n_steps=200)])
    """

    RULES = Rules(log_every_n_steps=None, log_every_default="the Trainer's log_every_n_steps")

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.engine: TorchEngine | None = None
        self._loaded_state: dict[str, Any] | None = None

    @property
    def state_key(self) -> str:
        # What tells two instances in one Trainer apart; not the clipping and detector
        # settings, which are saved with the state: a resume under other settings finds it,
        # keeps what still fits and says what starts afresh.
        options = self.options
        return self._generate_state_key(
            log_every_n_steps=options.log_every_n_steps,
            group_by=_group_by_name(options.group_by),
            log_dir=options.log_dir,
        )

    # -- lifecycle ---------------------------------------------------------------------------

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        options = self.options
        plugin = trainer.precision_plugin
        scaler = getattr(plugin, "scaler", None) if isinstance(plugin, MixedPrecision) else None
        count = len(trainer.optimizers)
        self.engine = TorchEngine(
            pl_module.named_parameters(),
            group_by=options.group_by,
            cadence=options.cadence(trainer.log_every_n_steps),
            track_update_ratio=options.track_update_ratio,
            label_optimizers=count > 1,
            histogram_bins=options.histogram_bins,
            statistics=options.statistics,
            guard=options.guard,
            scaler=scaler,
            signal_of=pl_module if options.track_signal else None,
            alarms=SignalAlarms(*options.alarms) if options.track_signal else None,
        )
        clip = trainer.gradient_clip_val
        options.warn_if_clipped_twice(
            clip and f"Trainer(gradient_clip_val={clip})", "Lightning clips after gradwatch."
        )
        if self._loaded_state is not None:
            self.engine.load_state_dict(self._loaded_state)
            self._loaded_state = None
        elif trainer.ckpt_path:
            log.info(
                "gradwatch: the checkpoint %s holds no gradwatch state (written without it, or"
                " by another version); clipping and detector state start afresh",
                trainer.ckpt_path,
            )
        # Every rank resolves the directory: `trainer.log_dir` is a collective (a broadcast).
        log_dir = options.log_dir
        if log_dir is None:
            log_dir = self.default_log_dir(trainer)
        sinks = self._sinks(trainer, log_dir) if trainer.is_global_zero else []
        self.reporter = Reporter.open(
            sinks,
            options.dashboard(self.engine.grouping, list(range(count)) if count > 1 else [None]),
            pictures=options.histogram_every_n_steps > 0,
        )

    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        if self.engine is not None:
            self.engine.before_forward()

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        if self.engine is None or self.reporter is None:
            return
        self.engine.before_optimizer_step(optimizer, step=trainer.global_step)
        self.reporter.stop_at(self.engine.stopped_at)
        if self.should_stop:
            # The step is dropped; every rank decided alike (the norms are all-reduced).
            trainer.should_stop = True

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        if self.engine is not None and self.reporter is not None:
            self.reporter.publish(self.engine.after_optimizer_step())
            if self.should_stop:  # a signal alarm's "stop" (after its step)
                trainer.should_stop = True

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
        """Where gradwatch's event files go when ``log_dir`` is not given: beside the first
        logger's files (``<run dir>/gradwatch``), else, without a logger, a run folder of its
        own, ``<default_root_dir>/gradwatch_logs/version_N``, so that fits never share one.

        A collective: every rank must call it (``trainer.log_dir`` broadcasts, and so does
        the version chosen on rank 0)."""
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                return str(Path(logger.log_dir) / SUBDIRECTORY)
        if trainer.loggers:
            return str(Path(trainer.log_dir or trainer.default_root_dir) / SUBDIRECTORY)
        root = Path(trainer.default_root_dir) / RUNS
        return trainer.strategy.broadcast(str(root / f"version_{_next_version(root)}"))

    def _sinks(self, trainer: pl.Trainer, log_dir: str | bool) -> list[Sink]:
        """gradwatch's own event file gets the whole record (so ``gradwatch report`` works
        with any logger); every logger but TensorBoard gets the scalars as well; and the
        user's ``sinks``."""
        others = [lg for lg in trainer.loggers if not isinstance(lg, TensorBoardLogger)]
        files = [TensorBoardSink(log_dir)] if isinstance(log_dir, str) else []
        loggers = [_LoggerSink(trainer, others)] if others else []
        return [*files, *loggers, *self.options.sinks]

    def _close(self) -> None:
        """Write the last step when it was not logged, and close the files (once)."""
        if self.reporter is not None and not self.reporter.closed:
            assert self.engine is not None
            self.reporter.close(self.engine.finish())


def _next_version(root: Path) -> int:
    """The first N for which ``root/version_N`` does not exist yet."""
    taken = {
        int(p.name.removeprefix("version_"))
        for p in (root.iterdir() if root.is_dir() else ())
        if p.name.startswith("version_") and p.name.removeprefix("version_").isdigit()
    }
    return next(n for n in range(len(taken) + 1) if n not in taken)


def _group_by_name(group_by: GroupBy) -> str:
    return group_by if isinstance(group_by, str) else group_by.__qualname__
