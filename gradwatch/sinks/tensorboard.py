"""A sink that writes TensorBoard event files without importing TensorFlow.

Events are built from the protobufs that ship with the ``tensorboard`` package and framed as
TFRecords: a little-endian ``uint64`` length, the masked CRC32C of those eight bytes, the
serialized event, and the masked CRC32C of the event.
"""

from __future__ import annotations

import itertools
import numbers
import os
import socket
import struct
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import BinaryIO

import google_crc32c
from tensorboard.compat.proto import (
    event_pb2,
    summary_pb2,
    tensor_pb2,
    tensor_shape_pb2,
    types_pb2,
)
from tensorboard.plugins.custom_scalar import layout_pb2

from gradwatch import tags
from gradwatch.dashboard import Layout
from gradwatch.record import Histogram, Image, Record

__all__ = ["TensorBoardSink"]

_FILE_VERSION = "brain.Event:2"
_TEXT_PLUGIN = "text"
_CUSTOM_SCALARS_PLUGIN = "custom_scalars"
_RGBA = 4  # colour space of matplotlib's PNGs
_LENGTH = struct.Struct("<Q")
_CRC = struct.Struct("<I")
_MASK_DELTA = 0xA282EAD8
_U32 = 0xFFFFFFFF
_file_counter = itertools.count()  # process-wide: unique names within one second and process


class TensorBoardSink:
    """Write each record as one TensorBoard event, in an event file created at the first write.

    Every write reaches the operating system before ``write`` returns, so a crash of the
    process loses nothing written before it.

    Args:
        log_dir: Directory of the event file; created if missing.

    Example:
        >>> import tempfile
        >>> with TensorBoardSink(tempfile.mkdtemp()) as sink:
        ...     sink.write(Record(step=1, scalars={"loss": 0.5}))
        ...     "tfevents" in sink.path.name
        True
    """

    def __init__(self, log_dir: str | os.PathLike[str]) -> None:
        self._log_dir = Path(log_dir)
        _check_writable(self._log_dir)
        self._path: Path | None = None
        self._file: BinaryIO | None = None
        self._closed = False

    @property
    def log_dir(self) -> Path:
        """The directory the event file is written to."""
        return self._log_dir

    @property
    def path(self) -> Path | None:
        """The event file, or ``None`` until the first non-empty record is written."""
        return self._path

    def write(self, record: Record) -> None:
        """Append ``record`` as one event with ``step=record.step``; an empty record writes nothing.

        Raises:
            RuntimeError: If the sink is closed.
            TypeError: If a scalar is not a real number.
        """
        self._check_open()
        if not record:
            return
        summary = _summary(record)  # validates before any file is created
        file = self._file or self._create()
        event = event_pb2.Event(wall_time=time.time(), step=record.step, summary=summary)
        file.write(_frame(event))
        # Flushed here rather than through tensorboard's EventFileWriter, which queues events for
        # a background thread: a run that dies keeps every step logged before it.
        file.flush()

    def flush(self) -> None:
        """Hand buffered data to the operating system (``write`` already does)."""
        if self._file is not None:
            self._file.flush()

    def close(self) -> None:
        """Close the event file; closing again does nothing."""
        self._closed = True
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> TensorBoardSink:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self._log_dir)!r})"

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"{self!r} is closed; create a new sink to write more records.")

    def _create(self) -> BinaryIO:
        """Create the event file and start it with the file-version event."""
        self._log_dir.mkdir(parents=True, exist_ok=True)
        self._path = self._log_dir / _file_name()
        self._file = self._path.open("xb")  # "x": never append to another writer's file
        self._file.write(_frame(event_pb2.Event(wall_time=time.time(), file_version=_FILE_VERSION)))
        return self._file


