"""Deployment memory: the server's resident memory with 200 connected clients.

A ``FleetServer`` runs in a fresh process of its own, which reads its own ``VmRSS``, ``VmHWM``
(peak resident memory) and thread count from ``/proc/self/status`` at each phase:

1. **idle**: pollinate, gRPC and NumPy imported, the server listening, no client yet;
2. **connected**: all 200 clients registered (each ``run_client`` thread holds one gRPC
   connection), a moment after the last one joined;
3. **rounds**: after a couple of FedAvg rounds with a small model over all 200 clients;
   the peak during the rounds is ``VmHWM`` after the peak was reset (``/proc/self/clear_refs``)
   at the end of phase 2, where the kernel allows it.

The clients are ``run_client`` threads in other processes (``--client-procs``, default 2 x 100
threads), so their memory is not counted. Per-client memory is (connected - idle) / 200.

    .venv/bin/python bench/deploy_memory.py                  # 200 clients, 2 rounds, 100k params
    .venv/bin/python bench/deploy_memory.py --params 1000000 # a 4 MB model

All traffic is on 127.0.0.1; the script stops every server, thread and process it starts.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
from deploy_common import (  # noqa: E402 - also puts the repository on sys.path
    LightClientFn,
    spawn,
    stop_process,
)

from pollinate.transport import DEFAULT_RESULT_MEMORY_BYTES  # noqa: E402

WAIT_S = 180.0  # bound on any single wait


# --- the clients (module level: the client processes import them) -------------------------------


# --- /proc ----------------------------------------------------------------------------------


def proc_status() -> dict[str, int]:
    """``VmRSS``, ``VmHWM`` (bytes) and ``Threads`` of this process."""
    out: dict[str, int] = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0]) * 1024
        elif key == "Threads":
            out[key] = int(value)
    return out


def reset_peak() -> bool:
    """Reset ``VmHWM`` to the current RSS (Linux >= 4.0); False where not allowed."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


# --- the server process -----------------------------------------------------------------------


class Sampler:
    """Samples this process's RSS every 20 ms in a thread (bounded by ``stop``)."""

    def __init__(self) -> None:
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            self.samples.append((time.monotonic(), proc_status()["VmRSS"]))

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def peak(self, until: float = float("inf")) -> int:
        return max((rss for t, rss in self.samples if t <= until), default=0)


class Watched:
    """Wraps an executor: when the first result of each round came, and how many results
    had finished but were still waiting for the aggregation to take them."""

    def __init__(self, executor: Any) -> None:
        self.executor = executor
        self.first_result: dict[int, float] = {}
        self.waiting = 0

    def submit(self, round_number: int, kind: Any, plan: Any, timeout_s: float) -> Any:
        sent = time.monotonic()
        taken: list[float] = []  # when each outcome was handed on, in seconds since sent
        finished: list[float] = []  # when each had finished on the server (Outcome.seconds)
        for outcome in self.executor.submit(round_number, kind, plan, timeout_s):
            now = time.monotonic()
            self.first_result.setdefault(round_number, now)
            taken.append(now - sent)
            finished.append(outcome.seconds)
            yield outcome
        for i, t in enumerate(taken):  # finished by then, minus already taken
            self.waiting = max(self.waiting, sum(f <= t for f in finished) - i)


