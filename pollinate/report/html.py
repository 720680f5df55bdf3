"""The HTML report of a run: one self-contained page (inline CSS, plots as data URIs).

Everything taken from the run (config values, metric names, failure reasons) is escaped
with ``html.escape``, so a run name such as ``<script>…</script>`` shows as text.
"""

from __future__ import annotations

import base64
import html
import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from pollinate.errors import DataError
from pollinate.report.client_plot import CLIENT_ACCURACY_PNG, plot_client_accuracy
from pollinate.report.cost_plots import (
    ACCURACY_BYTES_PNG,
    ACCURACY_TIME_PNG,
    plot_accuracy_bytes,
    plot_accuracy_time,
)
from pollinate.report.drawing import step_label
from pollinate.report.files import (
    HISTORY_FILE,
    CellValue,
    atomic_open,
    metric_series,
    metrics_table,
    read_history,
)
from pollinate.report.plots import (
    ACCURACY_PNG,
    LOSS_PNG,
    PARTITIONS_PNG,
    plot_accuracy,
    plot_loss,
)
from pollinate.report.summary import describe_experiment

REPORT_FILE = "report.html"
MAX_FAILURES_SHOWN = 200

# Plots drawn from the history (recreated when missing), in the report's order; then the
# ones only a run can draw (partitions.png needs the data set).
HISTORY_PLOTS: tuple[tuple[str, Callable[[Mapping[str, Any], Path], Path | None]], ...] = (
    (ACCURACY_PNG, plot_accuracy),
    (LOSS_PNG, plot_loss),
    (CLIENT_ACCURACY_PNG, plot_client_accuracy),
    (ACCURACY_TIME_PNG, plot_accuracy_time),
    (ACCURACY_BYTES_PNG, plot_accuracy_bytes),
)
_PLOT_TITLES = {
    ACCURACY_PNG: "Global model accuracy: centralized on the server's test set, federated on "
    "the clients' test data",
    LOSS_PNG: "Global model loss",
    CLIENT_ACCURACY_PNG: "Accuracy on each client's own test data, over the clients of each "
    "round: the global model (federated evaluation) and each client's trained model (local "
    "evaluation); median, 10–90% band, and a few clients one by one",
    ACCURACY_TIME_PNG: "Global model accuracy against simulated time on the virtual clock",
    ACCURACY_BYTES_PNG: "Global model accuracy against bytes sent (uploaded, and both ways)",
    PARTITIONS_PNG: "Label distribution per client",
}

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2rem auto;
       max-width: 70rem; padding: 0 1rem; color: #1f2328; }
