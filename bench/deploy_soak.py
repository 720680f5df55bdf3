"""Soak: a real ``pollinate server`` over many short rounds; does anything grow with rounds?

The server is the ``pollinate server`` command in a process of its own, with TLS and an
allow-list (throwaway certificates and keys in a temporary folder): the digits data set, a
logistic regression (650 parameters), FedAvg over every client each round, with federated
evaluation. The clients are ``run_client`` threads, one gRPC connection each, in
``--client-procs`` other processes (light NumPy clients: client ``i`` adds ``i`` to every
parameter). Every ``--every`` rounds (when the server prints that round's progress line),
the script samples the server process with psutil: resident memory, open file descriptors,
threads, and the sizes of history.json (as of the round before: the server writes it just
after printing the progress line) and server.sqlite (with its write-ahead log); it prints one
table row per sample and, at the end, how much memory, descriptors and threads grew from the
first full interval on, and the seconds per round of the first and last intervals.

    .venv/bin/python bench/deploy_soak.py                        # 20 clients x 500 rounds
    .venv/bin/python bench/deploy_soak.py --clients 4 --rounds 20 --every 5

Everything is on 127.0.0.1; the script stops every process it starts (the client processes
also stop when their stdin closes).
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psutil
from deploy_common import (  # noqa: E402 - also puts the repository on sys.path
    REPO,
    LightClientFn,
    machine_line,
    spawn,
    stop_process,
)

WAIT_S = 300.0  # bound on any one wait (a round, the start, the end)
PROGRESS = re.compile(r"^round (\d+)/(\d+):")
MiB = 1 << 20


# --- the clients (a process of its own) ---------------------------------------------------------


def clients_main(address: str, first: int, count: int, certs: Path) -> None:
    """``count`` client threads until the run finishes or stdin closes."""
    from pollinate.transport.grpc.auth import load_private_key
    from pollinate.transport.grpc.client import Backoff, run_client

    logging.getLogger("pollinate").setLevel(logging.ERROR)
    stop = threading.Event()
    ca = (certs / "ca.crt").read_bytes()

    def serve(cid: int) -> None:
        run_client(
            address,
            LightClientFn(),
            cid,
            private_key=load_private_key(certs / f"client-{cid}.key"),
            ca_cert_pem=ca,
            stop_event=stop,  # shared: the server's Finished stops every thread
            backoff=Backoff(0.05, 2.0, 1.0),
        )

    threads = [
        threading.Thread(target=serve, args=(cid,), daemon=True, name=f"client-{cid}")
        for cid in range(first, first + count)
    ]
    for t in threads:
        t.start()

    def watch_stdin() -> None:
        sys.stdin.read()  # EOF: the parent closed the pipe (or died)
        stop.set()

    threading.Thread(target=watch_stdin, daemon=True).start()
    stop.wait(24 * 3600)
    deadline = time.monotonic() + 30
    for t in threads:
        t.join(max(0.1, deadline - time.monotonic()))


# --- the server and its samples -----------------------------------------------------------------


def make_run_folder(folder: Path, clients: int, rounds: int) -> None:
    from pollinate.security import make_ca, make_client_key, make_server_cert

    certs = folder / "certs"
    ca_cert, ca_key = make_ca(certs)
    make_server_cert(certs, ca_cert, ca_key)
    for cid in range(clients):
        make_client_key(certs, cid, certs / "allow-list.txt")
    (folder / "run.toml").write_text(
        "\n".join(
            [
                "[run]",
                f"rounds = {rounds}",
                'output = "run"',
                "[data]",
                'dataset = "digits"',
                f"num_clients = {clients}",
                "[model]",
                'name = "logreg"',
                "[strategy]",
                f"min_available_clients = {clients}",
                f"min_train_clients = {clients}",
                "min_evaluate_clients = 1",
                f"round_timeout_s = {WAIT_S}",
            ]
        )
        + "\n"
    )


class Server:
    """``pollinate server`` in a process; a thread reads its output and notes each round."""

    def __init__(self, folder: Path, port: int) -> None:
        self.folder = folder
        self.lines: list[str] = []
        self.rounds: dict[int, float] = {}  # round -> when its progress line came
        self.listening = threading.Event()
        self.changed = threading.Condition()
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
        }
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pollinate.cli", "server", "run.toml"]
            + ["--address", f"127.0.0.1:{port}", "--certs", "certs"],
            cwd=folder,
            env={**env, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.ps = psutil.Process(self.proc.pid)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            now = time.monotonic()
            with self.changed:
                self.lines.append(line.rstrip())
                if "listening on" in line:
                    self.listening.set()
                m = PROGRESS.match(line)
                if m:
                    self.rounds[int(m.group(1))] = now
                self.changed.notify_all()
        with self.changed:
            self.changed.notify_all()

    def wait_round(self, n: int) -> float:
        """Block until round ``n``'s progress line (or the server's exit); when it came."""
        with self.changed:
            ok = self.changed.wait_for(
                lambda: n in self.rounds or self.proc.poll() is not None, WAIT_S
            )
            if n not in self.rounds:
                why = "exited" if ok else f"gave no progress for {WAIT_S:g} s"
                raise RuntimeError(f"the server {why} before round {n}:\n{self.tail()}")
            return self.rounds[n]

    def tail(self, n: int = 30) -> str:
        return "\n".join(self.lines[-n:])

    def sample(self) -> dict[str, Any]:
        run = self.folder / "run"
        size = lambda name: (run / name).stat().st_size if (run / name).exists() else 0  # noqa: E731
        return {
            "rss": self.ps.memory_info().rss,
            "fds": self.ps.num_fds(),
            "threads": self.ps.num_threads(),
            "history": size("history.json"),
            "sqlite": size("server.sqlite") + size("server.sqlite-wal"),
        }

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._reader.join(10)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def checkpoints(rounds: int, every: int) -> list[int]:
    marks = [1, *range(every, rounds + 1, every)]
    if marks[-1] != rounds:
        marks.append(rounds)
    return sorted(set(marks))


def soak(folder: Path, clients: int, rounds: int, every: int, procs: int) -> int:
    make_run_folder(folder, clients, rounds)
    port = free_port()
    server = Server(folder, port)
    children: list[subprocess.Popen[str]] = []
    try:
        if not server.listening.wait(WAIT_S):
            raise RuntimeError(f"the server did not start:\n{server.tail()}")
        per = -(-clients // procs)
        for first in range(0, clients, per):
            args = ["--role", "clients", "--address", f"127.0.0.1:{port}"]
            args += ["--first", str(first), "--count", str(min(per, clients - first))]
            children.append(spawn(__file__, *args, "--certs", str(folder / "certs"), capture=False))
        print(
            f"{'round':>6} {'elapsed s':>10} {'s/round':>8} {'RSS MiB':>8} {'open fds':>9} "
            f"{'threads':>8} {'history.json KiB':>17} {'server.sqlite KiB':>18}",
            flush=True,
        )
        rows: list[tuple[int, float, dict[str, Any]]] = []
        start = None
        previous = (0, 0.0)
        for mark in checkpoints(rounds, every):
            at = server.wait_round(mark)
            s = server.sample()
            start = at if start is None else start
            rate = (at - previous[1]) / (mark - previous[0]) if previous[0] else float("nan")
            previous = (mark, at)
            rows.append((mark, at, s))
            print(
                f"{mark:>6} {at - start:>10.1f} {rate:>8.3f} {s['rss'] / MiB:>8.1f} "
                f"{s['fds']:>9} {s['threads']:>8} {s['history'] / 1024:>17.0f} "
                f"{s['sqlite'] / 1024:>18.0f}",
                flush=True,
            )
        code = server.proc.wait(WAIT_S)
        if code != 0:
            raise RuntimeError(f"the server exited with {code}:\n{server.tail()}")
    finally:
        for child in children:
            stop_process(child)
        server.stop()
    summarize(rows, every)
    return 0


def summarize(rows: list[tuple[int, float, dict[str, Any]]], every: int) -> None:
    """Growth per round after the first full interval (round ``every``), where warm-up is over."""
    base = next((r for r in rows if r[0] >= every), rows[0])
    last = rows[-1]
    span = last[0] - base[0]
    print()
    if span <= 0:
        print("too few rounds to measure growth")
        return
    rss = (last[2]["rss"] - base[2]["rss"]) / MiB
    first_rate = (rows[1][1] - rows[0][1]) / (rows[1][0] - rows[0][0]) if len(rows) > 1 else 0
    last_rate = (last[1] - rows[-2][1]) / (last[0] - rows[-2][0]) if len(rows) > 1 else 0
    print(
        f"from round {base[0]} to {last[0]}: server RSS {rss:+.1f} MiB "
        f"({rss * 1024 / span:+.2f} KiB per round), open fds {base[2]['fds']} -> "
        f"{last[2]['fds']}, threads {base[2]['threads']} -> {last[2]['threads']}"
    )
    print(f"seconds per round: {first_rate:.3f} in the first interval, {last_rate:.3f} in the last")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--role", choices=["bench", "clients"], default="bench")
    parser.add_argument("--address", default="")
    parser.add_argument("--first", type=int, default=0)
    parser.add_argument("--count", type=int, default=0)
    parser.add_argument("--certs", default="")
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=500)
    parser.add_argument("--every", type=int, default=50, help="sample every N rounds")
    parser.add_argument(
        "--client-procs", type=int, default=2, help="processes holding the client threads"
    )
    parser.add_argument("--keep", help="run in this folder and keep it (default: a temporary one)")
    args = parser.parse_args(argv)
    if args.role == "clients":
        clients_main(args.address, args.first, args.count, Path(args.certs))
        return 0
    if min(args.clients, args.rounds, args.every, args.client_procs) < 1:
        parser.error("--clients, --rounds, --every and --client-procs must be >= 1")
    print(machine_line())
    print(
        f"pollinate server (TLS, allow-list) and {args.clients} clients (threads in "
        f"{args.client_procs} processes), digits logreg, {args.rounds} rounds; the server "
        f"process sampled every {args.every} rounds"
    )
    if args.keep:
        folder = Path(args.keep)
        folder.mkdir(parents=True, exist_ok=True)
        return soak(folder, args.clients, args.rounds, args.every, args.client_procs)
    with tempfile.TemporaryDirectory(prefix="pollinate-soak-") as tmp:
        return soak(Path(tmp), args.clients, args.rounds, args.every, args.client_procs)


if __name__ == "__main__":
    sys.exit(main())
