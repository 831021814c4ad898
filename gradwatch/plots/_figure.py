"""Figures without pyplot: no global state, no GUI backend, the user's backend untouched.

matplotlib is imported on first use only, so the core stays importable without it.
"""

from __future__ import annotations

import io
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["MissingMatplotlib", "new_figure", "png_bytes", "require_matplotlib", "short_label"]

SOFTWARE = "gradwatch"  # written into every PNG, so gradwatch can tell its own files apart
DPI = 100
LABEL_CHARS = 36


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


def new_figure(width: float, height: float) -> Figure:
    """A figure of ``width`` x ``height`` inches drawn by the Agg renderer."""
    require_matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def png_bytes(figure: Figure, **metadata: Any) -> bytes:
    """Encode ``figure`` as PNG bytes."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=DPI, metadata={"Software": SOFTWARE, **metadata})
    return buffer.getvalue()


def short_label(name: str, limit: int = LABEL_CHARS) -> str:
    """Shorten a group name from the left, where module paths repeat themselves.

    Example:
        >>> short_label("model.encoder.layers.11.self_attn.out_proj", 24)
        '…s.11.self_attn.out_proj'
    """
    return name if len(name) <= limit else "…" + name[-(limit - 1) :]
