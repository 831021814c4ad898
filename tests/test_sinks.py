"""Sinks: event files read back by TensorBoard's own readers, and the in-memory sink."""

from __future__ import annotations

import doctest
import math
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from tensorboard.backend.event_processing import event_accumulator, event_file_loader
from tensorboard.compat.tensorflow_stub import pywrap_tensorflow as tensorboard_stub

from gradwatch.record import Histogram, Record
from gradwatch.sinks import MemorySink, TensorBoardSink, memory, tensorboard


def _histogram(seed: int, buckets: int = 30) -> Histogram:
    values = np.random.default_rng(seed).normal(size=1000)
    counts, _ = np.histogram(values, bins=buckets, range=(values.min(), values.max()))
    return Histogram.from_counts(
        values.min(), values.max(), counts, values.sum(), np.square(values).sum()
    )


def _records() -> list[Record]:
    return [
        Record(
            step=step,
            scalars={"grad/norm": 1.5 * step, "loss": 1.0 / (step + 1)},
            histograms={"grad/hist": _histogram(step)},
            texts={"note": f"step {step}: ü ∇"},
        )
        for step in (0, 10, 20)
    ]


def _accumulator(path: Path) -> event_accumulator.EventAccumulator:
    guidance = dict.fromkeys(event_accumulator.DEFAULT_SIZE_GUIDANCE, 0)
    accumulator = event_accumulator.EventAccumulator(str(path), size_guidance=guidance)
    accumulator.Reload()
    return accumulator


def _events(path: Path) -> list:
    return list(event_file_loader.EventFileLoader(str(path)).Load())


def _write_all(log_dir: Path, records: list[Record]) -> Path:
    with TensorBoardSink(log_dir) as sink:
        for record in records:
            sink.write(record)
    assert sink.path is not None
    return sink.path


def _run_python(code: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120
    )


# --- TensorBoardSink: contents ------------------------------------------------------------------


def test_scalars_read_back(tmp_path: Path) -> None:
    records = _records()
    accumulator = _accumulator(_write_all(tmp_path, records))

    assert set(accumulator.Tags()["scalars"]) == {"grad/norm", "loss"}
    for tag in ("grad/norm", "loss"):
        events = accumulator.Scalars(tag)
        assert [e.step for e in events] == [r.step for r in records]
        assert [e.value for e in events] == pytest.approx([r.scalars[tag] for r in records])


def test_histograms_read_back(tmp_path: Path) -> None:
    records = _records()
    accumulator = _accumulator(_write_all(tmp_path, records))

    assert accumulator.Tags()["histograms"] == ["grad/hist"]
    events = accumulator.Histograms("grad/hist")
    assert [e.step for e in events] == [r.step for r in records]
    for event, record in zip(events, records, strict=True):
        expected, read = record.histograms["grad/hist"], event.histogram_value
        assert list(read.bucket_limit) == pytest.approx(expected.bucket_limits)
        assert list(read.bucket) == list(expected.counts)
        assert (read.min, read.max, read.num) == (expected.min, expected.max, expected.num)
        assert (read.sum, read.sum_squares) == (expected.sum, expected.sum_squares)


def test_text_read_back(tmp_path: Path) -> None:
    records = _records()
    accumulator = _accumulator(_write_all(tmp_path, records))

    assert accumulator.Tags()["tensors"] == ["note"]
    events = accumulator.Tensors("note")
    assert [e.step for e in events] == [r.step for r in records]
    assert [e.tensor_proto.string_val for e in events] == [
        [r.texts["note"].encode("utf-8")] for r in records
    ]
    assert accumulator.SummaryMetadata("note").plugin_data.plugin_name == "text"


def test_non_finite_scalars_written_as_is(tmp_path: Path) -> None:
    scalars = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf, "np": np.float32(2.5)}
    accumulator = _accumulator(_write_all(tmp_path, [Record(step=1, scalars=scalars)]))

    assert math.isnan(accumulator.Scalars("nan")[0].value)
    assert accumulator.Scalars("inf")[0].value == math.inf
    assert accumulator.Scalars("-inf")[0].value == -math.inf
    assert accumulator.Scalars("np")[0].value == 2.5


def test_one_event_per_write(tmp_path: Path) -> None:
    records = _records()
    events = _events(_write_all(tmp_path, records))

    assert len(events) == 1 + len(records)
    assert events[0].file_version == "brain.Event:2"
    assert events[0].wall_time > 0
    for event, record in zip(events[1:], records, strict=True):
        assert event.step == record.step
        assert event.wall_time >= events[0].wall_time
        assert len(event.summary.value) == 4  # two scalars, one histogram, one text


@pytest.mark.parametrize("value", ["0.5", None, [1.0], np.array([1.0, 2.0]), True, 1 + 2j])
def test_scalar_not_a_real_number_raises(tmp_path: Path, value: object) -> None:
    with TensorBoardSink(tmp_path) as sink:
        with pytest.raises(TypeError, match="bad/tag"):
            sink.write(Record(step=0, scalars={"ok": 1.0, "bad/tag": value}))  # type: ignore[dict-item]
        assert sink.path is None  # validated before the file is created


# --- TensorBoardSink: files ---------------------------------------------------------------------


def test_file_is_created_lazily_and_the_folder_checked_at_once(tmp_path: Path) -> None:
    log_dir = tmp_path / "not" / "yet"
    with TensorBoardSink(log_dir) as sink:
        sink.write(Record(step=0))  # empty: writes nothing
        assert sink.path is None
    assert list(log_dir.iterdir()) == []  # the folder is made (and checked), no file in it
    (tmp_path / "file").write_text("x")
    with pytest.raises(OSError, match=r"cannot write its event files to .*file/below"):
        TensorBoardSink(tmp_path / "file" / "below")


