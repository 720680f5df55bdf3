"""Plots of a run: global accuracy and loss, each client's accuracy, label distributions.

Each function writes one PNG and returns its path, or returns None (writing nothing) when
the data it needs is absent — e.g. no federated evaluation ran. matplotlib is imported
inside the functions, and figures are drawn on the Agg canvas directly (no pyplot, no
display, no global figure state), so ``import pollinate`` stays fast and plotting is safe
from worker threads.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pollinate.errors import DataError
from pollinate.report.files import atomic_open, finite_number, metric_series

if TYPE_CHECKING:
    from matplotlib.figure import Figure

ACCURACY_PNG = "accuracy.png"
LOSS_PNG = "loss.png"
CLIENT_ACCURACY_PNG = "client_accuracy.png"
PARTITIONS_PNG = "partitions.png"

MAX_CLIENT_LINES = 20  # more clients: a min/median/max band instead of one line each
MAX_CLIENT_BARS = 50  # more clients: a size histogram and a heatmap sample instead of bars
_DPI = 120

Series = tuple[list[int], list[float]]  # rounds, values


def plot_accuracy(history: Mapping[str, Any], out_dir: str | os.PathLike[str]) -> Path | None:
    """Plot the global model's centralized and federated accuracy per round (accuracy.png)."""
    return _plot_global(history, Path(out_dir) / ACCURACY_PNG, "accuracy", "Global model accuracy")


def plot_loss(history: Mapping[str, Any], out_dir: str | os.PathLike[str]) -> Path | None:
    """Plot the global model's centralized and federated loss per round (loss.png)."""
    return _plot_global(history, Path(out_dir) / LOSS_PNG, "loss", "Global model loss")


def _plot_global(
    history: Mapping[str, Any], out_path: Path, metric: str, title: str
) -> Path | None:
    lines = {
        "centralized (server data)": metric_series(history, "centralized", metric),
        "federated (client test data)": metric_series(history, "federated", metric),
    }
    lines = {label: s for label, s in lines.items() if s[0]}
    if not lines:
        return None
    fig, ax = _figure()
    for label, (rounds, values) in lines.items():
        ax.plot(rounds, values, marker="o", linewidth=2, label=label)
    _decorate(ax, title, metric)
    return _save(fig, out_path)


def plot_client_accuracy(
    history: Mapping[str, Any], out_dir: str | os.PathLike[str]
) -> Path | None:
    """Plot each client's accuracy per round (thin lines) against the global model's (thick).

    A client's accuracy is its train metric ``local_accuracy`` (its locally trained model
    on its own test part), else its federated ``evaluate`` accuracy. With more than
    MAX_CLIENT_LINES clients, a min/median/max band replaces the individual lines.
    """
    clients = _client_series(history)
    if not clients:
        return None
    global_label = "global (centralized)"
    global_rounds, global_values = metric_series(history, "centralized", "accuracy")
    if not global_rounds:
        global_label = "global (federated)"
        global_rounds, global_values = metric_series(history, "federated", "accuracy")

    fig, ax = _figure()
    if len(clients) <= MAX_CLIENT_LINES:
        colors = _colors(len(clients))
        for i, (cid, (rounds, values)) in enumerate(clients.items()):
            ax.plot(
                rounds,
                values,
                linewidth=1,
                alpha=0.75,
                marker=".",
                color=colors[i],
                label=f"client {cid}" if len(clients) <= 10 else None,
            )
        if len(clients) > 10:
            ax.plot([], [], linewidth=1, color="grey", label=f"{len(clients)} clients")
    else:
        rounds, low, mid, high = _band(clients)
        ax.fill_between(
            rounds,
            low,
            high,
            alpha=0.25,
            color="tab:blue",
            label=f"{len(clients)} clients: min–max",
        )
        ax.plot(
            rounds, mid, linewidth=1.5, linestyle="--", color="tab:blue", label="clients: median"
        )
    if global_rounds:
        ax.plot(
            global_rounds,
            global_values,
            linewidth=3.5,
            color="black",
            marker="o",
            label=global_label,
            zorder=5,
        )
    _decorate(ax, "Each client's accuracy vs the global model", "accuracy")
    return _save(fig, Path(out_dir) / CLIENT_ACCURACY_PNG)


def plot_label_distribution(
    label_counts: np.ndarray | Sequence[Sequence[int]],
    out_path: str | os.PathLike[str],
    class_names: Sequence[str] | None = None,
) -> Path | None:
    """Plot how many examples of each class every client holds (partitions.png).

    Up to MAX_CLIENT_BARS clients: one stacked horizontal bar per client. More: a histogram
    of client sizes and a heatmap of the class mix of an evenly spaced sample of clients.
    Returns None when there are no clients.
    """
    counts = np.asarray(label_counts)
    if counts.ndim != 2:
        raise DataError(
            f"label_counts must be a 2-D array (clients × classes), got shape {counts.shape}"
        )
    if counts.shape[0] == 0 or counts.shape[1] == 0:
        return None
    if not np.issubdtype(counts.dtype, np.number) or (counts < 0).any():
        raise DataError("label_counts must hold non-negative example counts")
    num_clients, num_classes = counts.shape
    names = [str(c) for c in range(num_classes)] if class_names is None else list(class_names)
    if len(names) != num_classes:
        raise DataError(
            f"class_names has {len(names)} names but label_counts has {num_classes} classes"
        )
    if num_clients <= MAX_CLIENT_BARS:
        fig = _stacked_bars(counts, names)
    else:
        fig = _size_histogram_and_heatmap(counts, names)
    return _save(fig, Path(out_path))


