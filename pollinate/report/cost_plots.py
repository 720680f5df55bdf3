"""What the accuracy cost: the global model's accuracy against simulated time and bytes sent.

Drawn only for runs on the virtual clock (``[environment]``), whose rounds carry
``record["environment"]`` with ``simulated_time_s``, ``bytes_down`` and ``bytes_up`` for that
round (or server step, for an asynchronous run). The x axis is their cumulative sum over the
rounds that carry them, in the order of the history, so a round's point sits at the time (or
traffic) spent up to its end.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pollinate.report.drawing import (
    BYTE_UNITS,
    TIME_UNITS,
    decorate,
    figure,
    marker_for,
    save,
    step_label,
    unit_for,
)
from pollinate.report.files import finite_number

if TYPE_CHECKING:
    from matplotlib.figure import Figure

ACCURACY_TIME_PNG = "accuracy_time.png"
ACCURACY_BYTES_PNG = "accuracy_bytes.png"

_LINES = (
    ("centralized", "centralized (server's test set)"),
    ("federated", "federated (clients' test data, example-weighted)"),
)


@dataclass(frozen=True)
class CostSeries:
    """The cumulative cost at the end of each round that recorded it."""

    rounds: np.ndarray
    cost: np.ndarray  # cumulative seconds or bytes


def cumulative_cost(history: Mapping[str, Any], *keys: str) -> CostSeries:
    """Cumulative sum of ``record["environment"][k]`` summed over ``keys``, per round.

    A round whose environment lacks one of ``keys`` (or has a non-finite value) is left out
    and adds nothing.
    """
    rounds: list[int] = []
    per_round: list[float] = []
    for entry in history.get("rounds", []):
        env = entry.get("environment")
        if not isinstance(env, Mapping):
            continue
        values = [finite_number(env.get(k)) for k in keys]
        if any(v is None for v in values):
            continue
        rounds.append(int(entry["round"]))
        per_round.append(sum(v for v in values if v is not None))
    return CostSeries(np.array(rounds, dtype=int), np.cumsum(np.array(per_round, dtype=float)))


def plot_accuracy_time(history: Mapping[str, Any], out_dir: str | os.PathLike[str]) -> Path | None:
    """Plot the global model's accuracy against cumulative simulated time (accuracy_time.png).

    Returns None, writing nothing, without environment data or accuracy at those rounds.
    """
    fig = accuracy_time_figure(history)
    return None if fig is None else save(fig, Path(out_dir) / ACCURACY_TIME_PNG)


def plot_accuracy_bytes(history: Mapping[str, Any], out_dir: str | os.PathLike[str]) -> Path | None:
    """Plot the global model's accuracy against cumulative bytes sent (accuracy_bytes.png).

    Two panels: bytes uploaded by the clients (``bytes_up``: what update compression
    shrinks) and bytes sent both ways (``bytes_down + bytes_up``). Returns None, writing
    nothing, without environment data or accuracy at those rounds.
    """
    fig = accuracy_bytes_figure(history)
    return None if fig is None else save(fig, Path(out_dir) / ACCURACY_BYTES_PNG)


def accuracy_time_figure(history: Mapping[str, Any]) -> Figure | None:
    """The figure of accuracy_time.png, or None without the data it needs."""
    series = cumulative_cost(history, "simulated_time_s")
    lines = _accuracy_at(history, series)
    if not lines:
        return None
    unit, size = unit_for(float(series.cost.max()), TIME_UNITS)
    fig = figure()
    ax = fig.add_subplot()
    _draw(ax, lines, size)
    decorate(
        ax,
        "Global model accuracy against simulated time",
        f"simulated time on the virtual clock, cumulative ({unit})",
        "accuracy",
        integer_x=False,
    )
    ax.legend(loc="best", fontsize="small", title=f"one point per {step_label(history)}")
    return fig


def accuracy_bytes_figure(history: Mapping[str, Any]) -> Figure | None:
    """The figure of accuracy_bytes.png, or None without the data it needs."""
    panels = [
        ("Uploaded by the clients", "clients → server", ("bytes_up",)),
        ("Sent both ways", "server → clients + clients → server", ("bytes_down", "bytes_up")),
    ]
    drawn = []
    for title, what, keys in panels:
        series = cumulative_cost(history, *keys)
        lines = _accuracy_at(history, series)
        if lines:
            drawn.append((title, what, series, lines))
    if not drawn:
        return None
    fig = figure(6.0 * len(drawn), 4.5)
    axes = fig.subplots(1, len(drawn), sharey=True, squeeze=False)[0]
    for ax, (title, what, series, lines) in zip(axes, drawn):
        unit, size = unit_for(float(series.cost.max()), BYTE_UNITS)
        _draw(ax, lines, size)
        decorate(ax, title, f"bytes sent, {what}, cumulative ({unit})", "", integer_x=False)
    axes[0].set_ylabel("accuracy")
    axes[0].legend(loc="best", fontsize="small", title=f"one point per {step_label(history)}")
    fig.suptitle("Global model accuracy against bytes sent")
    return fig


def _accuracy_at(
    history: Mapping[str, Any], series: CostSeries
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """label → (cumulative cost, accuracy) at the rounds that have both."""
    at = {int(r): float(c) for r, c in zip(series.rounds, series.cost)}
    lines: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for section, label in _LINES:
        xs: list[float] = []
        ys: list[float] = []
        for entry in history.get("rounds", []):
            metrics = entry.get(section)
            value = finite_number(metrics.get("accuracy")) if isinstance(metrics, Mapping) else None
            cost = at.get(int(entry["round"]))
            if value is not None and cost is not None:
                xs.append(cost)
                ys.append(value)
        if xs:
            lines[label] = (np.array(xs), np.array(ys))
    return lines


def _draw(ax: Any, lines: Mapping[str, tuple[np.ndarray, np.ndarray]], unit: float) -> None:
    for label, (xs, ys) in lines.items():
        ax.plot(xs / unit, ys, marker=marker_for(len(xs)), linewidth=2, label=label)
