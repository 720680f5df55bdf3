"""Privacy: what SecAgg+ costs against plain aggregation, per client and on the server.

One round of ``pollinate.privacy.secagg`` driven directly (all clients in this process, no
transport: the point is the protocol's cost) for a model of 1,000,000 float32 parameters
(one array) and n clients. ``SecAggConfig`` defaults (threshold 0.6 of the neighbours,
clip_range 8, quantization_bits 22, modulus_bits 32) except ``neighbours``, set to the
SecAgg+ regime k = min(n − 1, 2·⌈log2 n⌉) (``plan()`` keeps it: it is even). Each client's
input is a float32 update of N(0, 0.01²) coordinates.

Measured per n:

- client: ``client_keys`` + ``client_shares`` + ``client_mask`` + ``client_unmask`` of one
  client (the median over all n clients; every client runs, or the sum would not unmask)
  against the plain client's cost, serializing its float32 update (``pollinate.serde.dumps``);
- server: every ``SecAggServer`` call (routing: ``add_keys``, ``neighbours_public``,
  ``add_shares``, ``shares_for``, ``unmask_request``, ``add_reveal``; ``add_masked`` for all
  n; ``result``) against plain aggregation (``WeightedMean.add`` for all n + ``result``,
  the median of 3);
- bytes each client sends: its masked vector as it travels today (``serde.dumps`` of the
  uint64 array: modulus_bits = 32 values in 64-bit words) plus its key, share and reveal
  messages as ``SecureClient`` sends them (JSON of base64), against ``serde.dumps`` of the
  float32 update; and what the masked vector would take packed to modulus_bits;
- the server again when 10% of the clients drop after sharing their secrets (the server then
  rebuilds each dropped client's mask key and regenerates its pairwise masks with every
  surviving neighbour).

    python bench/secagg_cost.py                  # n = 10, 100, 500 (about 3-5 min on 2 cores)
    python bench/secagg_cost.py --quick          # n = 10, 50 and 100,000 parameters
    python bench/secagg_cost.py --clients 10,100 --length 250000
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import common as c
import numpy as np

DEFAULT_CLIENTS = "10,100,500"
DEFAULT_LENGTH = 1_000_000
QUICK_CLIENTS = "10,50"
QUICK_LENGTH = 100_000
DROP_FRACTION = 0.1
POOL = 4  # distinct input vectors (client u sends pool[u % POOL]): inputs cost no time

T = TypeVar("T")


class Clock:
    """Accumulates seconds per (who, what) for the calls it wraps."""

    def __init__(self) -> None:
        self.seconds: dict[tuple[Any, str], float] = defaultdict(float)

    def __call__(self, who: Any, what: str, fn: Callable[..., T], *args: Any) -> T:
        start = time.perf_counter()
        out = fn(*args)
        self.seconds[(who, what)] += time.perf_counter() - start
        return out

    def total(self, who: Any, whats: tuple[str, ...] | None = None) -> float:
        return sum(
            s
            for (w, what), s in self.seconds.items()
            if w == who and (whats is None or what in whats)
        )


def k_for(n: int) -> int:
    """SecAgg+'s logarithmic neighbourhood: k = min(n − 1, 2·⌈log2 n⌉)."""
    return min(n - 1, 2 * math.ceil(math.log2(n)))


def json_bytes(mapping: dict[int, str]) -> int:
    """Size of a stage message as ``SecureClient`` sends it (JSON, ids as strings)."""
    return len(json.dumps({str(k): v for k, v in mapping.items()}).encode())


