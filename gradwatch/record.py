"""What one logging step produces: named scalars, histograms and text, ready for a sink."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

__all__ = ["Histogram", "Record", "Sink"]


@dataclass(frozen=True)
class Histogram:
    """A histogram of values in equal-width buckets over ``[min, max]``.

    ``bucket_limits[i]`` is the right edge of bucket ``i``; ``counts`` has the same length.
    """

    min: float
    max: float
    num: float
    sum: float
    sum_squares: float
    bucket_limits: tuple[float, ...]
    counts: tuple[float, ...]

    @classmethod
    def from_counts(
        cls, lo: float, hi: float, counts: np.ndarray, total: float, total_sq: float
    ) -> Histogram:
        """Build from the counts of ``len(counts)`` equal buckets spanning ``[lo, hi]``."""
        counts = np.asarray(counts, dtype=np.float64)
        if not hi > lo:  # all values equal (or none): one bucket holds them all
            hi = lo + 1e-12 if np.isfinite(lo) else 0.0
            lo = lo if np.isfinite(lo) else 0.0
        edges = np.linspace(lo, hi, len(counts) + 1)[1:]
        return cls(
            min=float(lo),
            max=float(hi),
            num=float(counts.sum()),
            sum=float(total),
            sum_squares=float(total_sq),
            bucket_limits=tuple(float(e) for e in edges),
            counts=tuple(float(c) for c in counts),
        )


@dataclass
class Record:
    """Everything written for one step; a sink writes it as one event."""

    step: int
    scalars: dict[str, float] = field(default_factory=dict)
    histograms: dict[str, Histogram] = field(default_factory=dict)
    texts: dict[str, str] = field(default_factory=dict)
    events: list[dict] = field(default_factory=list)  # detections, also in `texts` as Markdown

    def __bool__(self) -> bool:
        return bool(self.scalars or self.histograms or self.texts)


class Sink(Protocol):
    """Where records go. ``write`` after ``close`` raises ``RuntimeError``."""

    def write(self, record: Record) -> None: ...

    def flush(self) -> None: ...

    def close(self) -> None: ...
