"""Read gradwatch's data back from TensorBoard event files, with TensorBoard's own reader.

Events are streamed with ``tensorboard``'s ``RawEventFileLoader`` (the reader under its
``EventAccumulator``, without the conversion of scalars to tensors) rather than with the
accumulator itself, for three reasons: progress can be reported within a large file, the tags
of a step come in the order gradwatch wrote them, which is the depth order of the groups, and
a damaged record is skipped and counted instead of silently ending the file (see
:mod:`gradwatch.report.records`). Where TensorFlow is installed, TensorBoard's reader imports it
first, which is slow.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from gradwatch import tags
from gradwatch.pictures.history import FlowHistory
from gradwatch.report.records import EventFile
from gradwatch.reporting import plain_text

__all__ = ["Run", "event_files", "parse_events", "read_runs"]

_TOTAL_PREFIX = f"{tags.TOTAL}/"
_CLIP_PREFIX = f"{tags.CLIP}/"
_ROW = re.compile(
    r"^\|\s*(?P<step>-?\d+)\s*\|\s*(?P<kind>\w+)\s*\|"
    r"\s*(?:<code>(?P<code>[^|<]*)</code>|`?(?P<group>[^|`]*?)`?)\s*\|"
    r"\s*(?P<value>[^|]+?)\s*\|\s*(?P<threshold>[^|]+?)\s*\|\s*(?P<action>\w+)\s*\|$"
)

Progress = Callable[[int], None]  # called with the number of bytes just read


@dataclass
class Run:
    """What one run directory holds: its flow history, whole-model series and detections."""

    name: str
    history: FlowHistory = field(default_factory=lambda: FlowHistory(max_columns=4096))
    series: dict[str, dict[int, float]] = field(default_factory=dict)  # tag -> step -> value
    events: list[dict] = field(default_factory=list)
    stopped: str | None = None  # "stopped at step N: cause" when gradwatch stopped the run
    damaged: list[EventFile] = field(default_factory=list)  # files with records skipped

    def steps_and_values(self, tag: str) -> tuple[np.ndarray, np.ndarray]:
        """A whole-model series in step order (a step logged twice keeps its last value)."""
        points = sorted(self.series.get(tag, {}).items())
        return np.array([s for s, _ in points], dtype=np.int64), np.array([v for _, v in points])


def event_files(log_dir: Path) -> list[Path]:
    """Every TensorBoard event file below ``log_dir``, in name (creation time) order per run."""
    found = [p for p in log_dir.rglob("*tfevents*") if p.is_file()]
    return sorted(found, key=lambda p: (str(p.parent), p.name))


def read_runs(log_dir: Path, progress: Progress | None = None) -> list[Run]:
    """Runs below ``log_dir`` that hold gradwatch data: one per directory of event files, or,
    where several gradwatch sinks wrote into one directory (two processes, two fits), one per
    sink.

    A damaged or truncated record is skipped; each run lists its files with skipped records in
    ``Run.damaged``.
    """
    runs: dict[tuple[Path, str], Run] = {}
    paths = event_files(log_dir)
    writers: dict[Path, set[str]] = {}
    for path in paths:
        writers.setdefault(path.parent, set()).add(_writer(path))
    for path in paths:
        name = os.path.relpath(path.parent, log_dir)
        name = path.parent.name if name == os.curdir else name
        writer = _writer(path) if len(writers[path.parent] - {""}) > 1 else ""
        if writer:  # several gradwatch sinks wrote here: a run each
            name = f"{name} ({writer})"
        run = runs.setdefault((path.parent, writer), Run(name))
        file = EventFile(path)
        for event in file.events(progress):
            if event.HasField("summary"):
                _add(run, event.step, event.summary)
        if file.damaged:
            run.damaged.append(file)
    return [run for run in runs.values() if len(run.history)]


def _writer(path: Path) -> str:
    """Which gradwatch sink wrote an event file: ``host pid P #N`` from the name it gave it
    (``events.out.tfevents.<time>.<host>.<pid>.<N>.gradwatch``); "" for other writers' files.

    Example:
        >>> _writer(Path("events.out.tfevents.0001.box.42.3.gradwatch"))
        'box pid 42 #3'
    """
    parts = path.name.split(".")
    if len(parts) < 7 or parts[-1] != "gradwatch":
        return ""
    host = ".".join(parts[4:-3])
    return f"{host} pid {parts[-3]} #{parts[-2]}"


def _add(run: Run, step: int, summary) -> None:
    scalars = {}
    for value in summary.value:
        kind = value.WhichOneof("value")
        if kind == "simple_value":
            scalars[value.tag] = value.simple_value
            if value.tag.startswith((_TOTAL_PREFIX, _CLIP_PREFIX)):
                run.series.setdefault(value.tag, {})[step] = value.simple_value
        elif kind == "tensor" and value.tag == tags.EVENTS and value.tensor.string_val:
            run.events.extend(parse_events(value.tensor.string_val[0].decode("utf-8")))
        elif kind == "tensor" and value.tag == tags.STOPPED and value.tensor.string_val:
            run.stopped = plain_text(value.tensor.string_val[0].decode("utf-8"))
    run.history.add(step, scalars)


def parse_events(markdown: str) -> Iterator[dict]:
    """The detections in a ``gradwatch/events`` Markdown table (see ``events_markdown``);
    tables written before group names were escaped (in backticks) are read too.

    Example:
        >>> text = "| step | kind |\\n| --- |\\n| 7 | explosion | `global` | 12 | 3 | warn |"
        >>> list(parse_events(text))  # doctest: +NORMALIZE_WHITESPACE
        [{'step': 7, 'kind': 'explosion', 'group': 'global', 'value': 12.0, 'threshold': 3.0,
          'action': 'warn'}]
    """
    for line in markdown.splitlines():
        match = _ROW.match(line.strip())
        if match:
            row = match.groupdict()
            yield {
                "step": int(row["step"]),
                "kind": row["kind"],
                "group": row["group"] if row["code"] is None else plain_text(row["code"]),
                "value": float(row["value"]),
                "threshold": float(row["threshold"]),
                "action": row["action"],
            }
