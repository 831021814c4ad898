"""A sink that keeps records in a list, for tests and notebooks."""

from __future__ import annotations

from types import TracebackType

from gradwatch.record import Histogram, Image, Record

__all__ = ["MemorySink"]


class MemorySink:
    """Keep a copy of every non-empty record written, in order.

    Like :class:`~gradwatch.sinks.TensorBoardSink`, it skips empty records and refuses writes
    after ``close``.

    Example:
        >>> sink = MemorySink()
        >>> sink.write(Record(step=3, scalars={"loss": 0.5}))
        >>> sink.scalars("loss")
        [(3, 0.5)]
    """

    def __init__(self) -> None:
        self.records: list[Record] = []
        self._closed = False

    def write(self, record: Record) -> None:
        """Append a copy of ``record``, so later changes to its dicts do not show here.

        Raises:
            RuntimeError: If the sink is closed.
        """
        if self._closed:
            raise RuntimeError(f"{type(self).__name__} is closed; create a new sink to write more.")
        if record:
            self.records.append(_copy(record))

    def flush(self) -> None:
        """Do nothing: records are kept in memory."""

    def close(self) -> None:
        """Refuse further writes; the records stay readable. Closing again does nothing."""
        self._closed = True

    def __enter__(self) -> MemorySink:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def tags(self) -> set[str]:
        """Return every scalar, histogram and text tag written."""
        tags: set[str] = set()
        for record in self.records:
            tags.update(record.scalars, record.histograms, record.texts, record.images)
        return tags

    def scalars(self, tag: str) -> list[tuple[int, float]]:
        """Return ``(step, value)`` for each record holding the scalar ``tag``."""
        return [(r.step, float(r.scalars[tag])) for r in self.records if tag in r.scalars]

    def histograms(self, tag: str) -> list[tuple[int, Histogram]]:
        """Return ``(step, histogram)`` for each record holding the histogram ``tag``."""
        return [(r.step, r.histograms[tag]) for r in self.records if tag in r.histograms]

    def texts(self, tag: str) -> list[tuple[int, str]]:
        """Return ``(step, text)`` for each record holding the text ``tag``."""
        return [(r.step, r.texts[tag]) for r in self.records if tag in r.texts]

    def images(self, tag: str) -> list[tuple[int, Image]]:
        """Return ``(step, image)`` for each record holding the image ``tag``."""
        return [(r.step, r.images[tag]) for r in self.records if tag in r.images]


def _copy(record: Record) -> Record:
    """Return a record with its own dicts (histograms are frozen and can be shared)."""
    return Record(
        step=record.step,
        scalars=dict(record.scalars),
        histograms=dict(record.histograms),
        texts=dict(record.texts),
        events=list(record.events),
        images=dict(record.images),
        layout=record.layout,
    )
