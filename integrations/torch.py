"""gradwatch in a plain PyTorch loop: two calls around ``optimizer.step()``::

watch = TorchGradWatch(model, log_dir="runs/demo")
for batch in loader:
    loss = model(batch).mean()
    loss.backward()
    watch.before_optimizer_step(optimizer)  # after backward (and scaler.unscale_)
    optimizer.step()
    watch.after_optimizer_step()
    optimizer.zero_grad()
    if watch.should_stop:  # only with an action "stop"
        break
watch.close()
"""

from __future__ import annotations

import os
from typing import Any, Literal

import torch

from gradwatch.adapter import Adapter
from gradwatch.checks import check_instance
from gradwatch.integrations.torch_engine import TorchEngine
from gradwatch.reporting import GradWatchWarning, Reporter
from gradwatch.signal import SignalAlarms
from gradwatch.sinks import TensorBoardSink

__all__ = ["GradWatchWarning", "TorchEngine", "TorchGradWatch"]

DEFAULT_LOG_DIR = "runs"


class TorchGradWatch(Adapter):
    """gradwatch for a plain PyTorch loop: the torch engine, writing TensorBoard event files.

    Args:
        model: the module whose gradients are watched.
        log_dir: directory of the event files; None (default): ``"runs"``; False: none
            (records go to ``sinks`` only).
        scaler: the loop's ``torch.amp.GradScaler``, if any. The steps it drops itself (its
            overflow checks) are counted (``amp/skipped_steps``), never reported as faults
            nor acted on. gradwatch unscales the gradients when you have not.
        **options: the options of every adapter (:class:`gradwatch.adapter.Adapter`).

    ``"skip"`` drops the step inside :meth:`before_optimizer_step` (every ``p.grad`` the
    optimizer holds set to None, so ``optimizer.step()`` leaves the parameters and its state
    alone); ``"stop"`` drops the offending step the same way and makes :attr:`should_stop`
    true: end your loop then. Use it as a context manager, or call :meth:`close`: the last
    step is written then.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        log_dir: str | os.PathLike | Literal[False] | None = None,
        *,
        scaler: torch.amp.GradScaler | None = None,
        **options: Any,
    ) -> None:
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"`model` must be a torch.nn.Module. Received: model={model!r}")
        super().__init__(log_dir=log_dir, **options)
        options = self.options
        self.engine = TorchEngine(
            model.named_parameters(),
            group_by=options.group_by,
            cadence=options.cadence(),
            track_update_ratio=options.track_update_ratio,
            histogram_bins=options.histogram_bins,
            guard=options.guard,
            scaler=check_instance("scaler", scaler, torch.amp.GradScaler, lambda: None),
            statistics=options.statistics,
            signal_of=model if options.track_signal else None,
            alarms=SignalAlarms(*options.alarms) if options.track_signal else None,
        )
        log_dir = options.log_dir or DEFAULT_LOG_DIR
        files = [TensorBoardSink(log_dir)] if options.writes_files else []
        self.reporter: Reporter = Reporter.open(
            [*files, *options.sinks],
            options.dashboard(self.engine.grouping, optimizers=None),  # met as they step
            pictures=options.histogram_every_n_steps > 0,
        )

    def before_forward(self) -> None:
        """With ``track_signal=True``, call before each forward (each micro-batch's): before a
        logging step's, it hooks the groups' modules; the hooks go at that optimizer step.
        Elsewhere it installs nothing."""
        self.engine.before_forward()

    def before_optimizer_step(
        self, optimizer: torch.optim.Optimizer, step: int | None = None
    ) -> None:
        """Measure and decide; a ``"skip"`` or ``"stop"`` drops the step here."""
        self.engine.before_optimizer_step(optimizer, step)
        self.reporter.stop_at(self.engine.stopped_at)

    def after_optimizer_step(self) -> None:
        """Write the logging steps measured, and tell their detections."""
        self.reporter.publish(self.engine.after_optimizer_step())

    def state_dict(self) -> dict[str, list]:
        """The step counts and the clipping and detector state, as plain lists."""
        return self.engine.state_dict()

    def load_state_dict(self, state: dict[str, list]) -> None:
        """Resume from :meth:`state_dict` (before the first step)."""
        self.engine.load_state_dict(state)

    def close(self) -> None:
        """Write the last step when it was not logged, and close the event files."""
        if not self.reporter.closed:
            self.reporter.close(self.engine.finish())

    def __enter__(self) -> TorchGradWatch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