def _check_writable(directory: Path) -> None:
    """Create ``directory`` and make sure a file can be created in it, now rather than at the
    first logging step; raise ``OSError`` naming it otherwise."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=directory):
            pass
    except OSError as error:
        reason = error.strerror or type(error).__name__
        raise OSError(
            f"gradwatch cannot write its event files to {str(directory)!r}: {reason}."
            " Pass a writable folder as `log_dir`."
        ) from None


def _file_name() -> str:
    """Return a new event file name, unique per host, process and sink."""
    return (
        f"events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}"
        f".{os.getpid()}.{next(_file_counter)}.gradwatch"
    )


def _frame(event: event_pb2.Event) -> bytes:
    """Serialize ``event`` as one TFRecord."""
    data = event.SerializeToString()
    length = _LENGTH.pack(len(data))
    return length + _CRC.pack(_masked_crc32c(length)) + data + _CRC.pack(_masked_crc32c(data))


def _masked_crc32c(data: bytes) -> int:
    """Return the masked CRC32C of ``data`` that TFRecords store.

    Example:
        >>> hex(google_crc32c.value(b"123456789"))  # the standard check value of CRC-32C
        '0xe3069283'
        >>> hex(_masked_crc32c(b"123456789"))
        '0xc78ab0e5'
    """
    crc = google_crc32c.value(data)
    return (((crc >> 15) | (crc << 17)) + _MASK_DELTA) & _U32


def _summary(record: Record) -> summary_pb2.Summary:
    """Return one summary holding every scalar, histogram, text and image of ``record``."""
    values = [_scalar_value(tag, value) for tag, value in record.scalars.items()]
    values += [_histogram_value(tag, histogram) for tag, histogram in record.histograms.items()]
    values += [_text_value(tag, text) for tag, text in record.texts.items()]
    values += [_image_value(tag, image) for tag, image in record.images.items()]
    if record.layout is not None:
        values.append(_layout_value(record.layout))
    return summary_pb2.Summary(value=values)


def _scalar_value(tag: str, value: float) -> summary_pb2.Summary.Value:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(
            f"Scalars must be real numbers (int or float; NaN and inf are allowed). "
            f"Received: {tag}={value!r} of type {type(value).__name__}."
        )
    return summary_pb2.Summary.Value(tag=tag, simple_value=float(value))


def _histogram_value(tag: str, histogram: Histogram) -> summary_pb2.Summary.Value:
    proto = summary_pb2.HistogramProto(
        min=histogram.min,
        max=histogram.max,
        num=histogram.num,
        sum=histogram.sum,
        sum_squares=histogram.sum_squares,
        bucket_limit=histogram.bucket_limits,
        bucket=histogram.counts,
    )
    return summary_pb2.Summary.Value(tag=tag, histo=proto)


def _string_value(tag: str, plugin: str, data: bytes) -> summary_pb2.Summary.Value:
    """A scalar string tensor owned by ``plugin``."""
    metadata = summary_pb2.SummaryMetadata(
        plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name=plugin)
    )
    tensor = tensor_pb2.TensorProto(
        dtype=types_pb2.DT_STRING,
        string_val=[data],
        tensor_shape=tensor_shape_pb2.TensorShapeProto(),  # no dimensions: a scalar
    )
    return summary_pb2.Summary.Value(tag=tag, metadata=metadata, tensor=tensor)


def _text_value(tag: str, text: str) -> summary_pb2.Summary.Value:
    """Text that TensorBoard's text dashboard renders as Markdown (tables included)."""
    if not isinstance(text, str):
        raise TypeError(
            f"Texts must be str. Received: {tag}={text!r} of type {type(text).__name__}."
        )
    return _string_value(tag, _TEXT_PLUGIN, text.encode("utf-8"))


def _image_value(tag: str, image: Image) -> summary_pb2.Summary.Value:
    """A PNG as an image summary, which TensorBoard's images dashboard shows."""
    if not isinstance(image, Image):
        raise TypeError(
            f"Images must be gradwatch.record.Image (see Image.from_png). Received: {tag}="
            f"{type(image).__name__}."
        )
    proto = summary_pb2.Summary.Image(
        height=image.height,
        width=image.width,
        colorspace=_RGBA,
        encoded_image_string=image.png,
    )
    return summary_pb2.Summary.Value(tag=tag, image=proto)


def _layout_value(layout: Layout) -> summary_pb2.Summary.Value:
    """The Custom Scalars layout, under the one tag its plugin reads."""
    proto = layout_pb2.Layout(
        category=[
            layout_pb2.Category(
                title=category.title,
                chart=[
                    layout_pb2.Chart(
                        title=chart.title,
                        multiline=layout_pb2.MultilineChartContent(tag=list(chart.tags)),
                    )
                    for chart in category.charts
                ],
                closed=category.closed,
            )
            for category in layout.categories
        ]
    )
    return _string_value(tags.LAYOUT, _CUSTOM_SCALARS_PLUGIN, proto.SerializeToString())
