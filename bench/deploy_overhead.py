"""Deployment overhead per round: 50 light clients over gRPC vs the same run in simulation.

Fifty light NumPy clients (client ``i`` holds ``i + 1`` examples and "trains" by returning
the global model plus ``i``: one pass over the parameters, no ML framework) run FedAvg with a
1 M-parameter float32 model (4 MB, so serialization matters) for 10 rounds, twice in one run:

* **network**: a ``FleetServer`` in this process, ``pollinate.server.run`` with a
  ``GrpcExecutor``; the 50 clients are ``run_client`` threads, each with its own gRPC
  connection, in separate client processes (``--client-procs``, default 1 process holding
  all 50 threads; ``--client-procs 0`` puts the threads in the server's own process);
* **simulation**: ``simulate(..., backend="sequential")`` of the same ``client_fn``, the same
  strategy and the same rounds, in this process.

Seconds per round are taken by a callback (round start to round end) and the first round of
each run is left out (connection and allocator warm-up); the difference is the network's
overhead per round, the ratio how many times longer a networked round takes. Both final
models are compared, to show the same arithmetic was done.

    .venv/bin/python bench/deploy_overhead.py                    # 50 clients, 10 rounds
    .venv/bin/python bench/deploy_overhead.py --client-procs 2   # 2 processes x 25 threads

All traffic is on 127.0.0.1; the script stops every server, thread and process it starts.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
from deploy_common import (  # noqa: E402 - also puts the repository on sys.path
    LightClientFn,
    machine_line,
    spawn,
    stop_process,
)

from pollinate.server import Callback  # noqa: E402
from pollinate.types import Arrays  # noqa: E402

WAIT_S = 120.0  # bound on any single wait


# --- the clients (module level: they pickle, and the client processes import them) ----------


def initial_model(params: int) -> Arrays:
    side = int(round(params**0.5))
    return [np.zeros((side, params // side), dtype=np.float32)]


def make_strategy(clients: int) -> Any:
    from pollinate.strategy import FedAvg

    return FedAvg(
        min_train_clients=clients,
        min_available_clients=clients,
        fraction_train=1.0,
        fraction_evaluate=0.0,  # training rounds only: the model travels out and back
        round_timeout_s=WAIT_S,
        seed=0,
    )


class RoundTimer(Callback):
    """Seconds from each round's start to its end; every client must have trained."""

    def __init__(self, clients: int) -> None:
        self.clients = clients
        self.seconds: list[float] = []
        self._start = 0.0

    def on_round_start(self, round_number: int) -> None:
        self._start = time.perf_counter()

    def on_round_end(self, record: dict[str, Any], arrays: Arrays) -> None:
        self.seconds.append(time.perf_counter() - self._start)
        if record["train"]["clients"] != self.clients or record["failures"]:
            raise RuntimeError(f"round {record['round']} had failures: {record['failures']}")


# --- client threads ---------------------------------------------------------------------------


class ClientThreads:
    """``run_client`` for each id, one thread each, sharing one stop event."""

    def __init__(self, address: str, ids: list[int]) -> None:
        from pollinate.transport.grpc.client import Backoff, run_client

        self.stop = threading.Event()
        self.threads = [
            threading.Thread(
                target=run_client,
                args=(address, LightClientFn(), cid),
                kwargs={
                    "stop_event": self.stop,
                    "backoff": Backoff(0.05, 2.0, 1.0),
                    "max_retries": 20,
                },
                daemon=True,
                name=f"client-{cid}",
            )
            for cid in ids
        ]
        for t in self.threads:
            t.start()

    def close(self) -> None:
        self.stop.set()
        deadline = time.monotonic() + 30
        for t in self.threads:
            t.join(max(0.1, deadline - time.monotonic()))


def clients_main(address: str, first: int, count: int) -> None:
    """A client process: ``count`` client threads until stdin closes or the run finishes."""
    logging.getLogger("pollinate").setLevel(logging.ERROR)
    threads = ClientThreads(address, list(range(first, first + count)))

    def watch_stdin() -> None:
        sys.stdin.read()  # EOF: the parent closed the pipe (or died)
        threads.stop.set()

    threading.Thread(target=watch_stdin, daemon=True).start()
    try:
        threads.stop.wait(3600)  # bounded; set by stdin EOF or the server's Finished
    finally:
        threads.close()


