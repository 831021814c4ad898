"""Write report files without ever replacing a file gradwatch did not write."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

__all__ = ["ReportError", "write_safely"]

_SNIFF = 4096  # the generator mark sits in an HTML page's head and in a PNG's first chunks


class ReportError(Exception):
    """A problem the user can fix: printed without a traceback, exit status 2."""


def write_safely(path: Path, data: bytes, mark: bytes, argument: str) -> None:
    """Write ``data`` to ``path`` atomically (a temporary file, then a rename).

    An existing file is replaced only when its first bytes hold ``mark`` (a report gradwatch
    wrote before); anything else raises :class:`ReportError` naming ``argument``.
    """
    if path.is_dir():
        raise ReportError(f"{argument} must be a file path, not a directory. Received: {path}")
    if path.exists():
        with path.open("rb") as existing:
            if mark not in existing.read(_SNIFF):
                raise ReportError(
                    f"{argument}: {path} exists and was not written by gradwatch; refusing to "
                    "replace it. Choose another path or remove the file."
                )
    path.parent.mkdir(parents=True, exist_ok=True)
    mode = path.stat().st_mode & 0o777 if path.exists() else 0o666 & ~_umask()
    descriptor, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(descriptor, "wb") as file:
            file.write(data)
        os.chmod(temporary, mode)  # mkstemp's file is private; a report is an ordinary file
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current
