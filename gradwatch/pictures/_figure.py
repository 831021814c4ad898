"""Figures without pyplot: no global state, no GUI backend, the user's backend untouched.

matplotlib is imported on first use only, so the core stays importable without it.
"""

from __future__ import annotations

import io
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = [
    "MissingMatplotlib",
    "axes_box",
    "new_figure",
    "png_bytes",
    "require_matplotlib",
    "short_label",
    "text_width",
]

SOFTWARE = "gradwatch"  # written into every PNG, so gradwatch can tell its own files apart
DPI = 100
LABEL_CHARS = 36
# zlib level 1: much faster than the default 6 on these flat-coloured plots, for slightly larger
# files (benchmarks/README.md, "Pictures").
PNG_COMPRESS_LEVEL = 1


class MissingMatplotlib(ImportError):
    """gradwatch's pictures need matplotlib, which is an optional dependency."""


def require_matplotlib() -> None:
    """Raise :class:`MissingMatplotlib` with the install command when matplotlib is absent."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as error:
        raise MissingMatplotlib(
            "gradwatch's gradient-flow pictures need matplotlib: pip install 'gradwatch[report]'"
        ) from error


def new_figure(
    width: float,
    height: float,
    *,
    layout: Literal["constrained", "compressed", "tight"] | None = None,
    dpi: float = DPI,
) -> Figure:
    """A figure of ``width`` x ``height`` inches drawn by the Agg renderer at ``dpi``.

    Without a ``layout`` engine the caller places its axes (see :func:`axes_box`): the
    constrained layout measures every tick label on every draw, most of a picture's cost.
    """
    require_matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=dpi, layout=layout)
    FigureCanvasAgg(figure)
    return figure


def text_width(figure: Figure, texts: Iterable[str], size: float) -> float:
    """Width in inches of the widest of ``texts`` at font ``size`` (0 when there are none)."""
    from matplotlib.font_manager import FontProperties

    renderer = figure.canvas.get_renderer()  # type: ignore[attr-defined]  # Agg's, reused to draw
    font = FontProperties(size=size)
    widths = [renderer.get_text_width_height_descent(t, font, ismath=False)[0] for t in texts]
    return max(widths, default=0.0) / figure.dpi


def axes_box(
    figure: Figure, *, left: float, right: float, top: float, bottom: float
) -> tuple[float, float, float, float]:
    """The ``(x, y, width, height)`` figure fractions of an axes with these margins in inches."""
    width, height = figure.get_size_inches()
    return (
        left / width,
        bottom / height,
        max(1.0 - (left + right) / width, 0.1),
        max(1.0 - (top + bottom) / height, 0.1),
    )


def png_bytes(figure: Figure, **metadata: Any) -> bytes:
    """Encode ``figure`` as PNG bytes, at the resolution it was made with."""
    buffer = io.BytesIO()
    figure.savefig(
        buffer,
        format="png",
        dpi=figure.dpi,
        metadata={"Software": SOFTWARE, **metadata},
        pil_kwargs={"compress_level": PNG_COMPRESS_LEVEL},
    )
    return buffer.getvalue()


def short_label(name: str, limit: int = LABEL_CHARS) -> str:
    """Shorten a group name from the left, where module paths repeat themselves.

    Example:
        >>> short_label("model.encoder.layers.11.self_attn.out_proj", 24)
        '…s.11.self_attn.out_proj'
    """
    return name if len(name) <= limit else "…" + name[-(limit - 1) :]