def secagg_round(n: int, pool: list[np.ndarray], dropped: set[int], seed: int) -> dict[str, Any]:
    """One SecAgg+ round for clients 0..n-1; ``dropped`` share their secrets, then vanish."""
    from pollinate import serde
    from pollinate.privacy.secagg import (
        SecAggConfig,
        SecAggServer,
        client_keys,
        client_mask,
        client_shares,
        client_unmask,
    )

    config = SecAggConfig(neighbours=k_for(n))
    ids = list(range(n))
    tag = f"bench:{n}:{len(dropped)}".encode()
    clock = Clock()
    S = "server"
    server = clock(S, "init", SecAggServer, config, ids, tag, np.random.default_rng(seed))
    sent: dict[int, dict[str, int]] = defaultdict(dict)
    received: dict[int, dict[str, int]] = defaultdict(dict)
    states = {}
    # 1. keys
    for u in ids:
        states[u], public = clock(u, "keys", client_keys, tag)
        sent[u]["keys"] = len(public.encode())
        clock(S, "route", server.add_keys, u, public)
    # 2. shares
    for u in ids:
        peers = clock(S, "route", server.neighbours_public, u)
        received[u]["keys"] = json_bytes(peers)
        shares = clock(u, "shares", client_shares, states[u], u, peers, server.t)
        sent[u]["shares"] = json_bytes(shares)
        clock(S, "route", server.add_shares, u, shares)
    # 3. masked inputs (the dropped clients never send theirs)
    masked_bytes = 0
    for u in ids:
        if u in dropped:
            continue
        addressed = clock(S, "route", server.shares_for, u)
        received[u]["shares"] = json_bytes(addressed)
        y = clock(u, "mask", client_mask, states[u], u, addressed, pool[u % POOL], config)
        encoded = clock(u, "encode", serde.dumps, [y])
        sent[u]["masked"] = masked_bytes = len(encoded)
        clock(S, "add_masked", server.add_masked, u, y)
    # 4. unmask
    alive, gone = clock(S, "route", server.unmask_request)
    request = len(json.dumps({"survivors": alive, "dropped": gone}).encode())
    for u in alive:
        received[u]["unmask"] = request
        revealed = clock(u, "unmask", client_unmask, states[u], u, alive, gone)
        sent[u]["unmask"] = json_bytes(revealed)
        clock(S, "route", server.add_reveal, u, revealed)
    total = clock(S, "result", server.result)

    # the sum must be right: within count · quantum / 2 of the true sum of the inputs
    counts = np.bincount([u % POOL for u in alive], minlength=POOL)
    expected = sum(int(k) * pool[i].astype(np.float64) for i, k in enumerate(counts))
    error = float(np.abs(total - expected).max())
    bound = len(alive) * config.quantum() / 2 + 1e-9
    if error > bound:
        raise AssertionError(f"n={n}: SecAgg+ sum off by {error:.3g} > bound {bound:.3g}")

    stages = ("keys", "shares", "mask", "unmask")
    per_client = [clock.total(u, stages) for u in alive]
    messages = [sent[u]["keys"] + sent[u]["shares"] + sent[u]["unmask"] for u in alive]
    return {
        "n": n,
        "k": server.k,
        "t": server.t,
        "survivors": len(alive),
        "dropped": len(gone),
        "client_s_median": statistics.median(per_client),
        "client_s_max": max(per_client),
        "client_stage_s_median": {
            s: statistics.median(clock.total(u, (s,)) for u in alive) for s in stages
        },
        "client_encode_s_median": statistics.median(clock.total(u, ("encode",)) for u in alive),
        "server_s": clock.total(S),
        "server_parts_s": {
            what: clock.total(S, (what,)) for what in ("init", "route", "add_masked", "result")
        },
        "masked_bytes": masked_bytes,
        "message_bytes_median": int(statistics.median(messages)),
        "message_bytes_max": max(messages),
        "received_message_bytes_median": int(
            statistics.median(sum(received[u].values()) for u in alive)
        ),
        "packed_bytes": math.ceil(len(pool[0]) * config.modulus_bits / 8),
        "max_abs_error": error,
        "error_bound": bound,
    }


def plain_client(pool: list[np.ndarray], repeats: int = 21) -> tuple[float, int]:
    """Median seconds to serialize one float32 update, and its size in bytes."""
    from pollinate import serde

    times = []
    for i in range(repeats):
        start = time.perf_counter()
        payload = serde.dumps([pool[i % POOL]])
        times.append(time.perf_counter() - start)
    return statistics.median(times), len(payload)


