"""The host side of a watched run: detections told once, records written, the stop marked.

Every adapter hands its finished records and drained detections to one :class:`Reporter`:

* each batch of detections reaches the console as one line (a :class:`GradWatchWarning`),
  the whole gradient's findings first; every detection is kept in a TensorBoard text table;
* a stop is one short line naming its cause, and a ``gradwatch/stopped`` text that TensorBoard
  and ``gradwatch report`` show;
* the events kept in memory are bounded (the most recent ``keep``), their counts are not.
"""

from __future__ import annotations

import re
import warnings
from collections import Counter, deque
from collections.abc import Callable, Iterable, Sequence

from gradwatch import tags
from gradwatch.dashboard import Layout
from gradwatch.guard import GLOBAL, sort_events
from gradwatch.pictures import FlowPictures
from gradwatch.record import Record, Sink
from gradwatch.signal import DEAD_UNITS, SATURATION
from gradwatch.sinks.fanout import Fanout

__all__ = [
    "GradWatchWarning",
    "Reporter",
    "describe",
    "events_markdown",
    "markdown_text",
    "plain_text",
    "stop_text",
    "summary_line",
]

_LISTED = 3  # groups named in a console line; the text table has them all


class GradWatchWarning(UserWarning):
    """A detection (non-finite, exploding or vanishing gradients), or a configuration clash."""


class Reporter:
    """Reports detections once, writes records through a :class:`Fanout`, and marks a stop.

    Args:
        fanout: where records go (no sinks: nothing is written, events are still kept).
        keep: how many of the most recent events :attr:`events` keeps.
    """

    def __init__(self, fanout: Fanout, keep: int = 1000) -> None:
        self.fanout = fanout
        self._events: deque[dict] = deque(maxlen=keep)
        self.counts: Counter[tuple[str, str]] = Counter()  # (kind, action) -> events, in all
        self.stopped_at: int | None = None
        self.stop_cause: dict | None = None
        self._stop_written = False

    @classmethod
    def open(
        cls, sinks: Sequence[Sink], layout: Layout | Callable[[], Layout], pictures: bool
    ) -> Reporter:
        """A reporter writing to ``sinks``, the Custom Scalars ``layout`` once (or a function
        making it at the first record) and, with ``pictures``, the gradient-flow images."""
        return cls(Fanout(sinks, pictures=FlowPictures(images=pictures, layout=layout)))

    @property
    def events(self) -> list[dict]:
        """The most recent detections, oldest first."""
        return list(self._events)

    def stop_at(self, step: int | None) -> None:
        """Remember the step a ``"stop"`` action dropped (its record is the stop's)."""
        if self.stopped_at is None:
            self.stopped_at = step

    def publish(self, records: Iterable[Record], stopped_at: int | None = None) -> None:
        """Write an engine's finished records; the one of the step a ``"stop"`` action
        dropped (``stopped_at``, or one given to :meth:`stop_at`) as the stop."""
        self.stop_at(stopped_at)
        for record in records:
            if any(e["action"] == "stop" for e in record.events):  # a signal alarm's, say
                self.stop_at(record.step)
            if record.step == self.stopped_at and not self._stop_written:
                self.stop(record)
            else:
                self.write(record)

    def write(self, record: Record) -> None:
        """Tell the record's detections (``record.events``) in one line, and write it."""
        events = self._keep(record)
        if events:
            warnings.warn(summary_line(events), GradWatchWarning, stacklevel=3)
        self.fanout.write(record)

    def stop(self, record: Record) -> None:
        """Write the stop step's record with its detections, and say once why training stops."""
        events = self._keep(record)
        stops = [e for e in events if e["action"] == "stop"]
        self.stopped_at, self._stop_written = record.step, True
        self.stop_cause = stops[0] if stops else None
        text = stop_text(record.step, self.stop_cause)
        record.texts[tags.STOPPED] = markdown_text(text)
        warnings.warn(f"gradwatch: {text}", GradWatchWarning, stacklevel=3)
        self.fanout.write(record)

    def close(self, last: Iterable[Record] = ()) -> None:
        """Write the records of the run's last steps (see ``TorchEngine.finish``), then close
        the sinks, also when writing fails."""
        try:
            for record in last:
                if record or record.events:
                    self.write(record)
        finally:
            self.fanout.close()

    @property
    def closed(self) -> bool:
        return self.fanout.closed

    def _keep(self, record: Record) -> list[dict]:
        events = sort_events(record.events)
        if events:
            record.events = events
            record.texts[tags.EVENTS] = events_markdown(events)
            self._events.extend(events)
            self.counts.update((e["kind"], e["action"]) for e in events)
        return events


