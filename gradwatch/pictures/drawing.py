"""Gradient-flow pictures and the Custom Scalars layout, added to the records an adapter writes.

Every adapter builds the same records, so one :class:`FlowPictures` in the fan-out of sinks gives
Lightning, Keras and plain loops the same pictures::

    fanout = Fanout(sinks, pictures=FlowPictures(images=histogram_every_n_steps > 0))

Drawing the pictures with matplotlib takes far longer than a training step, so by default they
are drawn by one background thread (matplotlib's object-oriented API on the Agg canvas, never
pyplot) from a snapshot of the history; the fan-out writes them, from its own thread, at a
later write or at close.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import importlib.util
import warnings
from collections.abc import Callable

from gradwatch import tags
from gradwatch.checks import check_flag
from gradwatch.dashboard import Layout
from gradwatch.pictures._figure import png_bytes
from gradwatch.pictures.heatmap import heatmap
from gradwatch.pictures.history import BACKWARD, FlowHistory, FlowMatrix
from gradwatch.pictures.profile import depth_profile, signal_profile
from gradwatch.record import Image, Record

__all__ = ["FlowPictures"]

_NO_MATPLOTLIB = (
    "gradwatch draws its gradient-flow images with matplotlib, which is not installed; "
    "histograms are still written. Install it with: pip install 'gradwatch[report]'"
)
_MAX_PENDING = 2  # pictures the worker may be behind by; one more waits for the oldest
FINISH_TIMEOUT_S = 120.0  # how long closing waits for pictures still being drawn


class FlowPictures:
    """Remember each logging step's per-group norms; draw the pictures at the histogram cadence.

    At a record holding histograms, the heatmap (every logged step so far) and the depth
    profile (the last logged step) are drawn. With ``background=True`` (the default) a worker
    thread draws them and :meth:`ready` / :meth:`finish` return them later as records of their
    own, at that record's step (a :class:`~gradwatch.sinks.fanout.Fanout` writes those); with
    ``background=False`` they are added to the record itself. The first record holding scalars
    gets the Custom Scalars ``layout``. Records passed in are not changed: a copy is returned.

    Args:
        images: draw the images (needs matplotlib: without it, a warning and no images).
        layout: the Custom Scalars layout to write once (see
            :func:`gradwatch.dashboard.build_dashboard`), a function called for it at the first
            record holding scalars (an adapter that learns its groups only then), or None.
        max_columns: logged steps kept for the heatmap (older ones are merged in pairs).
        background: draw on a worker thread instead of the caller's.

    Example:
        >>> from gradwatch.grouping import Grouping
        >>> from gradwatch.dashboard import build_dashboard
        >>> layout = build_dashboard(Grouping.build(["emb.weight"], "module"))
        >>> pictures = FlowPictures(images=False, layout=layout)
        >>> first = pictures(Record(step=0, scalars={"grad_norm/emb": 1.0}))
        >>> first.layout is not None, pictures(Record(step=1, scalars={"loss": 1.0})).layout
        (True, None)
    """

    def __init__(
        self,
        images: bool = True,
        layout: Layout | Callable[[], Layout] | None = None,
        max_columns: int = 512,
        background: bool = True,
    ) -> None:
        images = check_flag("images", images)
        if not (layout is None or isinstance(layout, Layout) or callable(layout)):
            raise TypeError(
                "`layout` must be a Layout, a function returning one, or None. Received: "
                f"layout={layout!r}"
            )
        if images and importlib.util.find_spec("matplotlib") is None:
            warnings.warn(_NO_MATPLOTLIB, stacklevel=2)
            images = False
        self.images = images
        self.background = check_flag("background", background)
        self.history = FlowHistory(max_columns)
        self._layout = layout
        self._worker: concurrent.futures.ThreadPoolExecutor | None = None
        self._pending: collections.deque[tuple[int, concurrent.futures.Future]] = (
            collections.deque()
        )

    def __call__(self, record: Record) -> Record:
        """Return ``record`` with the pictures (and the layout) it should carry."""
        self.history.update(record)
        changes: dict = {}
        if self._layout is not None and record.scalars:
            layout, self._layout = self._layout, None
            changes["layout"] = layout if isinstance(layout, Layout) else layout()
        if self.images and record.histograms and len(self.history):
            if self.background:
                self._submit(record.step)
            else:
                changes["images"] = {**record.images, **self.draw()}
        return dataclasses.replace(record, **changes) if changes else record

    def draw(self, steps: list[int] | None = None) -> dict[str, Image]:
        """The heatmap and the depth profile (at ``steps``, default the last logged) now."""
        return _draw(self.history.matrix(), steps)

    @property
    def pending(self) -> int:
        """Pictures handed to the worker and not yet returned by :meth:`ready` or :meth:`finish`."""
        return len(self._pending)

    def ready(self) -> list[Record]:
        """Records of the pictures the worker has finished, oldest first, without waiting."""
        records = []
        while self._pending and self._pending[0][1].done():
            records.extend(_collect(*self._pending.popleft()))
        return records

    def finish(self, timeout: float = FINISH_TIMEOUT_S) -> list[Record]:
        """Wait (at most ``timeout`` seconds) for the pictures still being drawn; return their
        records, oldest first, and stop the worker (a later picture starts a new one).

        Pictures not finished in time are dropped with a warning, so that closing after an
        error never hangs; a picture that failed to draw is reported the same way.
        """
        futures = [future for _, future in self._pending]
        _, late = concurrent.futures.wait(futures, timeout=timeout)
        records = []
        while self._pending:
            step, future = self._pending.popleft()
            if future in late:
                future.cancel()
                warnings.warn(
                    f"gradwatch dropped the gradient-flow pictures of step {step}: still drawing "
                    f"after {timeout:g} s",
                    stacklevel=2,
                )
            else:
                records.extend(_collect(step, future))
        if self._worker is not None:
            self._worker.shutdown(wait=False, cancel_futures=True)
            self._worker = None
        return records

    def _submit(self, step: int) -> None:
        flow = self.history.matrix()  # a snapshot: the worker never reads the live history
        drawing = [future for _, future in self._pending if not future.done()]
        if len(drawing) >= _MAX_PENDING:  # drawing is slower than the cadence: wait, not queue
            concurrent.futures.wait(drawing[:1])
        if self._worker is None:
            self._worker = concurrent.futures.ThreadPoolExecutor(
                max_workers=1, thread_name_prefix="gradwatch-pictures"
            )
        self._pending.append((step, self._worker.submit(_draw, flow)))


def _draw(flow: FlowMatrix, steps: list[int] | None = None) -> dict[str, Image]:
    images = {
        tags.HEATMAP: Image.from_png(png_bytes(heatmap(flow))),
        tags.DEPTH_PROFILE: Image.from_png(png_bytes(depth_profile(flow, steps))),
    }
    if flow.backward is not None:  # with track_signal
        signal = heatmap(flow, title="backward signal", measure=(flow.backward, BACKWARD))
        images[tags.SIGNAL_HEATMAP] = Image.from_png(png_bytes(signal))
        images[tags.SIGNAL_PROFILE] = Image.from_png(png_bytes(signal_profile(flow, steps)))
    return images


def _collect(step: int, future: concurrent.futures.Future) -> list[Record]:
    """The record of a finished drawing, or none (and a warning) when it failed."""
    error = future.exception()
    if error is not None:
        warnings.warn(
            f"gradwatch could not draw the gradient-flow pictures of step {step}: {error!r}",
            stacklevel=3,
        )
        return []
    return [Record(step, images=future.result())]
