"""A progress bar over bytes read: tqdm's when installed, else a line on stderr."""

from __future__ import annotations

import sys
import time
from typing import TextIO

__all__ = ["ByteProgress"]


class ByteProgress:
    """Count bytes read out of ``total``; ``quiet`` shows nothing.

    Example:
        >>> import io
        >>> with ByteProgress(2048, quiet=True) as bar:
        ...     bar(1024)
        >>> bar.done
        1024
    """

    def __init__(self, total: int, *, quiet: bool = False, stream: TextIO | None = None) -> None:
        self.total, self.done, self.quiet = total, 0, quiet
        self.stream = stream or sys.stderr
        self._tqdm = None
        self._shown = 0.0
        if not quiet:
            try:
                from tqdm import tqdm
            except ImportError:
                pass
            else:
                self._tqdm = tqdm(
                    total=total, unit="B", unit_scale=True, desc="reading", file=self.stream
                )

    def __call__(self, count: int) -> None:
        self.done += count
        if self.quiet:
            return
        if self._tqdm is not None:
            self._tqdm.update(count)
        elif time.monotonic() - self._shown > 0.2 or self.done >= self.total:
            self._shown = time.monotonic()
            share = min(self.done / self.total, 1.0) if self.total else 1.0
            bar = "#" * int(30 * share)
            self.stream.write(f"\rreading [{bar:<30}] {100 * share:5.1f}%")
            self.stream.flush()

    def __enter__(self) -> ByteProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._tqdm is not None:
            self._tqdm.close()
        elif not self.quiet:
            self.stream.write("\n")