def test_first_write_creates_directory_and_file(tmp_path: Path) -> None:
    log_dir = tmp_path / "runs" / "a"
    with TensorBoardSink(str(log_dir)) as sink:
        assert sink.log_dir == log_dir
        sink.write(Record(step=0, scalars={"loss": 1.0}))
        assert sink.path is not None
        assert sink.path.parent == log_dir
        assert list(log_dir.iterdir()) == [sink.path]


def test_file_name(tmp_path: Path) -> None:
    name = _write_all(tmp_path, _records()).name

    host, pid = re.escape(socket.gethostname()), os.getpid()
    assert re.fullmatch(rf"events\.out\.tfevents\.\d{{10}}\.{host}\.{pid}\.\d+\.gradwatch", name)


def test_two_sinks_in_one_directory(tmp_path: Path) -> None:
    first, second = TensorBoardSink(tmp_path), TensorBoardSink(tmp_path)
    first.write(Record(step=1, scalars={"a": 1.0}))
    second.write(Record(step=2, scalars={"b": 2.0}))
    first.close()
    second.close()

    assert first.path != second.path
    assert len(list(tmp_path.glob("*tfevents*"))) == 2
    assert [e.value for e in _accumulator(first.path).Scalars("a")] == [1.0]
    assert [e.value for e in _accumulator(second.path).Scalars("b")] == [2.0]


def test_records_survive_a_crash(tmp_path: Path) -> None:
    code = (
        "import os, sys\n"
        "from gradwatch.record import Record\n"
        "from gradwatch.sinks import TensorBoardSink\n"
        "sink = TensorBoardSink(sys.argv[1])\n"
        "for step in range(3):\n"
        "    sink.write(Record(step=step, scalars={'loss': step / 2}))\n"
        "print(sink.path, flush=True)\n"
        "os._exit(1)\n"
    )
    result = _run_python(code, str(tmp_path))

    assert result.returncode == 1, result.stderr
    events = _accumulator(Path(result.stdout.strip())).Scalars("loss")
    assert [(e.step, e.value) for e in events] == [(0, 0.0), (1, 0.5), (2, 1.0)]


def test_no_framework_is_imported(tmp_path: Path) -> None:
    code = (
        "import sys\n"
        "from gradwatch.record import Record\n"
        "from gradwatch.sinks import TensorBoardSink\n"
        "with TensorBoardSink(sys.argv[1]) as sink:\n"
        "    sink.write(Record(step=0, scalars={'a': 1.0}, texts={'t': 'x'}))\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'tensorflow', 'torch'}))\n"
    )
    result = _run_python(code, str(tmp_path))

    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


# --- TensorBoardSink: life cycle ----------------------------------------------------------------


def test_write_after_close_raises(tmp_path: Path) -> None:
    sink = TensorBoardSink(tmp_path)
    sink.write(Record(step=0, scalars={"a": 1.0}))
    sink.close()
    sink.close()  # idempotent
    sink.flush()

    with pytest.raises(RuntimeError, match="is closed"):
        sink.write(Record(step=1, scalars={"a": 1.0}))
    assert len(_events(sink.path)) == 2


def test_context_manager_closes_on_exception(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="boom"), TensorBoardSink(tmp_path) as sink:
        sink.write(Record(step=0, scalars={"a": 1.0}))
        raise ValueError("boom")

    with pytest.raises(RuntimeError, match="is closed"):
        sink.write(Record(step=1, scalars={"a": 1.0}))


# --- CRC32C -------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [*range(20), 1000, 4099])
def test_masked_crc32c_matches_tensorboard(size: int) -> None:
    data = np.random.default_rng(size).bytes(size)
    assert tensorboard._masked_crc32c(data) == tensorboard_stub.masked_crc32c(data)


# --- MemorySink ---------------------------------------------------------------------------------


def test_memory_sink_queries() -> None:
    records = _records()
    sink = MemorySink()
    for record in records:
        sink.write(record)
    sink.write(Record(step=99))  # empty: skipped, as by TensorBoardSink

    assert sink.records == records
    assert sink.tags() == {"grad/norm", "loss", "grad/hist", "note"}
    assert sink.scalars("grad/norm") == [(0, 0.0), (10, 15.0), (20, 30.0)]
    assert sink.histograms("grad/hist") == [(r.step, r.histograms["grad/hist"]) for r in records]
    assert sink.texts("note") == [(r.step, r.texts["note"]) for r in records]
    assert sink.scalars("missing") == []


def test_memory_sink_keeps_a_copy() -> None:
    record = Record(step=0, scalars={"a": 1.0})
    sink = MemorySink()
    sink.write(record)
    record.scalars["a"] = 2.0

    assert sink.scalars("a") == [(0, 1.0)]


def test_memory_sink_closed() -> None:
    with MemorySink() as sink:
        sink.write(Record(step=0, scalars={"a": 1.0}))
    sink.close()  # idempotent
    sink.flush()

    with pytest.raises(RuntimeError, match="is closed"):
        sink.write(Record(step=1, scalars={"a": 1.0}))
    assert sink.scalars("a") == [(0, 1.0)]


# --- Docstring examples -------------------------------------------------------------------------


@pytest.mark.parametrize("module", [memory, tensorboard])
def test_docstring_examples(module) -> None:
    result = doctest.testmod(module)
    assert result.attempted > 0
    assert result.failed == 0
