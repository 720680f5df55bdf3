"""Bounds on what one client's result may carry besides its Arrays, and on what is kept of it.

A client's Metrics are its own to fill, so one client could otherwise send a million keys or
a gigabyte string and have the server hold it, write it into every round of ``history.json``
and its state database. Two bounds, each a plain function so that every runtime applies the
same rule:

- :func:`check_metrics` refuses a result whose metrics have more than ``max_keys`` keys or
  take more than ``max_bytes`` as compact JSON (UTF-8). Refused, not truncated: a cut value
  would be a wrong value, and the reason says what to change. The deployment transport
  applies it to every result (``FleetServer(max_metrics_keys=..., max_metrics_bytes=...)``);
  its clients check first and report a failed task instead of sending.
- :func:`clip_strings` shortens long string values for what is *stored* (the round record),
  marking the cut with ``…``. The default byte bound is large because SecAgg+ carries its
  protocol messages as metrics (about 225 bytes per neighbour in the shares stage); those
  never reach the history, but a client's own string metrics would.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

__all__ = [
    "DEFAULT_MAX_METRICS_BYTES",
    "DEFAULT_MAX_METRICS_KEYS",
    "MAX_REASON_CHARS",
    "MAX_STORED_STRING_CHARS",
    "check_metrics",
    "clip_strings",
    "clip_text",
    "metrics_bytes",
]

DEFAULT_MAX_METRICS_KEYS = 256
DEFAULT_MAX_METRICS_BYTES = 1 << 20  # SecAgg+ shares: ~225 B per neighbour, ~4,600 neighbours
MAX_STORED_STRING_CHARS = 256  # a string metric as kept in the history
MAX_REASON_CHARS = 2000  # a failure's reason as kept in the history
ELLIPSIS = "…"


def metrics_bytes(metrics: Mapping[str, Any]) -> int:
    """The size of ``metrics`` as compact JSON in UTF-8 (how they travel and are stored)."""
    text = json.dumps(
        {str(k): _plain(v) for k, v in metrics.items()},
        separators=(",", ":"),
        ensure_ascii=False,
        allow_nan=True,
    )
    return len(text.encode("utf-8"))


def check_metrics(metrics: Mapping[str, Any], max_keys: int, max_bytes: int) -> str | None:
    """Why ``metrics`` exceed the bounds (None if they do not): more than ``max_keys`` keys,
    or more than ``max_bytes`` bytes as compact JSON."""
    if max_keys < 0 or max_bytes < 0:
        raise ValueError(f"bounds must be >= 0, got max_keys={max_keys}, max_bytes={max_bytes}")
    if len(metrics) > max_keys:
        return (
            f"the metrics have {len(metrics)} keys, more than the {max_keys} allowed per "
            "result: report fewer metrics (or raise the server's max_metrics_keys)"
        )
    size = metrics_bytes(metrics)
    if size > max_bytes:
        longest = max(metrics, key=lambda k: _length(metrics[k]), default=None)
        hint = f" (the largest value is {longest!r})" if longest is not None else ""
        return (
            f"the metrics take {size} bytes as JSON, more than the {max_bytes} allowed per "
            f"result{hint}: report shorter values (or raise the server's max_metrics_bytes)"
        )
    return None


def clip_text(text: str, max_chars: int = MAX_REASON_CHARS) -> str:
    """``text`` cut to at most ``max_chars`` characters, ending in ``…`` when cut."""
    if max_chars < 1:
        raise ValueError(f"max_chars must be >= 1, got {max_chars}")
    return text if len(text) <= max_chars else text[: max_chars - 1] + ELLIPSIS


def clip_strings(
    metrics: Mapping[str, Any], max_chars: int = MAX_STORED_STRING_CHARS
) -> dict[str, Any]:
    """A copy of ``metrics`` whose string values and keys are at most ``max_chars`` long
    (of two keys that clip to the same text, the first is kept)."""
    out: dict[str, Any] = {}
    for k, v in metrics.items():
        out.setdefault(
            clip_text(str(k), max_chars), clip_text(v, max_chars) if isinstance(v, str) else v
        )
    return out


def _plain(value: Any) -> Any:
    item = getattr(value, "item", None)  # NumPy scalars
    return item() if callable(item) else value


def _length(value: Any) -> int:
    if isinstance(value, str):
        return len(value)
    if isinstance(value, float) and not math.isfinite(value):
        return 9
    return len(str(value))
