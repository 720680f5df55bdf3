"""The clients' accuracy per round (client_accuracy.png): their spread, not one line each.

Both panels measure on every client's *own* test part, never on the server's test set:

* the global model, on each client sampled for federated evaluation
  (``record["clients"][id]["evaluate"]["accuracy"]``);
* each client's locally trained model, evaluated right after its training
  (``record["clients"][id]["train"]["local_accuracy"]``, present with ``train.local_evaluation``).

Per round: the median and the 10–90 % percentile band over the clients that reported it that
round; with more than MAX_BAND_POINTS measured rounds (an asynchronous run's server steps),
over the clients of each window of consecutive rounds, so at most MAX_BAND_POINTS points.

At most MAX_HIGHLIGHTED clients are drawn one by one, the same ones in both panels and chosen
deterministically (evenly spread from the lowest to the highest mean accuracy among the
clients that took part most); each has a marker on every round it took part in, and a line
only between consecutive measured rounds it took part in both — a round without it is a gap.
The drawing is a band, a median, a reference line and at most MAX_HIGHLIGHTED client lines per
panel, whatever the number of clients.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pollinate.report.drawing import decorate, figure, marker_for, save, step_label
from pollinate.report.files import finite_number, metric_series

if TYPE_CHECKING:
    from matplotlib.figure import Figure

CLIENT_ACCURACY_PNG = "client_accuracy.png"
MAX_HIGHLIGHTED = 5
MAX_BAND_POINTS = 200  # more measured rounds: the band pools windows of consecutive rounds
BAND = (10.0, 90.0)  # percentiles of the band

# (task, key, title) of each panel, in drawing order.
_PANELS = (
    ("evaluate", "accuracy", "Global model on each client's test data\n(federated evaluation)"),
    (
        "train",
        "local_accuracy",
        "Each client's trained model on its test data\n(local evaluation after training)",
    ),
)
_BAND_COLOR = "tab:blue"


@dataclass(frozen=True)
class ClientPanel:
    """One accuracy of the clients (``record["clients"][id][task][key]``) over the rounds.

    The band's arrays are per band point: one measured round, or a window of ``window``
    consecutive measured rounds (the last window may be shorter) at their mean round.
    """

    task: str
    key: str
    title: str
    rounds: np.ndarray  # the rounds where at least one client reported it, ascending
    count: np.ndarray  # how many clients reported it, per round
    clients: dict[str, np.ndarray]  # highlighted client → its value per round, NaN: absent
    window: int  # measured rounds pooled into one band point
    band_x: np.ndarray  # each band point's round (a window's mean round)
    median: np.ndarray
    low: np.ndarray  # the BAND[0] percentile
    high: np.ndarray  # the BAND[1] percentile


def client_accuracy_panels(
    history: Mapping[str, Any], max_highlighted: int = MAX_HIGHLIGHTED
) -> list[ClientPanel]:
    """The panels client_accuracy.png draws, one per accuracy some client reported.

    The highlighted clients are chosen on the first panel with data and kept for the others.
    """
    gathered = [(spec, _gather(history, spec[0], spec[1])) for spec in _PANELS]
    gathered = [(spec, per_round) for spec, per_round in gathered if per_round]
    if not gathered:
        return []
    chosen = _highlight(gathered[0][1], max_highlighted)
    return [_panel(spec, per_round, chosen) for spec, per_round in gathered]


def client_accuracy_figure(history: Mapping[str, Any]) -> Figure | None:
    """The figure of client_accuracy.png, or None when no client reported an accuracy."""
    panels = client_accuracy_panels(history)
    if not panels:
        return None
    step = step_label(history)
    fig = figure(6.0 * len(panels) if len(panels) > 1 else 8.0, 5.2)
    axes = fig.subplots(1, len(panels), sharey=True, squeeze=False)[0]
    highlighted = list(panels[0].clients)
    palette = _highlight_colors(len(highlighted))
    central_rounds, central_values = metric_series(history, "centralized", "accuracy")
    pooled = any(panel.window > 1 for panel in panels)
    where = f"a window of {step}s (see the title)" if pooled else f"the {step}"
    for ax, panel in zip(axes, panels):
        ax.fill_between(
            panel.band_x,
            panel.low,
            panel.high,
            color=_BAND_COLOR,
            alpha=0.22,
            linewidth=0,
            label=f"{BAND[0]:g}–{BAND[1]:g}% of the clients in {where}",
        )
        if len(panel.band_x) == 1:  # a band one round wide has no area: draw it as a bar
            ax.vlines(panel.band_x, panel.low, panel.high, color=_BAND_COLOR, alpha=0.22, lw=12)
        ax.plot(
            panel.band_x,
            panel.median,
            color=_BAND_COLOR,
            linewidth=2,
            marker=marker_for(len(panel.band_x)),
            markersize=4,
            label="median client",
        )
        for cid, color in zip(highlighted, palette):
            values = panel.clients[cid]
            if np.isnan(values).all():
                continue
            ax.plot(
                panel.rounds,
                values,  # NaN where the client did not take part: no line across the gap
                color=color,
                linewidth=1,
                marker="o",
                markersize=4,
                alpha=0.9,
                label=f"client {cid}",
            )
        if central_rounds:
            ax.plot(
                central_rounds,
                central_values,
                color="black",
                linewidth=1.2,
                linestyle="--",
                marker="D" if len(central_rounds) == 1 else None,  # one round: no line to see
                markersize=4,
                label="global model on the server's test set (centralized)",
            )
        title = f"{panel.title}, {_count_text(panel.count)} per {step}"
        if panel.window > 1:
            title += f";\nband and median over windows of {panel.window} {step}s"
        decorate(ax, title, step, "")
    axes[0].set_ylabel("accuracy on the client's own test data")
    _legend(fig, axes, highlighted)
    return fig


def plot_client_accuracy(
    history: Mapping[str, Any], out_dir: str | os.PathLike[str]
) -> Path | None:
    """Plot the spread of the clients' accuracy on their own test data (client_accuracy.png).

    Returns None, writing nothing, when no client reported an accuracy.
    """
    fig = client_accuracy_figure(history)
    if fig is None:
        return None
    return save(fig, Path(out_dir) / CLIENT_ACCURACY_PNG)


# -- reading the history -------------------------------------------------------------------


def _gather(history: Mapping[str, Any], task: str, key: str) -> dict[int, dict[str, float]]:
    """round → {client id: ``record["clients"][id][task][key]``}, finite values only."""
    per_round: dict[int, dict[str, float]] = {}
    for entry in history.get("rounds", []):
        clients = entry.get("clients")
        if not isinstance(clients, Mapping):
            continue
        values: dict[str, float] = {}
        for cid, record in clients.items():
            metrics = record.get(task) if isinstance(record, Mapping) else None
            value = finite_number(metrics.get(key)) if isinstance(metrics, Mapping) else None
            if value is not None:
                values[str(cid)] = value
        if values:
            per_round[int(entry["round"])] = values
    return per_round


def _id_order(cid: str) -> tuple[int, int | str]:
    return (0, int(cid)) if cid.lstrip("-").isdigit() else (1, cid)


def _highlight(per_round: Mapping[int, Mapping[str, float]], limit: int) -> list[str]:
    """At most ``limit`` clients, evenly spread by mean value, lowest first.

    Only clients that took part in at least half as many rounds as the most frequent one are
    candidates (a client seen once says little about a trend); ties go to the lower id.
    """
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    for values in per_round.values():
        for cid, value in values.items():
            sums[cid] = sums.get(cid, 0.0) + value
            counts[cid] = counts.get(cid, 0) + 1
    if not counts or limit <= 0:
        return []
    most = max(counts.values())
    pool = sorted(
        (cid for cid, n in counts.items() if 2 * n >= most),
        key=lambda cid: (sums[cid] / counts[cid], _id_order(cid)),
    )
    if len(pool) <= limit:
        return pool
    picks = np.unique(np.round(np.linspace(0, len(pool) - 1, limit)).astype(int))
    return [pool[i] for i in picks]


def _panel(
    spec: tuple[str, str, str], per_round: Mapping[int, Mapping[str, float]], chosen: list[str]
) -> ClientPanel:
    task, key, title = spec
    rounds = sorted(per_round)
    window = -(-len(rounds) // MAX_BAND_POINTS)  # ceil: at most MAX_BAND_POINTS windows
    band_x, stats = [], []
    for start in range(0, len(rounds), window):
        group = rounds[start : start + window]
        pooled = [value for r in group for value in per_round[r].values()]
        band_x.append(float(np.mean(group)))
        stats.append(np.percentile(pooled, (BAND[0], 50.0, BAND[1])))
    table = np.array(stats)
    clients = {
        cid: np.array([per_round[r].get(cid, np.nan) for r in rounds], dtype=float)
        for cid in chosen
    }
    return ClientPanel(
        task=task,
        key=key,
        title=title,
        rounds=np.array(rounds, dtype=int),
        count=np.array([len(per_round[r]) for r in rounds], dtype=int),
        clients=clients,
        window=window,
        band_x=np.array(band_x),
        median=table[:, 1],
        low=table[:, 0],
        high=table[:, 2],
    )


# -- drawing -------------------------------------------------------------------------------


def _count_text(count: np.ndarray) -> str:
    """How many clients reported, per round: "1 client", "10 clients" or "5–10 clients"."""
    low, high = int(count.min()), int(count.max())
    if low == high:
        return f"{low} client{'' if low == 1 else 's'}"
    return f"{low}–{high} clients"


def _highlight_colors(n: int) -> list[Any]:
    """Colours for the highlighted clients, avoiding the band's blue (tab10's first)."""
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    return [cmap(1 + i % 9) for i in range(n)]


def _legend(fig: Figure, axes: Any, highlighted: list[str]) -> None:
    """Legends below the panels, each label once (a client has one colour in all panels):
    what the band and lines are on the left, the clients drawn one by one on the right."""
    seen: dict[str, Any] = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            seen.setdefault(label, handle)
    names = {f"client {cid}" for cid in highlighted}
    summary = [(label, handle) for label, handle in seen.items() if label not in names]
    clients = [
        (label, seen[label]) for label in (f"client {c}" for c in highlighted) if label in seen
    ]
    if summary:
        fig.legend(
            [h for _, h in summary],
            [label for label, _ in summary],
            loc="outside lower left",
            fontsize="small",
        )
    if clients:
        fig.legend(
            [h for _, h in clients],
            [label for label, _ in clients],
            loc="outside lower right",
            ncol=1 if len(clients) < 3 else (len(clients) + 1) // 2,
            fontsize="small",
            title="one by one, by mean in the first panel, lowest first"
            if len(clients) > 1
            else None,
            title_fontsize="small",
        )