def _stacked_bars(counts: np.ndarray, names: list[str]) -> Figure:
    from matplotlib.figure import Figure

    num_clients, num_classes = counts.shape
    fig = Figure(figsize=(8, max(3.0, 0.28 * num_clients + 1.5)), layout="constrained")
    ax = fig.add_subplot()
    ys = np.arange(num_clients)
    left = np.zeros(num_clients)
    colors = _colors(num_classes)
    for k in range(num_classes):
        ax.barh(ys, counts[:, k], left=left, color=colors[k], label=names[k], height=0.8)
        left += counts[:, k]
    ax.set_yticks(ys, [str(i) for i in ys])
    ax.invert_yaxis()
    ax.set_xlabel("examples")
    ax.set_ylabel("client")
    ax.set_title("Label distribution per client")
    if num_classes <= 20:
        ax.legend(title="class", loc="upper left", bbox_to_anchor=(1.01, 1), fontsize="small")
    return fig


def _size_histogram_and_heatmap(counts: np.ndarray, names: list[str]) -> Figure:
    from matplotlib.figure import Figure

    num_clients, num_classes = counts.shape
    fig = Figure(figsize=(12, 5), layout="constrained")
    hist_ax, heat_ax = fig.subplots(1, 2, width_ratios=(1, 1.4))
    sizes = counts.sum(axis=1)
    hist_ax.hist(sizes, bins=min(50, max(10, num_clients // 20)), color="tab:blue")
    hist_ax.set_xlabel("examples per client")
    hist_ax.set_ylabel("clients")
    hist_ax.set_title(f"Client sizes ({num_clients} clients)")

    sample = np.unique(np.linspace(0, num_clients - 1, MAX_CLIENT_BARS).round().astype(int))
    totals = np.maximum(sizes[sample], 1)[:, None]
    image = heat_ax.imshow(
        counts[sample] / totals, aspect="auto", cmap="viridis", vmin=0, interpolation="nearest"
    )
    if num_classes <= 20:
        heat_ax.set_xticks(range(num_classes), names)
    else:
        heat_ax.set_xticks([])
    heat_ax.set_xlabel("class")
    heat_ax.set_ylabel("client (sample)")
    heat_ax.set_yticks([0, len(sample) - 1], [str(sample[0]), str(sample[-1])])
    heat_ax.set_title(f"Class mix of {len(sample)} sampled clients")
    fig.colorbar(image, ax=heat_ax, label="fraction of client's examples")
    return fig


# -- reading the history -------------------------------------------------------------------


def _client_accuracy(record: object) -> float | None:
    if not isinstance(record, Mapping):
        return None
    for task, key in (("train", "local_accuracy"), ("evaluate", "accuracy")):
        metrics = record.get(task)
        if isinstance(metrics, Mapping):
            value = finite_number(metrics.get(key))
            if value is not None:
                return value
    return None


def _client_series(history: Mapping[str, Any]) -> dict[str, Series]:
    """Each client's (rounds, accuracies), clients sorted by id."""
    series: dict[str, Series] = {}
    for entry in history.get("rounds", []):
        clients = entry.get("clients")
        if not isinstance(clients, Mapping):
            continue
        for cid, record in clients.items():
            value = _client_accuracy(record)
            if value is not None:
                rounds, values = series.setdefault(str(cid), ([], []))
                rounds.append(int(entry["round"]))
                values.append(value)

    def order(cid: str) -> tuple[int, int | str]:
        return (0, int(cid)) if cid.lstrip("-").isdigit() else (1, cid)

    return {cid: series[cid] for cid in sorted(series, key=order)}


def _band(clients: Mapping[str, Series]) -> tuple[list[int], list[float], list[float], list[float]]:
    """Per round: min, median and max over the clients that reported that round."""
    by_round: dict[int, list[float]] = {}
    for rounds, values in clients.values():
        for r, v in zip(rounds, values):
            by_round.setdefault(r, []).append(v)
    rounds = sorted(by_round)
    stacked = [np.asarray(by_round[r]) for r in rounds]
    return (
        rounds,
        [float(v.min()) for v in stacked],
        [float(np.median(v)) for v in stacked],
        [float(v.max()) for v in stacked],
    )


# -- drawing -------------------------------------------------------------------------------


def _figure() -> tuple[Figure, Any]:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 4.5), layout="constrained")
    return fig, fig.add_subplot()


def _decorate(ax: Any, title: str, ylabel: str) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.set_title(title)
    ax.set_xlabel("round")
    ax.set_ylabel(ylabel)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(True, alpha=0.3)
    ax.legend(loc="best", fontsize="small")


def _colors(n: int) -> list[Any]:
    from matplotlib import colormaps

    if n <= 20:
        cmap = colormaps["tab10" if n <= 10 else "tab20"]
        return [cmap(i) for i in range(n)]
    return [colormaps["turbo"](x) for x in np.linspace(0.05, 0.95, n)]


def _save(fig: Figure, out_path: Path) -> Path:
    """Render ``fig`` with Agg into ``out_path`` atomically."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    with atomic_open(out_path, binary=True) as handle:
        fig.savefig(handle, format="png", dpi=_DPI)
    return out_path
