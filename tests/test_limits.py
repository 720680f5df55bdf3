"""Tests for pollinate.limits: bounds on a result's metrics and on what is stored of them."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pollinate.limits import (
    DEFAULT_MAX_METRICS_BYTES,
    DEFAULT_MAX_METRICS_KEYS,
    check_metrics,
    clip_strings,
    clip_text,
    metrics_bytes,
)


def test_metrics_bytes_is_the_compact_json_size_in_utf8() -> None:
    assert metrics_bytes({}) == 2  # {}
    assert metrics_bytes({"a": 1}) == len('{"a":1}')
    assert metrics_bytes({"é": "ü"}) == len('{"é":"ü"}'.encode())  # 2 bytes each
    assert metrics_bytes({"x": np.float32(0.5), "n": np.int64(3)}) == len('{"x":0.5,"n":3}')


def test_within_the_bounds_passes_at_the_exact_limits() -> None:
    metrics = {f"k{i}": i for i in range(4)}
    size = len(json.dumps(metrics, separators=(",", ":")))
    assert check_metrics(metrics, max_keys=4, max_bytes=size) is None
    assert check_metrics({}, max_keys=0, max_bytes=2) is None


def test_too_many_keys_or_bytes_says_which_and_how_to_fix() -> None:
    metrics = {f"k{i}": i for i in range(5)}
    reason = check_metrics(metrics, max_keys=4, max_bytes=10_000)
    assert reason is not None and "5 keys, more than the 4 allowed" in reason
    assert "max_metrics_keys" in reason
    long = {"loss": 0.1, "note": "x" * 100}
    reason = check_metrics(long, max_keys=10, max_bytes=50)
    assert reason is not None and f"take {metrics_bytes(long)} bytes" in reason
    assert "50 allowed" in reason and "'note'" in reason and "max_metrics_bytes" in reason
    with pytest.raises(ValueError, match="bounds must be >= 0"):
        check_metrics({}, -1, 10)


def test_the_defaults_leave_room_for_secure_aggregation_messages() -> None:
    # SecAgg+ sends its shares as one metric string, ~225 bytes per neighbour
    shares = {"secagg_message": "s" * (225 * 1000)}  # 1,000 neighbours
    assert check_metrics(shares, DEFAULT_MAX_METRICS_KEYS, DEFAULT_MAX_METRICS_BYTES) is None


def test_clip_text_and_clip_strings() -> None:
    assert clip_text("short", 10) == "short"
    assert clip_text("abcdefghij", 10) == "abcdefghij"
    assert clip_text("abcdefghijk", 10) == "abcdefghi…"
    with pytest.raises(ValueError):
        clip_text("x", 0)
    metrics = {"note": "y" * 500, "acc": 0.9, "ok": True, "k" * 300: 1, "k" * 301: 2}
    clipped = clip_strings(metrics, max_chars=8)
    assert clipped == {"note": "yyyyyyy…", "acc": 0.9, "ok": True, "kkkkkkk…": 1}
    assert metrics["note"] == "y" * 500  # a copy: the input is unchanged
