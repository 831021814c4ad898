"""tqdm's progress bar over the bytes read, with no estimate of the time left too early."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, TextIO

if TYPE_CHECKING:
    from tqdm import tqdm

__all__ = ["ETA_AFTER", "ByteProgress"]

ETA_AFTER = 0.05  # share of the bytes read before the time left is shown
_EARLY = "{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} [{elapsed}]"


class ByteProgress:
    """Count bytes read out of ``total``; ``quiet``, or tqdm not installed, shows nothing.

    The bar's clock starts at the first bytes read, not when the bar is made: TensorBoard's
    reader imports TensorFlow first, and a rate measured over that wait made the first
    estimate far too long. The time left and the rate appear once :data:`ETA_AFTER` of the
    bytes are read.

    Example:
        >>> with ByteProgress(2048, quiet=True) as progress:
        ...     progress(1024)
        >>> progress.done, progress.bar
        (1024, None)
    """

    def __init__(self, total: int, *, quiet: bool = False, stream: TextIO | None = None) -> None:
        self.total, self.done = total, 0
        self.bar: tqdm | None = None if quiet else _bar(total, stream or sys.stderr)

    def __call__(self, count: int) -> None:
        if self.bar is not None:
            if self.done == 0:
                self.bar.reset(total=self.total)  # the clock starts now
            if self.bar.bar_format and self.done + count >= ETA_AFTER * self.total:
                self.bar.bar_format = None  # tqdm's default: with the time left and the rate
            self.bar.update(count)
        self.done += count

    def __enter__(self) -> ByteProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.close()


def _bar(total: int, stream: TextIO) -> tqdm | None:
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(
        total=total, unit="B", unit_scale=True, desc="reading", file=stream, bar_format=_EARLY
    )