def describe(event: dict) -> str:
    """One detection in words.

    Example:
        >>> describe({"step": 7, "kind": "explosion", "group": "global", "value": 412.0,
        ...           "threshold": 31.5, "action": "skip"})
        'explosion at step 7: global gradient norm 412 > 31.5 (step skipped)'
        >>> describe({"step": 3, "kind": "nonfinite", "group": "fc", "value": float("nan"),
        ...           "threshold": float("inf"), "action": "warn", "count": 1})
        '1 non-finite value (NaN/Inf) in fc at step 3'
    """
    whole = event["group"] == GLOBAL
    subject = "global gradient norm" if whole else f"gradient norm of {event['group']}"
    value, bound, step = event["value"], event["threshold"], event["step"]
    done = {"skip": " (step skipped)", "stop": " (step dropped, training stopped)"}
    if event["action"] == "accepted":
        return (
            f"new level at step {step}: the {subject} stayed above its explosion bound;"
            f" {value:.3g} is now taken as normal"
        )
    if event["kind"] in (DEAD_UNITS, SATURATION):
        what = "exactly zero" if event["kind"] == DEAD_UNITS else "at the activation's bounds"
        text = (
            f"{event['kind'].replace('_', ' ')} in {event['group']} until step {step}:"
            f" {value:.0%} of its outputs {what} (more than {bound:.0%}) for several"
            " logging steps"
        )
        return text + (" (training stopped)" if event["action"] == "stop" else "")
    if event["kind"] == "nonfinite":
        where = "the gradient" if whole else event["group"]
        many = f"{event['count']} " if "count" in event else ""
        noun = "value" if event.get("count") == 1 else "values"
        text = f"{many}non-finite {noun} (NaN/Inf) in {where} at step {step}"
    elif event["kind"] == "explosion":
        text = f"explosion at step {step}: {subject} {value:.3g} > {bound:.3g}"
    else:
        text = f"vanishing gradient until step {step}: {subject} {value:.3g} < {bound:.3g}"
    return text + done.get(event["action"], "")


def summary_line(events: list[dict]) -> str:
    """The console line for a batch of detections: the whole gradient's findings in full (with
    the groups that share them), then the other groups' findings of each kind, a few named.

    Example:
        >>> found = [
        ...     {"step": 5, "kind": "nonfinite", "group": "global", "value": float("nan"),
        ...      "threshold": float("inf"), "action": "skip"},
        ...     {"step": 5, "kind": "nonfinite", "group": "net.2", "value": float("nan"),
        ...      "threshold": float("inf"), "action": "warn"},
        ... ]
        >>> summary_line(found)
        'gradwatch: non-finite values (NaN/Inf) in the gradient at step 5 (step skipped), in net.2'
    """
    others: dict[str, list[dict]] = {}
    for event in events:
        if event["group"] != GLOBAL:
            others.setdefault(event["kind"], []).append(event)
    parts = []
    for event in (e for e in events if e["group"] == GLOBAL):
        shared = [e for e in others.get(event["kind"], []) if e["step"] == event["step"]]
        others[event["kind"]] = [e for e in others.get(event["kind"], []) if e not in shared]
        text = describe(event)
        if shared and event["action"] != "accepted":
            text += f", in {_names(shared)}"
        parts.append(text)
    for kind, found in others.items():
        if len(found) == 1:
            parts.append(describe(found[0]))
        elif found:
            first = min(e["step"] for e in found)
            parts.append(f"{kind} in {len(found)} groups from step {first}: {_names(found)}")
    return "gradwatch: " + "; ".join(parts)


def _names(events: list[dict]) -> str:
    names = ", ".join(
        e["group"] + (f" ({e['count']})" if "count" in e else "") for e in events[:_LISTED]
    )
    return names + (f" and {len(events) - _LISTED} more" if len(events) > _LISTED else "")


def stop_text(step: int, cause: dict | None) -> str:
    """What ``gradwatch/stopped`` says.

    Example:
        >>> stop_text(45, {"step": 45, "kind": "explosion", "group": "global", "value": 9e3,
        ...                "threshold": 12.0, "action": "stop"})[:60]
        'stopped at step 45: explosion at step 45: global gradient no'
    """
    return f"stopped at step {step}: {describe(cause) if cause else 'a stop action fired'}"


def markdown_text(text: str) -> str:
    """``text`` as Markdown that TensorBoard's text dashboard shows as it is, never as markup.

    The dashboard renders Markdown (Python-Markdown, with tables) and lets through the HTML
    its sanitizer allows (links, images, tables), so a group name could break a table or show
    an image. Every character but letters, digits and ``" .,:;/-=%"`` becomes a numeric
    character reference (``&#96;`` for a backtick), which Markdown passes on and the browser
    shows as that character; :func:`plain_text` reverses it.

    Example:
        >>> markdown_text("blocks.0 `x` <b>|</b>")
        'blocks.0 &#96;x&#96; &#60;b&#62;&#124;&#60;/b&#62;'
    """
    return "".join(c if c.isalnum() or c in _PLAIN else f"&#{ord(c)};" for c in text)


_PLAIN = frozenset(" .,:;/-=%")
_REFERENCE = re.compile(r"&#(\d+);")
_LAST_CODE_POINT = 0x10FFFF


def plain_text(markdown: str) -> str:
    """The text :func:`markdown_text` made ``markdown`` from (other text comes back as it is).

    Example:
        >>> plain_text(markdown_text("a`b <i>"))
        'a`b <i>'
    """
    return _REFERENCE.sub(_character, markdown)


def _character(reference: re.Match) -> str:
    code = int(reference[1])
    return chr(code) if code <= _LAST_CODE_POINT else reference[0]


def events_markdown(events: list[dict]) -> str:
    """Detections as a Markdown table (TensorBoard's text dashboard renders it); group names
    are shown as code, escaped by :func:`markdown_text`."""
    lines = [
        "| step | kind | group | value | threshold | action |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    lines += [
        f"| {e['step']} | {e['kind']} | <code>{markdown_text(e['group'])}</code>"
        f" | {e['value']:.4g} | {e['threshold']:.4g} | {e['action']} |"
        for e in events
    ]
    return "\n".join(lines)
