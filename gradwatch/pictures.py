"""Gradient-flow pictures and the Custom Scalars layout, added to the records an adapter writes.

Every adapter builds the same records, so one :class:`FlowPictures` in the monitor gives
Lightning, Keras and plain loops the same pictures::

    monitor = Monitor(sinks, pictures=FlowPictures(images=histogram_every_n_steps > 0))
"""

from __future__ import annotations

import dataclasses
import importlib.util
import warnings

from gradwatch import keys
from gradwatch.flow import FlowHistory
from gradwatch.layout import Layout, default_layout
from gradwatch.record import Image, Record

__all__ = ["FlowPictures"]

_NO_MATPLOTLIB = (
    "gradwatch draws its gradient-flow images with matplotlib, which is not installed; "
    "histograms are still written. Install it with: pip install 'gradwatch[report]'"
)


class FlowPictures:
    """Remember each logging step's per-group norms; draw the pictures at the histogram cadence.

    A record holding histograms gets the heatmap (every logged step so far) and the depth
    profile (the last logged step) as images. The first record holding scalars gets the
    Custom Scalars ``layout``. Records passed in are not changed: a copy is returned.

    Args:
        images: draw the images (needs matplotlib: without it, a warning and no images).
        layout: the Custom Scalars layout to write once, or None for none.
        max_columns: logged steps kept for the heatmap (older ones are merged in pairs).

    Example:
        >>> pictures = FlowPictures(images=False)
        >>> first = pictures(Record(step=0, scalars={"grad_norm/emb": 1.0}))
        >>> first.layout is not None, pictures(Record(step=1, scalars={"loss": 1.0})).layout
        (True, None)
    """

    def __init__(
        self,
        images: bool = True,
        layout: Layout | None = default_layout(),  # noqa: B008 (immutable)
        max_columns: int = 512,
    ) -> None:
        if not isinstance(images, bool):
            raise TypeError(f"`images` must be True or False. Received: images={images!r}")
        if layout is not None and not isinstance(layout, Layout):
            raise TypeError(f"`layout` must be a Layout or None. Received: layout={layout!r}")
        if images and importlib.util.find_spec("matplotlib") is None:
            warnings.warn(_NO_MATPLOTLIB, stacklevel=2)
            images = False
        self.images = images
        self.history = FlowHistory(max_columns)
        self._layout = layout

    def __call__(self, record: Record) -> Record:
        """Return ``record`` with the pictures (and the layout) it should carry."""
        self.history.update(record)
        changes: dict = {}
        if self._layout is not None and record.scalars:
            changes["layout"], self._layout = self._layout, None
        if self.images and record.histograms and len(self.history):
            changes["images"] = {**record.images, **self.draw()}
        return dataclasses.replace(record, **changes) if changes else record

    def draw(self, steps: list[int] | None = None) -> dict[str, Image]:
        """The heatmap and the depth profile (at ``steps``, default the last logged) now."""
        from gradwatch import plots

        flow = self.history.matrix()
        return {
            keys.HEATMAP: Image.from_png(plots.png_bytes(plots.heatmap(flow))),
            keys.DEPTH_PROFILE: Image.from_png(plots.png_bytes(plots.depth_profile(flow, steps))),
        }