def plain_server(n: int, pool: list[np.ndarray], repeats: int = 3) -> float:
    """Median seconds for FedAvg's plain aggregation of n updates (WeightedMean, + result)."""
    from pollinate.strategy.aggregators import WeightedMean

    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        acc = WeightedMean().start([pool[0]])
        for u in range(n):
            acc.add([pool[u % POOL]], 1.0)
        acc.result()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def mib(b: float) -> str:
    return f"{b / 2**20:.2f} MiB"


def table(rows: list[dict[str, Any]], plain_bytes: int) -> str:
    lines = [
        "| n | k | t | client SecAgg+ ms | client plain ms | client ratio | server SecAgg+ ms "
        "| server plain ms | server ratio | server SecAgg+ ms, 10% dropped | ratio to plain "
        "| bytes sent SecAgg+ (uint64) | bytes plain | bytes ratio | bytes if packed to 32 bits "
        "| packed ratio |",
        "|" + " ---: |" * 16,
    ]
    for r in rows:
        full, drop = r["full"], r.get("drop")
        sent = full["masked_bytes"] + full["message_bytes_median"]
        packed = full["packed_bytes"] + full["message_bytes_median"]
        drop_s = f"{drop['server_s'] * 1e3:,.1f}" if drop else "–"
        drop_ratio = f"{drop['server_s'] / r['plain_server_drop_s']:.1f}×" if drop else "–"
        lines.append(
            f"| {r['n']} | {full['k']} | {full['t']} | {full['client_s_median'] * 1e3:.1f} | "
            f"{r['plain_client_s'] * 1e3:.2f} | "
            f"{full['client_s_median'] / r['plain_client_s']:.0f}× | "
            f"{full['server_s'] * 1e3:,.1f} | {r['plain_server_s'] * 1e3:,.1f} | "
            f"{full['server_s'] / r['plain_server_s']:.1f}× | {drop_s} | {drop_ratio} | "
            f"{sent:,} | {plain_bytes:,} | {sent / plain_bytes:.2f}× | {packed:,} | "
            f"{packed / plain_bytes:.2f}× |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--clients", help=f"comma-separated n ({DEFAULT_CLIENTS})")
    parser.add_argument("--length", type=int, help=f"parameters ({DEFAULT_LENGTH:,})")
    parser.add_argument(
        "--quick", action="store_true", help=f"n = {QUICK_CLIENTS}, {QUICK_LENGTH:,} parameters"
    )
    parser.add_argument("--no-dropout", action="store_true", help="skip the 10%%-dropout runs")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    clients = [
        int(x)
        for x in (args.clients or (QUICK_CLIENTS if args.quick else DEFAULT_CLIENTS)).split(",")
        if x.strip()
    ]
    length = args.length or (QUICK_LENGTH if args.quick else DEFAULT_LENGTH)

    from pollinate.privacy.secagg import SecAggConfig

    info = c.machine()
    d = SecAggConfig()
    c.say(
        f"SecAgg+ cost: {length:,} float32 parameters, n = {clients}, k = min(n − 1, "
        f"2·⌈log2 n⌉), threshold {d.threshold} of k, clip_range {d.clip_range}, "
        f"quantization_bits {d.quantization_bits}, modulus_bits {d.modulus_bits}; all clients "
        "in one process, no transport"
    )
    c.say(c.describe_machine(info))
    rng = np.random.default_rng(0)
    pool = [rng.normal(0.0, 0.01, length).astype(np.float32) for _ in range(POOL)]
    # untimed warm-up: the first calls of a process pay one-time costs (cryptography's
    # backend, NumPy's first ufunc loops) that would otherwise land on the first client
    secagg_round(3, [p[:1000] for p in pool], set(), seed=0)
    plain_server(3, [p[:1000] for p in pool])
    plain_client_s, plain_bytes = plain_client(pool)
    c.say(
        f"plain client: serde.dumps of the float32 update {plain_client_s * 1e3:.2f} ms, "
        f"{plain_bytes:,} bytes"
    )
    started = time.perf_counter()
    rows = []
    for n in clients:
        t0 = time.perf_counter()
        full = secagg_round(n, pool, set(), seed=n)
        row: dict[str, Any] = {
            "n": n,
            "full": full,
            "plain_client_s": plain_client_s,
            "plain_server_s": plain_server(n, pool),
        }
        st = full["client_stage_s_median"]
        parts = full["server_parts_s"]
        c.say(
            f"  n = {n}: k = {full['k']}, t = {full['t']}; client median "
            f"{full['client_s_median'] * 1e3:.1f} ms (keys {st['keys'] * 1e3:.2f}, shares "
            f"{st['shares'] * 1e3:.2f}, mask {st['mask'] * 1e3:.1f}, unmask "
            f"{st['unmask'] * 1e3:.2f}; max {full['client_s_max'] * 1e3:.1f}; + serializing the "
            f"uint64 masked vector {full['client_encode_s_median'] * 1e3:.2f}) ms; server "
            f"{full['server_s']:.3f} s (init {parts['init']:.3f}, routing {parts['route']:.3f}, "
            f"add_masked {parts['add_masked']:.3f}, result {parts['result']:.3f}) vs plain "
            f"{row['plain_server_s']:.3f} s; messages sent {full['message_bytes_median']:,} "
            f"bytes (max {full['message_bytes_max']:,}), received "
            f"{full['received_message_bytes_median']:,} bytes + the model; max |error| "
            f"{full['max_abs_error']:.2e} (bound {full['error_bound']:.2e}); "
            f"{time.perf_counter() - t0:.0f} s, load {c.load()[0]:.2f}"
        )
        if not args.no_dropout:
            t0 = time.perf_counter()
            gone = np.random.default_rng([n, 1]).choice(
                n, size=max(1, round(DROP_FRACTION * n)), replace=False
            )
            drop = secagg_round(n, pool, {int(u) for u in gone}, seed=n)
            row["drop"] = drop
            row["plain_server_drop_s"] = plain_server(drop["survivors"], pool)
            parts = drop["server_parts_s"]
            c.say(
                f"  n = {n}, {drop['dropped']} dropped after sharing: server "
                f"{drop['server_s']:.3f} s (routing {parts['route']:.3f}, add_masked "
                f"{parts['add_masked']:.3f}, result {parts['result']:.3f}) vs plain over the "
                f"{drop['survivors']} updates {row['plain_server_drop_s']:.3f} s; survivors' "
                f"client median {drop['client_s_median'] * 1e3:.1f} ms; max |error| "
                f"{drop['max_abs_error']:.2e}; {time.perf_counter() - t0:.0f} s, "
                f"load {c.load()[0]:.2f}"
            )
        rows.append(row)
    info["load_after"] = c.load()
    c.say(f"total {time.perf_counter() - started:.0f} s; load after: {info['load_after']}")
    c.say(
        "client: median of the n clients, keys + shares + mask + unmask (serializing the masked "
        "vector not included); plain client: serde.dumps of the float32 update; server: one "
        "run, all SecAggServer calls; plain server: WeightedMean.add for all n + result, median "
        "of 3; dropped run's ratio: against plain aggregation of the survivors' updates; "
        "bytes: per client, masked vector (serde.dumps of uint64) + key/share/reveal messages "
        "(median); packed: the masked vector at modulus_bits per value + the same messages"
    )
    c.say(table(rows, plain_bytes))
    payload = {
        "workload": "secagg_cost",
        "machine": info,
        "length": length,
        "plain_client_s": plain_client_s,
        "plain_bytes": plain_bytes,
        "rows": rows,
    }
    c.write_json(args.json, payload)
    return payload


if __name__ == "__main__":
    main()