h1 { margin-bottom: 0.2rem; } h2 { margin-top: 2.2rem; border-bottom: 1px solid #d0d7de; }
.subtitle { color: #59636e; margin-top: 0; }
table { border-collapse: collapse; font-size: 0.9rem; }
th, td { border: 1px solid #d0d7de; padding: 0.25rem 0.6rem; text-align: right; }
th { background: #f6f8fa; } td.key, th.key { text-align: left; }
.scroll { overflow-x: auto; overflow-y: auto; max-width: 100%; max-height: 40rem;
          margin: 0.5rem 0; }
.scroll th { white-space: nowrap; }
figure { margin: 1.5rem 0; } figcaption { color: #59636e; font-size: 0.9rem; }
img { max-width: 100%; height: auto; border: 1px solid #d0d7de; }
pre { background: #f6f8fa; padding: 1rem; overflow-x: auto; font-size: 0.85rem; }
.absent { color: #8c959f; }
"""


def write_report(run_dir: str | os.PathLike[str]) -> Path:
    """Write ``run_dir/report.html`` from ``run_dir/history.json`` and return its path.

    Plots that the history can draw (HISTORY_PLOTS) are created when missing; every PNG in
    the folder is embedded, so the page needs no other file. Every table sits in its own
    scrolling box, so a wide one never widens the page.
    """
    folder = Path(run_dir)
    if not (folder / HISTORY_FILE).is_file():
        raise DataError(
            f"{folder} has no {HISTORY_FILE}; pass the run folder that `pollinate run` wrote "
            "(the [run] output setting)"
        )
    history = read_history(folder / HISTORY_FILE)
    for name, plot in HISTORY_PLOTS:
        if not (folder / name).is_file():
            plot(history, folder)

    config = history.get("config", {})
    run = config.get("run", {}) if isinstance(config, Mapping) else {}
    run_name = run.get("name") if isinstance(run, Mapping) else None
    title = str(run_name) if run_name not in (None, "") else folder.resolve().name

    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_e(title)} — pollinate report</title>",
        f"<style>{_CSS}</style></head><body>",
        f"<h1>{_e(title)}</h1>",
        '<p class="subtitle">pollinate federated learning run report</p>',
        "<h2>Summary</h2>",
        _summary_table(history),
        "<h2>Plots</h2>",
        _plots(folder),
        "<h2>Rounds</h2>",
        _rounds_table(history),
        _failures(history),
        "<h2>Config</h2>",
        f"<pre>{_e(_config_text(config))}</pre>",
        "</body></html>",
    ]
    out = folder / REPORT_FILE
    with atomic_open(out) as handle:
        handle.write("\n".join(p for p in parts if p) + "\n")
    return out


def _scrolling(table: str) -> str:
    """``table`` in a box that scrolls (overflow: auto) when the table is wider than the page."""
    return f'<div class="scroll">{table}</div>'


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def _fmt(value: CellValue) -> str:
    """A table cell: None → an em dash; floats to 4 significant digits."""
    if value is None:
        return '<span class="absent">—</span>'
    if isinstance(value, float):
        return f"{value:.1f}" if abs(value) >= 1000 else f"{value:.4g}"
    return _e(value)


def _final_and_best(history: Mapping[str, Any], section: str) -> tuple[str, str]:
    rounds, values = metric_series(history, section, "accuracy")
    if not rounds:
        return "not computed", "not computed"
    best = max(range(len(values)), key=values.__getitem__)
    return (
        f"{values[-1]:.4f} (round {rounds[-1]})",
        f"{values[best]:.4f} (round {rounds[best]})",
    )


def _summary_table(history: Mapping[str, Any]) -> str:
    entries = history.get("rounds", [])
    train = [e.get("train") for e in entries if isinstance(e.get("train"), Mapping)]

    def counts(key: str) -> list[int]:
        return [int(t[key]) for t in train if isinstance(t.get(key), (int, float))]

    clients = counts("clients")
    if not clients:
        per_round = "not recorded"
    elif min(clients) == max(clients):
        per_round = str(clients[0])
    else:
        per_round = f"{min(clients)}–{max(clients)} (mean {sum(clients) / len(clients):.1f})"
    failures = [f"{sum(counts('failures'))} failed"] if counts("failures") else []
    failures += [f"{sum(counts(k))} {k}" for k in ("timeouts", "rejected") if counts(k)]
    walls = [float(e["wall_s"]) for e in entries if isinstance(e.get("wall_s"), (int, float))]
    central_final, central_best = _final_and_best(history, "centralized")
    federated_final, federated_best = _final_and_best(history, "federated")
    config = history.get("config")
    last = entries[-1] if entries else None
    step = step_label(history)
    rows = [
        *describe_experiment(config if isinstance(config, Mapping) else {}, last),
        (f"{step}s", str(len(entries))),
        ("final centralized accuracy", central_final),
        ("best centralized accuracy", central_best),
        ("final federated accuracy", federated_final),
        ("best federated accuracy", federated_best),
        (f"training clients per {step}", per_round),
        ("client failures (train)", ", ".join(failures) if failures else "none recorded"),
        ("total wall time", f"{max(walls):.1f} s" if walls else "not recorded"),
    ]
    body = "".join(
        f'<tr><th class="key">{_e(k)}</th><td class="key">{_e(v)}</td></tr>' for k, v in rows
    )
    return _scrolling(f'<table class="summary">{body}</table>')


def _rounds_table(history: Mapping[str, Any]) -> str:
    columns, rows = metrics_table(history)
    if not rows:
        return "<p>No rounds recorded.</p>"
    head = "".join(f"<th>{_e(c)}</th>" for c in columns)
    body = "".join(
        "<tr>" + "".join(f"<td>{_fmt(row.get(c))}</td>" for c in columns) + "</tr>" for row in rows
    )
    return _scrolling(f"<table><tr>{head}</tr>{body}</table>")


def _plots(folder: Path) -> str:
    known = [*(name for name, _ in HISTORY_PLOTS), PARTITIONS_PNG]
    others = sorted(p.name for p in folder.glob("*.png") if p.name not in known)
    figures = []
    for name in [*known, *others]:
        path = folder / name
        if not path.is_file():
            continue
        data = base64.b64encode(path.read_bytes()).decode("ascii")
        caption = _PLOT_TITLES.get(name, name)
        figures.append(
            f'<figure><img src="data:image/png;base64,{data}" alt="{_e(caption)}">'
            f"<figcaption>{_e(caption)}</figcaption></figure>"
        )
    return "\n".join(figures) if figures else "<p>No plots: no metric was recorded.</p>"


def _failures(history: Mapping[str, Any]) -> str:
    rows = []
    for entry in history.get("rounds", []):
        for failure in entry.get("failures") or []:
            if isinstance(failure, Mapping):
                rows.append((entry["round"], failure))
    if not rows:
        return ""
    shown = rows[:MAX_FAILURES_SHOWN]
    body = "".join(
        f"<tr><td>{_e(r)}</td><td>{_e(f.get('client_id', ''))}</td>"
        f'<td class="key">{_e(f.get("task", ""))}</td>'
        f'<td class="key">{_e(f.get("reason", ""))}</td></tr>'
        for r, f in shown
    )
    more = (
        f"<p>… and {len(rows) - len(shown)} more (see history.json).</p>"
        if len(rows) > len(shown)
        else ""
    )
    table = (
        f"<table><tr><th>{_e(step_label(history))}</th><th>client</th>"
        f'<th class="key">task</th><th class="key">reason</th></tr>{body}</table>'
    )
    return f"<h2>Client failures</h2>{_scrolling(table)}{more}"


def _config_text(config: object) -> str:
    """The resolved config in TOML-like form (returned unescaped; the caller escapes it)."""
    if not isinstance(config, Mapping) or not config:
        return "(no config recorded)"
    lines: list[str] = []

    def section(prefix: str, values: Mapping[str, Any]) -> None:
        scalars = [(k, v) for k, v in values.items() if not isinstance(v, Mapping)]
        tables = [(k, v) for k, v in values.items() if isinstance(v, Mapping)]
        if prefix and scalars:
            lines.append(f"\n[{prefix}]")
        for key, value in scalars:
            lines.append(f"{key} = {json.dumps(value, ensure_ascii=False, default=str)}")
        for key, value in tables:
            section(f"{prefix}.{key}" if prefix else str(key), value)

    section("", config)
    return "\n".join(lines).strip("\n")
