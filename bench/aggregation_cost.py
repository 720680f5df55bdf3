"""Aggregation cost: pollinate's aggregators against NumPy doing the same reduction directly.

One round's aggregation of n client updates of P float32 parameters (one flat array; the
aggregators see it as a one-array model). pollinate side: ``acc = agg.start(template,
capacity=n)``, ``acc.add(update, weight)`` for each client as it would arrive, then
``acc.result()``; the time of the ``add`` calls and of ``result()`` are summed (making each
update, outside the timer, is not counted). Aggregators from ``pollinate.strategy.aggregators``:

- mean: ``WeightedMean()`` (streaming, float64 running sum) against
  ``np.average(stack, axis=0, weights=w)``;
- median: ``Median(dtype="float32")`` against ``np.median(stack, axis=0)``;
- trimmed: ``TrimmedMean(beta=0.1, dtype="float32")`` against
  ``np.sort(stack, axis=0)[b:n-b].mean(axis=0)``, b = ⌊0.1 n⌋;
- krum: ``Krum(f, dtype="float32")`` against a Gram-matrix Krum: ``stack @ stack.T`` (BLAS,
  float32) → squared distances → Krum scores → the best row;
- multikrum: ``MultiKrum(f, dtype="float32")`` (m = n − f) against the same scores and the
  weighted mean of the m best rows;
- bulyan: ``Bulyan(f, dtype="float32")`` against the same distances, Krum n − 2f times, then
  per coordinate the mean of the β = n − 4f selected values nearest their median;

with f = max(1, ⌊n/10⌋) (10% malicious assumed; Bulyan needs n >= 4f + 3). Weights are
example counts drawn from 100..1000. The NumPy side is handed the stack already built and
times only the reduction; pollinate's time includes copying each update into its matrix
(or running sum), which is the work a server does as results arrive.

**Peak memory** is measured with ``tracemalloc`` (NumPy registers its array buffers with it):
the peak of traced allocations during the aggregation above the level before it, so it
counts pollinate's (n, P) matrix, its running sums and its scratch blocks, and NumPy's
temporaries; the NumPy column adds the stack it was handed (n·P·4 bytes), so both columns
count one copy of all the updates. BLAS's internal buffers are not traced.

The ratio printed is pollinate / NumPy for time and for peak memory, in the same run; the
largest difference between the two results (``max |Δ|``) shows they computed the same thing.

    python bench/aggregation_cost.py                          # 10x1M, 100x1M, 1000x100k
    python bench/aggregation_cost.py --sizes 1000x1000000     # 4 GB per copy: 8+ GB peak
    python bench/aggregation_cost.py --stream-only 1000x1000000   # pollinate's mean alone
    python bench/aggregation_cost.py --smoke                  # tests
"""

from __future__ import annotations

import argparse
import gc
import math
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import common as c
import numpy as np

DEFAULT_SIZES = "10x1000000,100x1000000,1000x100000"
ROWS = ("mean", "median", "trimmed", "krum", "multikrum", "bulyan")
BETA = 0.1  # trimmed mean: cut at each end
POOL = 32  # random vectors the updates are made from (K)


