"""One record to every sink, with the gradient-flow pictures added on the way."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from gradwatch.record import Record, Sink

__all__ = ["Fanout"]


class Fanout:
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
