"""Write report files, replacing only files that carry gradwatch's exact mark.

A file counts as gradwatch's own only when it holds the exact bytes gradwatch writes at a fixed
place: an HTML page starts with the page head of :data:`gradwatch.report.html.HEAD`, and a PNG
file's first chunk after its header is the ``tEXt`` chunk ``Software`` = ``gradwatch``. A file
that merely mentions "gradwatch report" is someone else's. ``force`` replaces any file, and
writes through a symbolic link to the file it points to (the link stays a link).
"""

from __future__ import annotations

import os
import struct
import tempfile
import zlib
from collections.abc import Callable
from pathlib import Path

__all__ = ["Mark", "ReportError", "check_output", "html_mark", "png_mark", "write_safely"]

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_FIRST_CHUNK = len(_PNG_SIGNATURE) + 8 + 13 + 4  # after the signature and the IHDR chunk

Mark = Callable[[bytes], bool]  # given a file's first bytes: did gradwatch write this file?


class ReportError(Exception):
    """A problem the user can fix: printed without a traceback, exit status 2."""


def html_mark(head: str) -> Mark:
    """The mark of a page that starts with exactly ``head``.

    Example:
        >>> mark = html_mark('<!DOCTYPE html>\\n<meta name="generator" content="gradwatch">\\n')
        >>> mark(b'<!DOCTYPE html>\\n<meta name="generator" content="gradwatch">\\n<p>report')
        True
        >>> mark(b"<p>my notes on gradwatch report</p>")
        False
    """
    prefix = head.encode("utf-8")
    return lambda first: first.startswith(prefix)


def png_mark(keyword: str, text: str) -> Mark:
    """The mark of a PNG file whose first chunk after ``IHDR`` is this exact ``tEXt`` chunk.

    Example:
        >>> mark = png_mark("Software", "gradwatch")
        >>> mark(b"\\x89PNG\\r\\n\\x1a\\n" + bytes(25) + b"\\x00\\x00\\x00\\x12tEXtSoftware")
        False
    """
    data = keyword.encode("latin-1") + b"\0" + text.encode("latin-1")
    chunk = struct.pack(">I", len(data)) + b"tEXt" + data
    chunk += struct.pack(">I", zlib.crc32(b"tEXt" + data))
    end = _PNG_FIRST_CHUNK + len(chunk)
    return lambda first: (
        first.startswith(_PNG_SIGNATURE)
        and first[12:16] == b"IHDR"
        and first[_PNG_FIRST_CHUNK:end] == chunk
    )


def check_output(path: Path, mark: Mark, argument: str, *, force: bool = False) -> Path:
    """Where a report for ``path`` may be written; :class:`ReportError` when it may not.

    Refused without ``force``: an existing file without gradwatch's ``mark``, and any symbolic
    link. With ``force``, the file a link points to is returned. Always refused: a directory, a
    device or a pipe, and a path below a file that is not a directory.
    """
    try:
        if path.is_symlink():
            target = Path(os.path.realpath(path))
            if not force:
                raise ReportError(
                    f"{argument}: {path} is a symbolic link (to {target}); refusing to write "
                    f"through it. Choose another path, or pass --force to write to {target}."
                )
            path = target
        if path.is_dir():
            raise ReportError(f"{argument} must be a file path, not a directory. Received: {path}")
        if path.exists() and not path.is_file():  # a device or a pipe: never replaced
            raise ReportError(f"{argument} must be a regular file. Received: {path}")
        if path.exists() and not force:
            with path.open("rb") as existing:
                first = existing.read(4096)
            if not mark(first):
                raise ReportError(
                    f"{argument}: {path} exists and was not written by gradwatch; refusing to "
                    "replace it. Choose another path, or pass --force to replace it."
                )
        blocker = _file_above(path)
    except OSError as error:
        raise ReportError(f"{argument}: cannot write {path}: {_reason(error)}") from error
    if blocker is not None:
        raise ReportError(f"{argument}: cannot write {path}: {blocker} is not a directory")
    return path


def write_safely(
    path: Path, data: bytes, mark: Mark, argument: str, *, force: bool = False
) -> Path:
    """Write ``data`` to ``path`` atomically (a temporary file, then a rename); return the file.

    ``path`` is checked with :func:`check_output` first. Every failure, a refusal or an error of
    the operating system (a read-only directory, a full disk), raises :class:`ReportError`
    naming ``argument``, the path and the reason.
    """
    path = check_output(path, mark, argument, force=force)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        mode = path.stat().st_mode & 0o777 if path.exists() else 0o666 & ~_umask()
        descriptor, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    except OSError as error:
        raise ReportError(f"{argument}: cannot write {path}: {_reason(error)}") from error
    try:
        with os.fdopen(descriptor, "wb") as file:
            file.write(data)
        os.chmod(temporary, mode)  # mkstemp's file is private; a report is an ordinary file
        os.replace(temporary, path)
    except OSError as error:
        Path(temporary).unlink(missing_ok=True)
        raise ReportError(f"{argument}: cannot write {path}: {_reason(error)}") from error
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


def _file_above(path: Path) -> Path | None:
    """The nearest existing parent of ``path`` when it is not a directory."""
    for parent in path.parents:
        if parent.exists():
            return None if parent.is_dir() else parent
    return None


def _reason(error: OSError) -> str:
    """``permission denied``, ``read-only file system``: the operating system's words."""
    return error.strerror.lower() if error.strerror else str(error)


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current