def malicious(n: int) -> int:
    return max(1, n // 10)


# --- NumPy references ---------------------------------------------------------------------------


def np_distances(stack: np.ndarray) -> np.ndarray:
    """Squared distances from the Gram matrix of the float32 stack (BLAS sgemm)."""
    gram = (stack @ stack.T).astype(np.float64)
    sq = np.diag(gram)
    return np.maximum(sq[:, None] + sq[None, :] - 2.0 * gram, 0.0)


def np_krum_order(dist: np.ndarray, f: int) -> np.ndarray:
    n = dist.shape[0]
    closest = min(n - 1, max(1, n - f - 2))
    d = dist + np.diag(np.full(n, np.inf))
    scores = np.sort(d, axis=1)[:, :closest].sum(axis=1)
    return np.lexsort((dist.sum(axis=1), scores))  # ties: as pollinate breaks them


def np_bulyan(stack: np.ndarray, f: int) -> np.ndarray:
    n = stack.shape[0]
    dist = np_distances(stack)
    remaining = np.arange(n)
    selected = []
    for _ in range(n - 2 * f):
        best = np_krum_order(dist[np.ix_(remaining, remaining)], f)[0]
        selected.append(remaining[best])
        remaining = np.delete(remaining, best)
    ordered = np.sort(stack[selected], axis=0)
    theta = len(selected)
    beta = theta - 2 * f
    median = (ordered[(theta - 1) // 2] + ordered[theta // 2]) / 2.0
    reach = np.maximum(median - ordered[: theta - beta + 1], ordered[beta - 1 :] - median)
    start = np.argmin(reach, axis=0)
    window = start + np.arange(beta)[:, None]
    return np.take_along_axis(ordered, window, axis=0).mean(axis=0)


def numpy_reduce(row: str, stack: np.ndarray, w: np.ndarray) -> np.ndarray:
    n = stack.shape[0]
    f = malicious(n)
    if row == "mean":
        return np.average(stack, axis=0, weights=w)
    if row == "median":
        return np.median(stack, axis=0)
    if row == "trimmed":
        b = math.floor(BETA * n)
        return np.sort(stack, axis=0)[b : n - b].mean(axis=0)
    if row == "krum":
        return stack[np_krum_order(np_distances(stack), f)[0]]
    if row == "multikrum":
        chosen = np_krum_order(np_distances(stack), f)[: n - f]
        return (w[chosen] @ stack[chosen]) / w[chosen].sum()
    if row == "bulyan":
        return np_bulyan(stack, f)
    raise ValueError(row)


def pollinate_aggregator(row: str, n: int) -> Any:
    from pollinate.strategy import aggregators as agg

    f = malicious(n)
    return {
        "mean": lambda: agg.WeightedMean(),
        "median": lambda: agg.Median(dtype="float32"),
        "trimmed": lambda: agg.TrimmedMean(beta=BETA, dtype="float32"),
        "krum": lambda: agg.Krum(num_malicious=f, dtype="float32"),
        "multikrum": lambda: agg.MultiKrum(num_malicious=f, dtype="float32"),
        "bulyan": lambda: agg.Bulyan(num_malicious=f, dtype="float32"),
    }[row]()


# --- measuring -----------------------------------------------------------------------------------


class Updates:
    """n distinct float32 updates of P parameters, made on demand from a random pool of K
    vectors: update i = (pool[i mod K] + 0.3·pool[⌊i/K⌋ mod K])·(1 + i·1e-4). Rows are far
    apart from each other (no near-ties for Krum to break differently in float32) and cheap
    to make (no random draws per update)."""

    def __init__(self, n: int, p: int, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        self.n, self.p = n, p
        k = min(POOL, n)
        self.pool = rng.standard_normal((k, p), dtype=np.float32) * np.float32(0.01)
        self.weights = rng.integers(100, 1001, size=n).astype(np.float64)

    def update(self, i: int) -> np.ndarray:
        k = len(self.pool)
        out = self.pool[(i // k) % k] * np.float32(0.3)
        out += self.pool[i % k]
        out *= np.float32(1 + i * 1e-4)
        return out

    def stack(self) -> np.ndarray:
        out = np.empty((self.n, self.p), dtype=np.float32)
        for i in range(self.n):
            out[i] = self.update(i)
        return out


def traced(fn: Callable[[], Any]) -> tuple[Any, float, int]:
    """``fn()``'s result, wall seconds and tracemalloc peak above the level before it."""
    gc.collect()
    tracemalloc.reset_peak()
    base = tracemalloc.get_traced_memory()[0]
    start = time.perf_counter()
    out = fn()
    seconds = time.perf_counter() - start
    return out, seconds, tracemalloc.get_traced_memory()[1] - base


def run_pollinate(row: str, updates: Updates) -> tuple[np.ndarray, float, float, int]:
    """(result, add seconds, result seconds, peak bytes) of one streaming aggregation."""
    aggregator = pollinate_aggregator(row, updates.n)
    gc.collect()
    tracemalloc.reset_peak()
    base = tracemalloc.get_traced_memory()[0]
    acc = aggregator.start([np.empty(updates.p, np.float32)], capacity=updates.n)
    add_s = 0.0
    for i in range(updates.n):
        u = updates.update(i)  # made outside the timer (its bytes are traced: subtracted below)
        start = time.perf_counter()
        acc.add([u], float(updates.weights[i]))
        add_s += time.perf_counter() - start
        del u
    start = time.perf_counter()
    (out,) = acc.result()
    result_s = time.perf_counter() - start
    peak = tracemalloc.get_traced_memory()[1] - base - updates.p * 4  # less the one update
    del acc
    return out, add_s, result_s, peak


def measure(row: str, updates: Updates, repeats: int, stack: np.ndarray | None) -> dict[str, Any]:
    best_p: tuple[float, float, float] | None = None
    best_np: float | None = None
    peak_p = peak_np = 0
    diff = float("nan")
    for _ in range(repeats):
        out_p, add_s, result_s, peak = run_pollinate(row, updates)
        peak_p = max(peak_p, peak)
        if best_p is None or add_s + result_s < best_p[0]:
            best_p = (add_s + result_s, add_s, result_s)
        if stack is not None:
            out_np, seconds, peak = traced(lambda: numpy_reduce(row, stack, updates.weights))
            peak_np = max(peak_np, peak + stack.nbytes)
            best_np = seconds if best_np is None else min(best_np, seconds)
            diff = float(np.max(np.abs(out_p.astype(np.float64) - out_np)))
        del out_p
    assert best_p is not None
    return {
        "row": row,
        "n": updates.n,
        "p": updates.p,
        "f": malicious(updates.n) if row not in ("mean", "median", "trimmed") else None,
        "pollinate_s": best_p[0],
        "pollinate_add_s": best_p[1],
        "pollinate_result_s": best_p[2],
        "numpy_s": best_np,
        "pollinate_peak_mib": peak_p / 2**20,
        "numpy_peak_mib": peak_np / 2**20 if stack is not None else None,
        "max_abs_diff": diff,
        "repeats": repeats,
    }


def fmt_ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}×" if a is not None and b else "–"


def table(results: list[dict[str, Any]]) -> str:
    lines = [
        "| n × P | aggregator | pollinate s (add + result) | NumPy s | time ratio "
        "| pollinate peak MiB | NumPy peak MiB (stack incl.) | memory ratio | max abs diff |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        name = r["row"] + (f" (f={r['f']})" if r["f"] else "")
        np_s = f"{r['numpy_s']:.3f}" if r["numpy_s"] is not None else "–"
        np_mem = f"{r['numpy_peak_mib']:.0f}" if r["numpy_peak_mib"] is not None else "–"
        lines.append(
            f"| {r['n']:,} × {r['p']:,} | {name} | {r['pollinate_s']:.3f} "
            f"({r['pollinate_add_s']:.3f} + {r['pollinate_result_s']:.3f}) | {np_s} | "
            f"{fmt_ratio(r['pollinate_s'], r['numpy_s'])} | {r['pollinate_peak_mib']:.0f} | "
            f"{np_mem} | {fmt_ratio(r['pollinate_peak_mib'], r['numpy_peak_mib'])} | "
            f"{r['max_abs_diff']:.2g} |"
        )
    return "\n".join(lines)


def parse_sizes(text: str) -> list[tuple[int, int]]:
    sizes = []
    for item in text.split(","):
        if item:
            n, _, p = item.partition("x")
            sizes.append((int(n), int(p)))
    return sizes


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", default=DEFAULT_SIZES, help=f"n x P list ({DEFAULT_SIZES})")
    parser.add_argument(
        "--stream-only",
        default="",
        help="n x P list for which only pollinate's streaming mean runs (no (n, P) stack)",
    )
    parser.add_argument("--rows", default=",".join(ROWS), help=f"of {', '.join(ROWS)}")
    parser.add_argument("--repeats", type=int, default=2, help="best of (2)")
    parser.add_argument("--smoke", action="store_true", help="10x1000 and 40x500, 1 repeat")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    if args.smoke:
        args.sizes, args.stream_only, args.repeats = "10x1000,40x500", "50x1000", 1
    rows = [r for r in args.rows.split(",") if r]
    for r in rows:
        if r not in ROWS:
            parser.error(f"unknown row {r!r}; use {', '.join(ROWS)}")

    info = c.machine()
    c.say(
        "Aggregation cost: one round, n float32 updates of P parameters; pollinate's streaming "
        "aggregators against NumPy on the stacked (n, P) array; peak memory by tracemalloc"
    )
    c.say(c.describe_machine(info))
    for row in rows:  # warm-up: first calls (imports, BLAS set-up) are not timed
        measure(row, Updates(20, 1000), 1, Updates(20, 1000).stack())
    tracemalloc.start()
    results: list[dict[str, Any]] = []
    payload: dict[str, Any] = {"workload": "aggregation_cost", "machine": info, "results": results}
    for n, p in parse_sizes(args.sizes):
        updates = Updates(n, p)
        stack = updates.stack()
        for row in rows:
            r = measure(row, updates, args.repeats, stack)
            results.append(r)
            c.write_json(args.json, payload)
            c.say(
                f"  {n} x {p} {row:9s}: pollinate {r['pollinate_s']:.3f} s "
                f"(add {r['pollinate_add_s']:.3f}, result {r['pollinate_result_s']:.3f}), "
                f"numpy {r['numpy_s']:.3f} s, peak {r['pollinate_peak_mib']:.0f} / "
                f"{r['numpy_peak_mib']:.0f} MiB, max |Δ| {r['max_abs_diff']:.2g}, "
                f"load {c.load()[0]:.2f}"
            )
        del stack
    for n, p in parse_sizes(args.stream_only):
        r = measure("mean", Updates(n, p), args.repeats, None)
        results.append(r)
        c.say(
            f"  {n} x {p} mean (streaming only): {r['pollinate_s']:.3f} s, peak "
            f"{r['pollinate_peak_mib']:.0f} MiB (all updates stacked: {n * p * 4 / 2**20:.0f} MiB)"
        )
    tracemalloc.stop()
    info["load_after"] = c.load()
    c.say(f"load after: {info['load_after']}")
    c.say(table(results))
    c.write_json(args.json, payload)
    return payload


if __name__ == "__main__":
    main()