def spawn_clients(address: str, first: int, count: int) -> subprocess.Popen[str]:
    args = ["--role", "clients", "--address", address, "--first", str(first), "--count", str(count)]
    return spawn(__file__, *args, capture=False)


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a process has used (all its threads), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_network(
    clients: int, rounds: int, params: int, procs: int
) -> tuple[list[float], Arrays, dict[str, float]]:
    from pollinate.server import run
    from pollinate.transport.grpc.server import FleetServer, GrpcExecutor

    fleet = FleetServer("127.0.0.1:0", heartbeat_s=5.0, run_id="bench").start()
    in_process: ClientThreads | None = None
    children: list[subprocess.Popen[str]] = []
    try:
        if procs == 0:
            in_process = ClientThreads(fleet.address, list(range(clients)))
        else:
            per = -(-clients // procs)
            for first in range(0, clients, per):
                children.append(spawn_clients(fleet.address, first, min(per, clients - first)))
        if not fleet.wait_for(clients, timeout=WAIT_S):
            raise RuntimeError(f"only {len(fleet.connected())} of {clients} clients connected")
        timer = RoundTimer(clients)
        server_cpu = time.process_time()
        child_cpu = sum(cpu_seconds(c.pid) for c in children)
        result = run(
            make_strategy(clients),
            GrpcExecutor(fleet, seed=0),
            fleet.connected(),
            initial_model(params),
            rounds,
            callbacks=[timer],
        )
        cpu = {
            "server process": time.process_time() - server_cpu,
            "client processes": sum(cpu_seconds(c.pid) for c in children) - child_cpu,
        }
        return timer.seconds, result.arrays, cpu
    finally:
        fleet.stop(grace=0.5, finished="benchmark over")
        if in_process is not None:
            in_process.close()
        for child in children:
            stop_process(child)


def run_simulation(
    clients: int, rounds: int, params: int
) -> tuple[list[float], Arrays, dict[str, float]]:
    from pollinate.simulation import simulate

    timer = RoundTimer(clients)
    cpu = time.process_time()
    result = simulate(
        LightClientFn(),
        num_clients=clients,
        strategy=make_strategy(clients),
        initial_arrays=initial_model(params),
        rounds=rounds,
        backend="sequential",
        seed=0,
        callbacks=[timer],
    )
    return timer.seconds, result.arrays, {"process": time.process_time() - cpu}


def per_round(seconds: list[float]) -> float:
    """Mean seconds per round, leaving out the first (warm-up) round when there are more."""
    timed = seconds[1:] if len(seconds) > 1 else seconds
    return statistics.fmean(timed)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--role", choices=["bench", "clients"], default="bench")
    parser.add_argument("--address", default="")
    parser.add_argument("--first", type=int, default=0)
    parser.add_argument("--count", type=int, default=0)
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--params", type=int, default=1_000_000, help="float32 parameters")
    parser.add_argument(
        "--client-procs",
        type=int,
        default=1,
        help="processes holding the client threads (0: threads in the server's process)",
    )
    args = parser.parse_args(argv)
    if args.role == "clients":
        clients_main(args.address, args.first, args.count)
        return 0
    if args.clients < 1 or args.rounds < 2 or args.params < 1 or args.client_procs < 0:
        parser.error("need --clients >= 1, --rounds >= 2, --params >= 1, --client-procs >= 0")
    logging.getLogger("pollinate").setLevel(logging.ERROR)  # the plaintext warnings

    print(machine_line())
    where = (
        "threads in the server's process"
        if args.client_procs == 0
        else f"threads in {args.client_procs} client process(es)"
    )
    print(
        f"{args.clients} light NumPy clients, FedAvg, {args.rounds} rounds, "
        f"{args.params:,} float32 parameters ({args.params * 4 / 1e6:.0f} MB); network clients: "
        f"{where}, one gRPC connection each"
    )
    sim_s, sim_arrays, sim_cpu = run_simulation(args.clients, args.rounds, args.params)
    net_s, net_arrays, net_cpu = run_network(
        args.clients, args.rounds, args.params, args.client_procs
    )
    diff = max(float(np.max(np.abs(a - b))) for a, b in zip(sim_arrays, net_arrays))

    sim, net = per_round(sim_s), per_round(net_s)
    print(f"largest difference between the two final models: {diff:.3g}")
    print()
    print(f"{'run':<34} {'s/round (mean of rounds 2..)':>29} {'round 1':>9}  CPU s/round")
    for name, secs, cpu in (
        ("simulation (sequential backend)", sim_s, sim_cpu),
        ("network (gRPC, 127.0.0.1)", net_s, net_cpu),
    ):
        where = ", ".join(f"{k} {v / len(secs):.2f}" for k, v in cpu.items() if v or k == "process")
        print(f"{name:<34} {per_round(secs):>29.3f} {secs[0]:>9.3f}  {where}")
    print()
    print(
        f"network overhead per round: {net - sim:.3f} s ({(net - sim) / args.clients * 1e3:.1f} "
        f"ms per client); network/simulation: {net / sim:.1f}x"
    )
    moved = 2 * args.clients * args.params * 4 / 1e6
    print(f"bytes moved per networked round: {moved:.0f} MB ({moved / net:.0f} MB/s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
