"""A session of queries from an analytics config, and its outputs: the pieces that
``pollinate analyze`` (``pollinate.experiment.run_analytics``, simulated clients) and
``pollinate server`` on an analytics config (``pollinate.deploy.serve_analytics``, connected
clients) share.

The outputs, in ``<run.output>/``: ``analytics.json`` (the config and, per query, its
answer: value, row count, the clients that answered or refused, ε spent so far) and one
``<query>.png`` per histogram.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from pollinate.analytics.config import AnalyticsConfig, secure_config
from pollinate.analytics.dp import PrivacySession
from pollinate.analytics.query import Query
from pollinate.analytics.runner import QueryRunner, TableClientFn, refused_record
from pollinate.analytics.tables import load_tables
from pollinate.errors import PollinateError
from pollinate.types import ClientId

log = logging.getLogger("pollinate")

ANALYTICS_JSON = "analytics.json"


def client_tables(cfg: AnalyticsConfig) -> list[Any]:
    """The clients' tables the config describes (one DataFrame per client)."""
    d = cfg.data
    if d.dataset.startswith(("csv:", "parquet:")):
        return load_tables(d.dataset, d.num_clients)
    return load_tables(
        d.dataset, d.num_clients, d.partition, cfg.run.seed, d.partition_by or None, d.alpha
    )


def client_fn(cfg: AnalyticsConfig, tables: Sequence[Any] | Mapping[int, Any]) -> Any:
    """The clients' ``client_fn``: tables under the config's policy, masked with SecAgg+
    when the config enables it."""
    fn: Any = TableClientFn(tables, cfg.policy_object())
    if cfg.secure_aggregation.enabled:
        from pollinate.privacy.secure import SecureClient

        fn = SecureClient(fn)
    return fn


def make_runner(cfg: AnalyticsConfig, executor: Any, run_tag: str | None = None) -> QueryRunner:
    """A ``QueryRunner`` with the config's secure aggregation and privacy session."""
    secure = None
    if cfg.secure_aggregation.enabled:
        from pollinate.privacy.secure import SecureAggregation

        secure = SecureAggregation(secure_config(cfg), max_weight=0, run_tag=run_tag)
    session = None
    if cfg.private():
        budget = cfg.privacy.max_epsilon or math.inf
        session = PrivacySession(budget, cfg.privacy.delta, cfg.privacy.accountant)
    return QueryRunner(executor, secure=secure, session=session, require_dp=cfg.privacy.require_dp)


def run_queries(
    cfg: AnalyticsConfig, runner: QueryRunner, clients: Sequence[ClientId], quiet: bool = False
) -> list[dict[str, Any]]:
    """Every query of the config, in order; progress on stderr unless ``quiet``."""
    answers = []
    for i, query in enumerate(cfg.queries, start=1):
        started = time.monotonic()
        record = _run_one(cfg, runner, query, clients)
        record["wall_s"] = round(time.monotonic() - started, 4)
        answers.append(record)
        if not quiet:
            log.info("query %d/%d %s: %s", i, len(cfg.queries), query.name, _short(record))
    return answers


def _run_one(
    cfg: AnalyticsConfig, runner: QueryRunner, query: Query, clients: Sequence[ClientId]
) -> dict[str, Any]:
    """One query; first its groups, asked of the clients, when the config lists none."""
    if query.name not in cfg.discover:
        return runner.run(query, clients)
    try:
        query, refused = runner.discover_groups(query, clients)
    except PollinateError as exc:
        return refused_record(query, str(exc), None)
    record = runner.run(query, clients)
    record["groups_discovered"] = True
    for cid, why in refused.items():
        record.setdefault("refused", {}).setdefault(cid, f"listing groups: {why}")
    return record


def write_outputs(cfg: AnalyticsConfig, answers: list[dict[str, Any]]) -> Path:
    """``analytics.json`` and the histogram plots; returns the JSON's path."""
    from pollinate.report.files import write_json_atomic

    out = cfg.output_dir
    out.mkdir(parents=True, exist_ok=True)
    path = write_json_atomic(out / ANALYTICS_JSON, {"config": cfg.to_dict(), "answers": answers})
    for record in answers:
        if record.get("statistic") == "histogram" and record.get("value") is not None:
            plot_histogram(record, out / f"{_safe(record['query'])}.png")
    return path


def format_table(answers: list[dict[str, Any]]) -> str:
    """The answers as an aligned text table: query, statistic, value, rows, clients, ε."""
    head = ("query", "statistic", "value", "rows", "answered", "refused", "ε")
    rows = [head]
    for a in answers:
        eps = a.get("epsilon")
        rows.append(
            (
                str(a.get("query", "")),
                str(a.get("statistic", "")),
                _value_text(a),
                _compact(a.get("rows")),
                str(len(a.get("answered", []))),
                str(len(a.get("refused", {}))),
                "-" if eps is None else f"{eps:.3g}",
            )
        )
    widths = [min(60, max(len(r[i]) for r in rows)) for i in range(len(head))]
    lines = ["  ".join(cell[:60].ljust(w) for cell, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    refusals = [
        f"  {a['query']}: client {cid} refused: {why}"
        for a in answers
        for cid, why in sorted(a.get("refused", {}).items())
    ]
    reasons = [f"  {a['query']}: {a['reason']}" for a in answers if a.get("reason")]
    return "\n".join(lines + refusals + reasons)


def plot_histogram(record: dict[str, Any], path: Path) -> Path:
    """A bar chart of a histogram answer (one bar series per group)."""
    import numpy as np
    from matplotlib.figure import Figure

    from pollinate.report.plots import _save

    fig = Figure(figsize=(8, 4.5), layout="constrained")
    ax = fig.add_subplot()
    value = record["value"]
    series = value if "groups" in record else {"all": value}
    items = [(k, v) for k, v in series.items() if isinstance(v, dict)]
    width = 0.8 / max(1, len(items))
    for i, (group, hist) in enumerate(items):
        edges = np.asarray(hist["edges"], dtype=float)
        centres = np.arange(len(edges) - 1)
        label = f"{record['group_by']} = {group}" if "groups" in record else group
        ax.bar(centres + (i - (len(items) - 1) / 2) * width, hist["counts"], width, label=label)
        ax.set_xticks(centres, [f"{a:g}–{b:g}" for a, b in zip(edges[:-1], edges[1:])])
    title = f"{record['query']}: {record.get('column', '')}"
    if record.get("group_by"):
        title += f" by {record['group_by']}"
    ax.set_title(title)
    ax.set_ylabel("rows")
    ax.grid(True, axis="y", alpha=0.3)
    if len(items) > 1:
        ax.legend(fontsize="small")
    return _save(fig, path)


def _value_text(a: dict[str, Any]) -> str:
    value = a.get("value")
    if value is None:
        return "refused" if a.get("reason") else "-"
    if a.get("statistic") == "histogram":
        if "groups" in a:
            return "; ".join(f"{g}: {v['counts']}" for g, v in value.items() if v)
        return str(value["counts"])
    return _compact(value)


def _compact(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, dict):
        return ", ".join(f"{k}: {_compact(v)}" for k, v in value.items())
    return "-" if value is None else str(value)


def _short(record: dict[str, Any]) -> str:
    text = _value_text(record)
    return text if len(text) <= 80 else text[:77] + "..."


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in name) or "query"
