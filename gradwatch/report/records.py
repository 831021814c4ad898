"""The intact events of an event file, and a count of the damaged records skipped.

An event file is a sequence of TFRecords: a little-endian ``uint64`` length, the masked CRC32C
of those 8 bytes, the serialized event, and the masked CRC32C of the event. TensorBoard's reader
(``RawEventFileLoader``) stops at the first record that fails a check or is cut short, and says
nothing: for TensorBoard that is a record still being written. A report reads finished files, so
:class:`EventFile` notes where TensorBoard's reader stopped, skips the damaged record (to the
end its intact length gives, else to the next place where a valid length header starts), and
reads on from there with TensorBoard's reader again.
"""

from __future__ import annotations

import contextlib
import shutil
import struct
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from tensorboard.compat.proto.event_pb2 import Event

__all__ = ["EventFile", "next_header"]

_HEADER = 12  # the length and its CRC
_FRAMING = 16  # the header and the data's CRC
_BLOCK = 1 << 20  # bytes searched at once for the next header
_MASK_DELTA = 0xA282EAD8


def _crc_table() -> np.ndarray:
    table = np.arange(256, dtype=np.uint32)
    for _ in range(8):
        table = np.where(table & 1, (table >> 1) ^ np.uint32(0x82F63B78), table >> 1)
    return table.astype(np.uint32)


_TABLE = _crc_table()


class EventFile:
    """One event file read record by record; ``damaged`` counts the records skipped.

    Args:
        path: The event file.

    Attributes:
        intact: Events read so far.
        damaged: Damaged or truncated records skipped so far (a run of bytes without any valid
            record header counts as one).
        damaged_bytes: Their bytes.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.intact = 0
        self.damaged = 0
        self.damaged_bytes = 0

    def damage(self) -> str:
        """What was lost: the records skipped and the events read.

        Example:
            >>> file = EventFile(Path("run/events.out.tfevents.1"))
            >>> file.damaged, file.damaged_bytes, file.intact = 1, 69, 40
            >>> print(file.damage())  # doctest: +NORMALIZE_WHITESPACE
            run/events.out.tfevents.1: skipped 1 damaged or truncated record (69 bytes); read 40
            intact ones.
        """
        records = "record" if self.damaged == 1 else "records"
        return (
            f"{self.path}: skipped {self.damaged} damaged or truncated {records} "
            f"({self.damaged_bytes} bytes); read {self.intact} intact ones."
        )

    def events(self, progress: Callable[[int], None] | None = None) -> Iterator[Event]:
        """Every intact ``Event`` proto in file order; ``progress`` gets the bytes read."""
        from google.protobuf.message import DecodeError
        from tensorboard.backend.event_processing.event_file_loader import RawEventFileLoader
        from tensorboard.compat.proto import event_pb2

        size = self.path.stat().st_size
        offset, source, scratch = 0, self.path, None
        with contextlib.ExitStack() as cleanup:
            while offset < size:
                for record in RawEventFileLoader(str(source)).Load():
                    offset += len(record) + _FRAMING
                    if progress is not None:
                        progress(len(record) + _FRAMING)
                    try:
                        event = event_pb2.Event.FromString(record)
                    except DecodeError:  # intact framing around bytes that are no event
                        self.damaged += 1
                        self.damaged_bytes += len(record) + _FRAMING
                        continue
                    self.intact += 1
                    yield event
                if offset >= size:
                    break
                end = self._skip(offset, size)
                self.damaged += 1
                self.damaged_bytes += end - offset
                if progress is not None:
                    progress(end - offset)
                offset = end
                if offset < size:  # TensorBoard's reader starts at 0: read a copy of the rest
                    if scratch is None:
                        scratch = Path(cleanup.enter_context(tempfile.TemporaryDirectory()))
                    source = scratch / f"from-{offset}"
                    self._copy_from(offset, source)

    def _skip(self, offset: int, size: int) -> int:
        """Where the next record may start, after the damaged one at ``offset``."""
        with self.path.open("rb") as file:
            file.seek(offset)
            header = file.read(_HEADER)
            if len(header) == _HEADER and _valid_header(header):
                (length,) = struct.unpack("<Q", header[:8])
                return min(offset + _FRAMING + length, size)  # the data is damaged, or cut short
            found = next_header(file, offset + 1, size)
        return size if found is None else found

    def _copy_from(self, offset: int, destination: Path) -> None:
        with self.path.open("rb") as file, destination.open("wb") as rest:
            file.seek(offset)
            shutil.copyfileobj(file, rest)


def _valid_header(header: bytes) -> bool:
    return bool(_header_hits(np.frombuffer(header, dtype=np.uint8)).size)


def _header_hits(data: np.ndarray) -> np.ndarray:
    """Offsets in ``data`` where 8 bytes are followed by their masked CRC32C."""
    n = len(data) - _HEADER + 1
    if n <= 0:
        return np.zeros(0, dtype=np.int64)
    crc = np.full(n, 0xFFFFFFFF, dtype=np.uint32)
    for k in range(8):
        crc = _TABLE[(crc ^ data[k : k + n]) & 0xFF] ^ (crc >> 8)
    crc ^= np.uint32(0xFFFFFFFF)
    masked = ((crc >> 15) | (crc << 17)) + np.uint32(_MASK_DELTA)
    stored = data[8 : 8 + n].astype(np.uint32)
    for k in range(1, 4):
        stored |= data[8 + k : 8 + k + n].astype(np.uint32) << (8 * k)
    return np.flatnonzero(masked == stored)


def next_header(file, start: int, size: int) -> int | None:
    """The first offset from ``start`` of a valid record header whose record fits the file.

    Example:
        >>> import io
        >>> from gradwatch.sinks.tensorboard import _masked_crc32c
        >>> length = struct.pack("<Q", 3)
        >>> record = length + struct.pack("<I", _masked_crc32c(length)) + b"abc" + bytes(4)
        >>> data = b"garbage" + record
        >>> next_header(io.BytesIO(data), 0, len(data))
        7
    """
    position = start
    while position + _HEADER <= size:
        file.seek(position)
        block = np.frombuffer(file.read(_BLOCK + _HEADER - 1), dtype=np.uint8)
        for hit in _header_hits(block):
            (length,) = struct.unpack("<Q", block[hit : hit + 8].tobytes())
            if position + int(hit) + _FRAMING + length <= size:
                return position + int(hit)
        position += _BLOCK
    return None
