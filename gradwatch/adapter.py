"""What every adapter shares: the options it takes, checked once, and what it tells of its run.

Each adapter (the Lightning and Keras callbacks, the plain-loop ``TorchGradWatch``) subclasses
:class:`Adapter`, adds the arguments of its own framework, and translates the framework's
hooks into calls on its engine and on the run's :class:`~gradwatch.reporting.Reporter`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any, ClassVar, Literal

from gradwatch.options import Options, Rules, check_options
from gradwatch.record import Sink
from gradwatch.reporting import Reporter

__all__ = ["Adapter"]


class Adapter:
    """The options every adapter takes, and the state of its run.

    Args:
        log_every_n_steps: optimizer steps between logging steps; None (default): 50, or in
            Lightning the Trainer's ``log_every_n_steps``. The steps in between update only
            what decisions need, on the device, with no host read.
        histogram_every_n_steps: optimizer steps between gradient histograms and pictures of
            gradient flow; 0 (default) for none.
        group_by: the adapter's named rule (``"module"`` or ``"parameter"`` for torch,
            ``"layer"`` or ``"variable"`` for Keras; None: the first), or a callable from a
            tensor's name to its group's name.
        log_dir: the directory of the event files; None (default): the adapter's default
            folder; False: no event files.
        track_update_ratio: also measure ``update_to_param/<group>``, the norm of the update
            the optimizer made at a logging step over the parameters' norm.
        track_signal: also measure the forward and backward signal at each group's module on
            the logging steps' batches: ``act_rms``, ``act_grad_rms``, ``act_gain``,
            ``act_dead``, ``act_saturated`` (see :mod:`gradwatch.signal`). Nothing is
            installed or run between logging steps.
        histogram_bins: buckets per histogram (at most 10,000).
        statistics: the per-group statistics written: ``"default"`` (``grad_norm`` and
            ``grad_to_param``, two charts a group), ``"all"``, or a list of names from
            ``grad_norm``, ``grad_to_param``, ``grad_max_abs``, ``grad_nonfinite``,
            ``param_norm``, ``update_to_param``. Non-finite values are reported through the
            events whatever is chosen.
        clip: a clipping policy (``ClipByNorm``, ``ClipByValue``, ``AutoClip``, ``ZClip``,
            ``AGC``, or any object with ``init(like)`` and ``update(stats, state)``), a float
            for ``ClipByNorm(float)``, or None.
        on_nonfinite, on_explosion: ``"warn"`` (default), ``"skip"`` (drop the optimizer
            step: parameters and optimizer state unchanged), ``"stop"`` (drop the offending
            step the same way, then end training) or ``"ignore"``. Steps a loss scaler drops
            itself are counted (``amp/skipped_steps``), never treated as faults.
        on_vanishing: ``"warn"`` (default), ``"stop"`` or ``"ignore"``.
        explosion, vanishing: the detectors (:class:`gradwatch.detectors.Explosion`,
            :class:`gradwatch.detectors.Vanishing`, or any object meeting
            :class:`gradwatch.detectors.Detector`); None: the default settings.
        on_dead_units, on_saturation: with ``track_signal``, ``"warn"`` (default), ``"stop"``
            (end training after the step) or ``"ignore"`` when a group's outputs stay dead or
            saturated for several logging steps.
        dead_units, saturation: those findings' settings
            (:class:`gradwatch.signal.DeadUnits`, :class:`gradwatch.signal.Saturation`);
            None: the defaults.
        sinks: extra sinks for the records (for example a
            :class:`gradwatch.sinks.MemorySink`).

    The most recent detections are kept on :attr:`events` and told as one
    :class:`~gradwatch.reporting.GradWatchWarning` line per logging step.
    """

    RULES: ClassVar[Rules] = Rules()
    reporter: Reporter | None = None

    def __init__(
        self,
        *,
        log_every_n_steps: int | None = None,
        histogram_every_n_steps: int = 0,
        group_by: Callable[[str], str] | str | None = None,
        log_dir: str | os.PathLike | Literal[False] | None = None,
        track_update_ratio: bool = False,
        track_signal: bool = False,
        histogram_bins: int = 30,
        statistics: str | Sequence[str] = "default",
        clip: Any = None,
        on_nonfinite: str = "warn",
        on_explosion: str = "warn",
        on_vanishing: str = "warn",
        explosion: Any = None,
        vanishing: Any = None,
        on_dead_units: str = "warn",
        on_saturation: str = "warn",
        dead_units: Any = None,
        saturation: Any = None,
        sinks: Sequence[Sink] = (),
    ) -> None:
        self.options: Options = check_options(locals(), self.RULES)
        super().__init__()

    @property
    def events(self) -> list[dict]:
        """The most recent detections, oldest first."""
        return [] if self.reporter is None else self.reporter.events

    @property
    def stopped_at(self) -> int | None:
        """The step a ``"stop"`` action dropped, or None."""
        return None if self.reporter is None else self.reporter.stopped_at

    @property
    def should_stop(self) -> bool:
        """Whether a ``"stop"`` action fired: Lightning and Keras then end training
        themselves; in a plain loop, end the loop."""
        return self.stopped_at is not None
