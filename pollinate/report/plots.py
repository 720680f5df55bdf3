"""Plots of a run: the global model's accuracy and loss, and the clients' label distributions.

Each function writes one PNG and returns its path, or returns None (writing nothing) when
the data it needs is absent — e.g. no federated evaluation ran. matplotlib is imported
inside the functions (see ``pollinate.report.drawing``), so ``import pollinate`` stays fast.
The clients' accuracy is in ``client_plot``, accuracy against simulated time and bytes in
``cost_plots``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pollinate.errors import DataError
from pollinate.report.drawing import colors, decorate, figure, marker_for, save, step_label
from pollinate.report.files import metric_series

if TYPE_CHECKING:
    from matplotlib.figure import Figure

ACCURACY_PNG = "accuracy.png"
LOSS_PNG = "loss.png"
PARTITIONS_PNG = "partitions.png"

MAX_CLIENT_BARS = 50  # more clients: a size histogram and a heatmap sample instead of bars

_save = save  # kept for callers outside the package (pollinate.analytics.session)


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
        "centralized (server's test set)": metric_series(history, "centralized", metric),
        "federated (clients' test data, example-weighted)": metric_series(
            history, "federated", metric
        ),
    }
    lines = {label: s for label, s in lines.items() if s[0]}
    if not lines:
        return None
    fig = figure()
    ax = fig.add_subplot()
    for label, (rounds, values) in lines.items():
        ax.plot(rounds, values, marker=marker_for(len(rounds)), linewidth=2, label=label)
    decorate(ax, title, step_label(history), metric)
    ax.legend(loc="best", fontsize="small")
    return save(fig, out_path)


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
    return save(fig, Path(out_path))


def _stacked_bars(counts: np.ndarray, names: list[str]) -> Figure:
    num_clients, num_classes = counts.shape
    fig = figure(8, max(3.0, 0.28 * num_clients + 1.5))
    ax = fig.add_subplot()
    ys = np.arange(num_clients)
    left = np.zeros(num_clients)
    palette = colors(num_classes)
    for k in range(num_classes):
        ax.barh(ys, counts[:, k], left=left, color=palette[k], label=names[k], height=0.8)
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
    num_clients, num_classes = counts.shape
    fig = figure(12, 5)
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
