"""Figures outside pyplot (no backend or window is touched, nothing stays open, a notebook
shows them inline), laid out so every title and legend lies on the canvas."""

from __future__ import annotations

from pathlib import Path


def figure(**kwargs):
    """A Figure outside pyplot: no backend or window is touched and nothing stays open,
    and a notebook shows the returned Figure inline. Laid out by matplotlib's constrained
    layout, which keeps room for titles, labels and legends placed "outside"."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(layout="constrained", **kwargs)
    FigureCanvasAgg(fig)  # a renderer to measure text with (finish), no GUI
    return fig


def finish(fig, path: str | Path | None, dpi: int):
    """Fit the figure to what it holds, then save it (when ``path``) and return it.

    The layout engine shrinks the axes to make room, but cannot make a figure wider than
    it is: a title or legend wider than the figure (one attribute, long SAE names) widens
    the figure, until every artist lies on the canvas."""
    renderer = fig.canvas.get_renderer()
    for _ in range(5):
        fig.draw_without_rendering()
        box = fig.get_tightbbox(renderer)  # inches, every artist drawn
        width, height = fig.get_size_inches()
        dx = max(0.0, -box.x0, box.x1 - width)
        dy = max(0.0, -box.y0, box.y1 - height)
        if dx < 0.01 and dy < 0.01:
            break
        fig.set_size_inches(width + 2 * dx + 0.05, height + 2 * dy + 0.05)
    if path is not None:
        fig.savefig(path, dpi=dpi)
    return fig