def server_main(clients: int, rounds: int, params: int, result_memory_mib: int) -> None:
    """Serve, measure each phase, print one JSON line, then wait for stdin to close."""
    from pollinate.server import run
    from pollinate.strategy import FedAvg
    from pollinate.transport.grpc.server import FleetServer, GrpcExecutor

    logging.getLogger("pollinate").setLevel(logging.ERROR)
    report: dict[str, Any] = {}
    fleet = FleetServer(
        "127.0.0.1:0",
        heartbeat_s=5.0,
        run_id="bench",
        max_streams=clients + 50,
        max_unregistered=clients + 50,  # all clients connect at once here
        result_memory_bytes=result_memory_mib << 20,
    ).start()
    try:
        time.sleep(1.0)
        report["idle"] = proc_status()
        print(json.dumps({"port": fleet.port}), flush=True)
        if not fleet.wait_for(clients, timeout=WAIT_S):
            raise SystemExit(f"only {len(fleet.connected())} of {clients} clients connected")
        time.sleep(2.0)  # the last Welcomes and first heartbeats settle
        report["connected"] = proc_status()
        report["peak_reset"] = reset_peak()
        strategy = FedAvg(
            min_train_clients=clients,
            min_available_clients=clients,
            fraction_evaluate=0.0,
            round_timeout_s=WAIT_S,
            seed=0,
        )
        model = [np.zeros(params, dtype=np.float32)]
        sampler = Sampler()
        executor = Watched(GrpcExecutor(fleet, seed=0))
        start = time.perf_counter()
        try:
            result = run(strategy, executor, fleet.connected(), model, rounds)
        finally:
            sampler.stop()
        report["rounds_s"] = time.perf_counter() - start
        report["rounds"] = proc_status()
        report["sending_peak"] = sampler.peak(until=executor.first_result.get(1, 0.0))
        report["waiting"] = executor.waiting
        report["held_peak"] = fleet.result_memory.peak
        report["held_waits"] = fleet.result_memory.waits
        report["trained"] = [r["train"]["clients"] for r in result.history.rounds]
        print(json.dumps(report), flush=True)
        sys.stdin.read()  # the parent closes stdin when it has read the report
    finally:
        fleet.stop(grace=0.5, finished="benchmark over")


# --- client processes ------------------------------------------------------------------------


def clients_main(address: str, first: int, count: int) -> None:
    """``count`` client threads until stdin closes or the server says the run is over."""
    from pollinate.transport.grpc.client import Backoff, run_client

    logging.getLogger("pollinate").setLevel(logging.ERROR)
    stop = threading.Event()
    threads = [
        threading.Thread(
            target=run_client,
            args=(address, LightClientFn(), cid),
            kwargs={"stop_event": stop, "backoff": Backoff(0.1, 2.0, 2.0), "max_retries": 30},
            daemon=True,
        )
        for cid in range(first, first + count)
    ]

    def watch_stdin() -> None:
        sys.stdin.read()  # EOF: the parent closed the pipe (or died)
        stop.set()

    threading.Thread(target=watch_stdin, daemon=True).start()
    for t in threads:
        t.start()
    try:
        stop.wait(3600)  # bounded
    finally:
        stop.set()
        deadline = time.monotonic() + 30
        for t in threads:
            t.join(max(0.1, deadline - time.monotonic()))


# --- the parent ---------------------------------------------------------------------------------


def read_json_line(proc: subprocess.Popen[str], what: str) -> dict[str, Any]:
    """The next line the process prints, as JSON (within WAIT_S)."""
    stdout = proc.stdout
    assert stdout is not None
    box: list[str] = []
    reader = threading.Thread(target=lambda: box.append(stdout.readline()), daemon=True)
    reader.start()
    reader.join(WAIT_S)
    if not box or not box[0]:
        raise RuntimeError(f"the server process gave no {what} (exit code {proc.poll()})")
    return json.loads(box[0])


