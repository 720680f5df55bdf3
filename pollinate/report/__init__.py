"""Run outputs: history.json, metrics.csv, plots and a self-contained HTML report.

matplotlib is imported only when a plot is drawn, so importing this package is cheap.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pollinate.report.client_plot import plot_client_accuracy
from pollinate.report.cost_plots import plot_accuracy_bytes, plot_accuracy_time
from pollinate.report.files import (
    HISTORY_FILE,
    METRICS_FILE,
    read_history,
    write_history,
    write_json_atomic,
    write_metrics_csv,
)
from pollinate.report.html import HISTORY_PLOTS, write_report
from pollinate.report.plots import (
    PARTITIONS_PNG,
    plot_accuracy,
    plot_label_distribution,
    plot_loss,
)

__all__ = [
    "plot_accuracy",
    "plot_accuracy_bytes",
    "plot_accuracy_time",
    "plot_client_accuracy",
    "plot_label_distribution",
    "plot_loss",
    "read_history",
    "write_history",
    "write_json_atomic",
    "write_metrics_csv",
    "write_report",
    "write_run_outputs",
]


def write_run_outputs(
    run_dir: str | os.PathLike[str],
    history: Mapping[str, Any],
    label_counts: np.ndarray | None = None,
    class_names: Sequence[str] | None = None,
) -> list[Path]:
    """Write history.json, metrics.csv and every plot the data allows; return their paths.

    A history plot whose data is absent is not written, and a stale one left in ``run_dir``
    by an earlier run is removed (a plot never shows another run's numbers):
    accuracy_time.png and accuracy_bytes.png, e.g., need the rounds' ``environment`` records
    (a run on the virtual clock).
    partitions.png is written only when ``label_counts`` (clients × classes) is given.
    """
    folder = Path(run_dir)
    written = [
        write_history(folder / HISTORY_FILE, history),
        write_metrics_csv(folder / METRICS_FILE, history),
    ]
    for name, plot in HISTORY_PLOTS:
        path = plot(history, folder)
        if path is None:
            (folder / name).unlink(missing_ok=True)
        else:
            written.append(path)
    if label_counts is not None:
        path = plot_label_distribution(label_counts, folder / PARTITIONS_PNG, class_names)
        if path is not None:
            written.append(path)
    return written
