"""Per-step orchestration on the host: when to log, and what a logging step writes."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from gradwatch.checks import OFF, check_count
from gradwatch.record import Record, Sink

__all__ = [
    "Cadence",
    "Monitor",
]


@dataclass(frozen=True)
class Cadence:
    """How often the expensive statistics are gathered, counted in optimizer steps.

    Step ``k`` (0-based) is a logging step when ``(k + 1) % n == 0``: the steps Lightning's
    own logging uses (``n - 1``, ``2n - 1``, ...), so both share one host synchronisation and
    the charts line up. Step 0 is a logging step too, so a run shows its start.

    Example:
        >>> [k for k in range(10) if Cadence(log_every_n_steps=4).logs(k)]
        [0, 3, 7]
    """

    log_every_n_steps: int = 50
    histogram_every_n_steps: int = 0

    def __post_init__(self) -> None:
        every = check_count("log_every_n_steps", self.log_every_n_steps)
        histograms = check_count(
            "histogram_every_n_steps", self.histogram_every_n_steps, smallest=0, meaning=OFF
        )
        object.__setattr__(self, "log_every_n_steps", every)
        object.__setattr__(self, "histogram_every_n_steps", histograms)

    def logs(self, count: int) -> bool:
        return _due(count, self.log_every_n_steps)

    def histograms(self, count: int) -> bool:
        n = self.histogram_every_n_steps
        return n > 0 and _due(count, n)

    def next_due(self, count: int) -> int:
        """The first logging or histogram step after step ``count`` (-1: before any step).

        Example:
            >>> [Cadence(4, histogram_every_n_steps=6).next_due(k) for k in (-1, 0, 3, 5)]
            [0, 3, 5, 7]
        """
        every = [n for n in (self.log_every_n_steps, self.histogram_every_n_steps) if n > 0]
        return min(_next_due(count, n) for n in every)


def _due(count, every: int):
    """Whether step ``count`` is due; ``count`` may be an int or a scalar array (in-graph)."""
    return (count == 0) | ((count + 1) % every == 0)


def _next_due(count: int, every: int) -> int:
    """The first step after ``count`` that :func:`_due` says is due."""
    return 0 if count < 0 else ((count + 1) // every + 1) * every - 1


class Monitor:
    """Hands records to sinks, and closes them exactly once.

    Args:
        sinks: where records go.
        pictures: called on each record before the sinks see it, returning the record to
            write (a :class:`gradwatch.pictures.FlowPictures` adds gradient-flow images).
            Not called when there are no sinks (ranks other than 0). When it also has
            ``ready()`` and ``finish()`` (``FlowPictures`` drawing in the background), the
            records they return are written after each write, and at close: sinks are only
            ever written from the thread that calls ``write`` and ``close``.
    """

    def __init__(
        self, sinks: Sequence[Sink], pictures: Callable[[Record], Record] | None = None
    ) -> None:
        self.sinks = tuple(sinks)
        self.pictures = pictures
        self.closed = False

    def write(self, record: Record) -> None:
        if not self.sinks:
            return
        if self.pictures is not None:
            record = self.pictures(record)
        self._write(record)
        for drawn in _call(self.pictures, "ready"):
            self._write(drawn)

    def close(self) -> None:
        """Write the pictures still being drawn, then close every sink (also if that fails)."""
        if not self.closed:
            self.closed = True
            try:
                if self.sinks:
                    for drawn in _call(self.pictures, "finish"):
                        self._write(drawn)
            finally:
                for sink in self.sinks:
                    sink.close()

    def _write(self, record: Record) -> None:
        if record:
            for sink in self.sinks:
                sink.write(record)


def _call(pictures: object, method: str) -> list[Record]:
    """``pictures.<method>()`` where ``pictures`` has that method, else no records."""
    function = getattr(pictures, method, None)
    return function() if callable(function) else []