def mb(n: int | float) -> str:
    return f"{n / 2**20:.1f} MiB"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--role", choices=["bench", "server", "clients"], default="bench")
    parser.add_argument("--address", default="")
    parser.add_argument("--first", type=int, default=0)
    parser.add_argument("--count", type=int, default=0)
    parser.add_argument("--clients", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--params", type=int, default=100_000, help="float32 parameters")
    parser.add_argument("--client-procs", type=int, default=2)
    parser.add_argument(
        "--result-memory-mib",
        type=int,
        default=DEFAULT_RESULT_MEMORY_BYTES >> 20,
        help="FleetServer(result_memory_bytes=...): client results held at once",
    )
    args = parser.parse_args(argv)
    if args.role == "server":
        server_main(args.clients, args.rounds, args.params, args.result_memory_mib)
        return 0
    if args.role == "clients":
        clients_main(args.address, args.first, args.count)
        return 0
    if min(args.clients, args.rounds, args.params, args.client_procs) < 1:
        parser.error("--clients, --rounds, --params and --client-procs must be >= 1")

    load = os.getloadavg()
    print(
        f"{platform.node()}: {os.cpu_count()} CPUs, Python {platform.python_version()}, "
        f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}"
    )
    n = args.clients
    print(
        f"server in a fresh process; {n} clients as threads in {args.client_procs} other "
        f"process(es); {args.rounds} FedAvg rounds, {args.params:,} float32 parameters "
        f"({mb(args.params * 4)})"
    )
    server = spawn(
        __file__,
        "--role",
        "server",
        "--clients",
        str(n),
        "--rounds",
        str(args.rounds),
        "--params",
        str(args.params),
        "--result-memory-mib",
        str(args.result_memory_mib),
    )
    children: list[subprocess.Popen[str]] = []
    try:
        port = read_json_line(server, "port")["port"]
        address = f"127.0.0.1:{port}"
        per = -(-n // args.client_procs)
        start = time.perf_counter()
        for first in range(0, n, per):
            count = min(per, n - first)
            children.append(spawn(__file__, "--role", "clients", "--address", address, "--first",
                                  str(first), "--count", str(count)))  # fmt: skip
        report = read_json_line(server, "report")
        elapsed = time.perf_counter() - start
    finally:
        stop_process(server)
        for child in children:
            stop_process(child)

    if report["trained"] != [n] * args.rounds:
        raise RuntimeError(f"clients trained per round: {report['trained']}, expected {n}")
    idle, conn, rounds = report["idle"], report["connected"], report["rounds"]
    per_client = (conn["VmRSS"] - idle["VmRSS"]) / n
    print(f"all {n} clients trained in each round; connect + rounds took {elapsed:.1f} s")
    print()
    print(f"{'server process':<44} {'RSS':>11} {'threads':>8}")
    print(f"{'idle (listening, no client)':<44} {mb(idle['VmRSS']):>11} {idle['Threads']:>8}")
    print(f"{f'{n} clients connected':<44} {mb(conn['VmRSS']):>11} {conn['Threads']:>8}")
    after = f"after {args.rounds} rounds ({report['rounds_s']:.1f} s)"
    print(f"{after:<44} {mb(rounds['VmRSS']):>11} {rounds['Threads']:>8}")
    print(f"{'peak before the rounds (VmHWM)':<44} {mb(conn['VmHWM']):>11}")
    what = "peak during the rounds" if report["peak_reset"] else "peak over the whole life"
    print(f"{what + ' (VmHWM)':<44} {mb(rounds['VmHWM']):>11}")
    sending = "peak in round 1 before its first result came"
    print(f"{sending:<44} {mb(report['sending_peak']):>11}")
    print()
    print(
        f"per connected client: {per_client / 1024:.0f} KiB "
        f"((connected - idle) / {n}); threads per client: "
        f"{(conn['Threads'] - idle['Threads']) / n:.1f}"
    )
    model = args.params * 4
    print(
        f"peak during the rounds above connected: {mb(rounds['VmHWM'] - conn['VmRSS'])} "
        f"= {(rounds['VmHWM'] - conn['VmRSS']) / model:.1f} x the model size "
        f"({(rounds['VmHWM'] - conn['VmRSS']) / (n * model):.2f} x clients x model)"
    )
    print(
        f"while sending the model (before any result): {mb(report['sending_peak'] - conn['VmRSS'])}"
        f" above connected = {(report['sending_peak'] - conn['VmRSS']) / (n * model):.2f} x "
        f"clients x model; most finished results waiting for the aggregation at once: "
        f"{report['waiting']}"
    )
    print(
        f"results held at once (result_memory_bytes = {args.result_memory_mib} MiB): at most "
        f"{mb(report['held_peak'])}; {report['held_waits']} results waited for room"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
