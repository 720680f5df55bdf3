"""Drawing helpers shared by the run's plots: figures, colours, axis labels and saving.

Figures are drawn on the Agg canvas directly (no pyplot, no display, no global figure state),
so plotting is safe from worker threads; matplotlib is imported inside the functions.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pollinate.report.files import atomic_open

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

DPI = 120
MAX_MARKED_POINTS = 60  # a line with more points than this is drawn without markers

# Config sections or strategy names that make history entries server steps, not rounds
# (asynchronous FedBuff: the server steps once per buffer of updates).
_ASYNC_STRATEGIES = frozenset({"fedbuff"})
_ASYNC_SECTIONS = ("asynchronous", "async", "fedbuff")


def step_label(history: Mapping[str, Any]) -> str:
    """What one history entry is: "server step" for an asynchronous run, else "round".

    A run is asynchronous when its ``strategy.name`` is ``fedbuff`` or its config has an
    ``[asynchronous]`` (or ``[async]``, ``[fedbuff]``) section with ``enabled = true``.
    """
    config = history.get("config")
    if not isinstance(config, Mapping):
        return "round"
    strategy = config.get("strategy")
    if isinstance(strategy, Mapping) and str(strategy.get("name", "")).lower() in _ASYNC_STRATEGIES:
        return "server step"
    for name in _ASYNC_SECTIONS:
        section = config.get(name)
        if isinstance(section, Mapping) and section.get("enabled") is True:
            return "server step"
    return "round"


def figure(width: float = 8.0, height: float = 4.5) -> Figure:
    """An empty figure with constrained layout, not attached to pyplot."""
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def decorate(ax: Axes, title: str, xlabel: str, ylabel: str, integer_x: bool = True) -> None:
    """Title, axis labels, a light grid, and integer ticks on a round axis (call it after
    drawing: a single round is framed by half a round on each side)."""
    from matplotlib.ticker import MaxNLocator

    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if integer_x:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        low, high = ax.dataLim.intervalx
        if low == high and np.isfinite(low):  # one round: frame it rather than zoom on it
            ax.set_xlim(low - 0.5, high + 0.5)
            ax.set_xticks([low])
    ax.grid(True, alpha=0.3)


def marker_for(num_points: int, marker: str = "o") -> str | None:
    """``marker`` for a short line, None for a long one (markers would hide the line)."""
    return marker if num_points <= MAX_MARKED_POINTS else None


def colors(n: int) -> list[Any]:
    """``n`` distinguishable colours: tab10 / tab20, then evenly spaced along turbo."""
    from matplotlib import colormaps

    if n <= 20:
        cmap = colormaps["tab10" if n <= 10 else "tab20"]
        return [cmap(i) for i in range(n)]
    return [colormaps["turbo"](x) for x in np.linspace(0.05, 0.95, n)]


def unit_for(top: float, units: tuple[tuple[str, float], ...]) -> tuple[str, float]:
    """The largest of ``units`` ((name, size) pairs, increasing) not above ``top``; the
    smallest for smaller values."""
    name, size = units[0]
    for unit_name, unit_size in units:
        if top >= unit_size:
            name, size = unit_name, unit_size
    return name, size


TIME_UNITS = (("s", 1.0), ("min", 60.0), ("h", 3600.0), ("days", 86400.0))
BYTE_UNITS = (("B", 1.0), ("kB", 1e3), ("MB", 1e6), ("GB", 1e9), ("TB", 1e12))


def save(fig: Figure, out_path: Path) -> Path:
    """Render ``fig`` with Agg into ``out_path`` atomically."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    with atomic_open(out_path, binary=True) as handle:
        fig.savefig(handle, format="png", dpi=DPI)
    return out_path
