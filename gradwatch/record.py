"""What one logging step produces: named scalars, histograms, text and images, ready for a sink."""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from gradwatch.dashboard import Layout

__all__ = ["HISTOGRAM_HEAD", "Histogram", "Image", "Record", "Sink"]

HISTOGRAM_HEAD = ("min", "max", "sum", "sum_squares")
"""An engine's histogram row: these four values, then the counts of the equal-width buckets.
Over shards the head combines by ``min``, ``max``, ``sum``, ``sum`` and the counts add up."""

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_SIZE = struct.Struct(">II")


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
    def from_row(cls, row: np.ndarray) -> Histogram:
        """Build from an engine's row (:data:`HISTOGRAM_HEAD`, then the bucket counts)."""
        lo, hi, total, total_sq = row[: len(HISTOGRAM_HEAD)]
        return cls.from_counts(lo, hi, row[len(HISTOGRAM_HEAD) :], total, total_sq)

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


@dataclass(frozen=True)
class Image:
    """A PNG image and its size in pixels, read from the PNG header.

    Example:
        >>> png = bytes.fromhex("89504e470d0a1a0a0000000d49484452000000300000001008060000")
        >>> Image.from_png(png).width, Image.from_png(png).height
        (48, 16)
    """

    png: bytes
    width: int
    height: int

    @classmethod
    def from_png(cls, png: bytes) -> Image:
        """Wrap PNG bytes; raises ``ValueError`` when they do not start like a PNG file."""
        if not isinstance(png, bytes) or len(png) < 24 or not png.startswith(_PNG_SIGNATURE):
            start = png[:8] if isinstance(png, bytes) else type(png).__name__
            raise ValueError(f"Images must be PNG-encoded bytes. Received: {start!r}...")
        width, height = _PNG_SIZE.unpack(png[16:24])  # the IHDR chunk comes first
        return cls(png=png, width=width, height=height)


@dataclass
class Record:
    """Everything written for one step; a sink writes it as one event."""

    step: int
    scalars: dict[str, float] = field(default_factory=dict)
    histograms: dict[str, Histogram] = field(default_factory=dict)
    texts: dict[str, str] = field(default_factory=dict)
    events: list[dict] = field(default_factory=list)  # detections, also in `texts` as Markdown
    images: dict[str, Image] = field(default_factory=dict)
    layout: Layout | None = None  # TensorBoard's custom-scalars layout, written once per run

    def __bool__(self) -> bool:
        return bool(self.scalars or self.histograms or self.texts or self.images or self.layout)


class Sink(Protocol):
    """Where records go. ``write`` after ``close`` raises ``RuntimeError``."""

    def write(self, record: Record) -> None: ...

    def flush(self) -> None: ...

    def close(self) -> None: ...
