"""Real ``pollinate server`` / ``pollinate client`` processes under a seeded chaos schedule.

:class:`Deployment` writes a run config into a folder, starts a server and ledger clients
(``tests.chaos.apps:ledger``) as processes, optionally behind a :class:`ChaosProxy`, and
drives them with :meth:`Deployment.run`: a loop that polls the run's progress (history.json),
fires the :class:`Monkey`'s seeded actions when their round comes (SIGKILL / SIGSTOP + SIGCONT
of clients, SIGKILL of the server), restarts the server with the same command when it dies
before the run is finished (a supervisor's job: the server resumes from server.sqlite), and
samples the server's memory with psutil. Every wait is on an event (a log line, a file, a
process), bounded by a timeout scaled to the machine's load.

The checks after a run live here too, each failing with the processes' logs and what the proxy
and the monkey did: :meth:`Deployment.check_rounds` (every round recorded exactly once, in
history.json and server.sqlite alike), :func:`check_ledger` (no update averaged in twice),
:meth:`Deployment.check_processes` (no process left behind) and
:meth:`Deployment.check_memory`.
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import psutil

from tests.chaos.apps import STRIDE
from tests.chaos.proxy import ChaosProxy, Schedule
from tests.waiting import load_scale

REPO = Path(__file__).resolve().parents[2]
MiB = 1 << 20


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Action:
    """Once ``at_round`` rounds are recorded, wait ``offset_s``, then do ``kind`` to ``target``
    (a client id; the server for ``kill_server``); ``stop_client`` is undone (SIGCONT) and
    ``kill_client`` undone (restart) ``undo_s`` later."""

    kind: str  # kill_client | stop_client | kill_server
    at_round: int
    offset_s: float
    target: int = -1
    undo_s: float = 0.0
    armed_at: float | None = None
    done_at: float | None = None
    undone: bool = False

    def __str__(self) -> str:
        what = self.kind if self.target < 0 else f"{self.kind} {self.target}"
        undo = f", undo after {self.undo_s:.2f} s" if self.kind != "kill_server" else ""
        return f"{what} at round {self.at_round} + {self.offset_s:.2f} s{undo}"


@dataclass
class Monkey:
    """A seeded list of process faults, fired by :meth:`Deployment.run`."""

    actions: list[Action] = field(default_factory=list)
    log: list[str] = field(default_factory=list)

    @classmethod
    def draw(
        cls,
        seed: int,
        rounds: int,
        clients: int,
        *,
        kill_clients: int = 0,
        stop_clients: int = 0,
        kill_servers: int = 0,
        offset_s: tuple[float, float] = (0.0, 0.5),
        undo_s: tuple[float, float] = (0.2, 3.0),
    ) -> Monkey:
        """``kill_clients`` + ``stop_clients`` + ``kill_servers`` actions at random rounds of
        the first three quarters of the run (so every one fires before the run ends)."""
        rng = random.Random(seed)
        last = max(1, rounds * 3 // 4)
        actions = []
        for kind, count in (
            ("kill_client", kill_clients),
            ("stop_client", stop_clients),
            ("kill_server", kill_servers),
        ):
            for _ in range(count):
                actions.append(
                    Action(
                        kind,
                        at_round=rng.randint(0, last),
                        offset_s=rng.uniform(*offset_s),
                        target=rng.randrange(clients) if kind != "kill_server" else -1,
                        undo_s=rng.uniform(*undo_s),
                    )
                )
        actions.sort(key=lambda a: (a.at_round, a.offset_s))
        return cls(actions)

    def report(self) -> str:
        plan = [f"  planned: {a}" for a in self.actions]
        return "\n".join(["monkey:", *plan, *(f"  {line}" for line in self.log)])


class Deployment:
    """A deployed run in ``folder``: config, certificates, processes, proxy, measurements."""

    def __init__(
        self,
        folder: Path,
        *,
        clients: int,
        rounds: int,
        seed: int = 0,
        tls: bool = True,
        heartbeat_s: float = 0.5,
        train_s: float = 0.0,
        proxy: Schedule | None = None,
        **strategy: Any,
    ) -> None:
        self.folder = folder
        self.clients = clients
        self.rounds = rounds
        self.tls = tls
        self.heartbeat_s = heartbeat_s
        self.port = free_port()
        self.run_dir = folder / "runs" / "deployed"
        self.logs = folder / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.started = time.monotonic()
        self.notes: list[str] = []
        self.procs: dict[str, subprocess.Popen[bytes]] = {}  # the live one of each name
        self.history_of_procs: list[tuple[str, subprocess.Popen[bytes]]] = []
        self.seen: dict[int, tuple[str, float]] = {}  # pid -> (name, create time)
        self.stopped: set[str] = set()
        self.server_starts = 0
        self.rss: list[tuple[float, int, int]] = []  # (seconds, rounds done, server RSS)
        self._history_stat: tuple[int, int] = (0, 0)
        self._rounds_done = 0
        self.monkey: Monkey | None = None
        self.write_config(seed, strategy)
        if tls:
            self.make_certs()
        self.env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
            "PYTHONUNBUFFERED": "1",
            "OMP_NUM_THREADS": "1",
            "POLLINATE_LEDGER_TRAIN_S": str(train_s),
        }
        self.proxy = (
            ChaosProxy(self.port, proxy, upstream_retry_s=30.0) if proxy is not None else None
        )

    # --- set-up --------------------------------------------------------------------------

    def write_config(self, seed: int, strategy: dict[str, Any]) -> None:
        lines = [
            "[run]",
            f"rounds = {self.rounds}",
            f"seed = {seed}",
            'output = "runs/deployed"',
            "deterministic = true",
            "[data]",
            'dataset = "digits"',
            f"num_clients = {self.clients}",
            "[model]",
            'name = "logreg"',
            "[strategy]",
            *(f"{k} = {json.dumps(v)}" for k, v in strategy.items()),
        ]
        (self.folder / "run.toml").write_text("\n".join(lines) + "\n")

    def make_certs(self) -> None:
        from pollinate.security import make_ca, make_client_key, make_server_cert

        certs = self.folder / "certs"
        ca_cert, ca_key = make_ca(certs)
        make_server_cert(certs, ca_cert, ca_key)
        for cid in range(self.clients):
            make_client_key(certs, cid, certs / "allow-list.txt")

    def security_args(self) -> list[str]:
        return ["--certs", "certs"] if self.tls else ["--insecure"]

    @property
    def client_address(self) -> str:
        return self.proxy.address if self.proxy is not None else f"127.0.0.1:{self.port}"

    # --- processes -----------------------------------------------------------------------

    def _start(self, name: str, args: list[str]) -> subprocess.Popen[bytes]:
        path = self.logs / f"{name}.log"
        with open(path, "ab") as log:
            log.write(f"=== {self.clock()} start: pollinate {' '.join(args)}\n".encode())
            log.flush()
            proc = subprocess.Popen(
                [sys.executable, "-m", "pollinate.cli", *args],
                cwd=self.folder,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        self.procs[name] = proc
        self.history_of_procs.append((name, proc))
        self._remember(name, proc.pid)
        return proc

    def _remember(self, name: str, pid: int) -> None:
        try:
            self.seen.setdefault(pid, (name, psutil.Process(pid).create_time()))
        except psutil.NoSuchProcess:
            pass

    def server_args(self) -> list[str]:
        args = ["server", "run.toml", "--address", f"127.0.0.1:{self.port}"]
        return args + self.security_args() + ["--heartbeat-s", str(self.heartbeat_s)]

    def start_server(self) -> subprocess.Popen[bytes]:
        """Start the server (always the same command) and wait until it listens."""
        self.server_starts += 1
        mark = self.log_size("server")
        proc = self._start("server", self.server_args())
        self.wait(
            lambda: "listening on" in self.log("server", mark) or proc.poll() is not None,
            60,
            "the server to listen",
        )
        return proc

    def start_client(self, cid: int) -> subprocess.Popen[bytes]:
        args = ["client", "--server", self.client_address, "--app", "tests.chaos.apps:ledger"]
        return self._start(f"client{cid}", [*args, "--client-id", str(cid), *self.security_args()])

    def start(self) -> None:
        self.start_server()
        for cid in range(self.clients):
            self.start_client(cid)

    def signal(self, name: str, sig: signal.Signals) -> None:
        proc = self.procs[name]
        if proc.poll() is None:
            proc.send_signal(sig)
            self.note(f"{sig.name} {name} (pid {proc.pid})")
        if sig == signal.SIGSTOP:
            self.stopped.add(name)
        elif sig in (signal.SIGCONT, signal.SIGKILL):
            self.stopped.discard(name)
        if sig == signal.SIGKILL:
            proc.wait(30)

    def close(self) -> None:
        """Kill whatever is still running (only the processes this deployment started); leave
        the whole story in ``chaos-report.txt`` in the folder."""
        for name, proc in self.history_of_procs:
            if proc.poll() is None:
                if name in self.stopped:
                    proc.send_signal(signal.SIGCONT)
                proc.kill()
                proc.wait(30)
        if self.proxy is not None:
            self.proxy.stop()
        (self.folder / "chaos-report.txt").write_text(self.context(lines=10_000))

    # --- progress and logs -----------------------------------------------------------------

    def clock(self) -> str:
        return f"{time.monotonic() - self.started:7.2f}s"

    def note(self, what: str) -> None:
        self.notes.append(f"{self.clock()} {what}")

    def log_size(self, name: str) -> int:
        path = self.logs / f"{name}.log"
        return path.stat().st_size if path.exists() else 0

    def log(self, name: str, since: int = 0) -> str:
        path = self.logs / f"{name}.log"
        if not path.exists():
            return ""
        with open(path, "rb") as f:
            f.seek(since)
            return f.read().decode(errors="replace")

    def rounds_done(self) -> int:
        """Rounds in history.json (re-read only when the file changed)."""
        path = self.run_dir / "history.json"
        try:
            st = path.stat()
        except FileNotFoundError:
            return self._rounds_done
        if (st.st_mtime_ns, st.st_size) != self._history_stat:
            try:
                self._rounds_done = len(json.loads(path.read_text())["rounds"])
                self._history_stat = (st.st_mtime_ns, st.st_size)
            except (OSError, ValueError):
                pass  # replaced while we read it: next time
        return self._rounds_done

    def context(self, lines: int = 40) -> str:
        """The processes' logs (last ``lines`` each), the proxy's and the monkey's doings."""
        parts = [f"--- deployment in {self.folder} (port {self.port})", *self.notes]
        if self.monkey is not None:
            parts.append(self.monkey.report())
        if self.proxy is not None:
            parts.append(self.proxy.report())
        for path in sorted(self.logs.glob("*.log")):
            tail = path.read_text(errors="replace").splitlines()[-lines:]
            parts += [f"--- {path.name} (last {len(tail)} lines)", *tail]
        return "\n".join(parts)

    def wait(self, predicate: Callable[[], Any], timeout_s: float, what: str) -> None:
        end = time.monotonic() + timeout_s * load_scale()
        while not predicate():
            if time.monotonic() > end:
                raise AssertionError(f"timed out waiting for {what}\n{self.context()}")
            time.sleep(0.05)

    def sample(self) -> None:
        """Record the server's RSS and every process descending from ours."""
        server = self.procs.get("server")
        for name, proc in list(self.procs.items()):
            if proc.poll() is not None:
                continue
            try:
                p = psutil.Process(proc.pid)
                for child in p.children(recursive=True):
                    self._remember(f"{name}/child", child.pid)
                if proc is server:
                    rss = p.memory_info().rss
                    self.rss.append((time.monotonic() - self.started, self._rounds_done, rss))
            except psutil.NoSuchProcess:
                pass

    # --- the chaos loop --------------------------------------------------------------------

    def run(self, monkey: Monkey | None = None, timeout_s: float = 120.0) -> None:
        """Drive the run until the server exits 0 having finished every round.

        The server is restarted whenever it exits otherwise (killed, or a round failed); the
        monkey's actions fire when their round comes; SIGSTOPped clients get SIGCONT at the
        end at the latest. Raises AssertionError (with the logs) past ``timeout_s``.
        """
        monkey = monkey if monkey is not None else Monkey()
        self.monkey = monkey
        end = time.monotonic() + timeout_s * load_scale()
        while True:
            done = self.rounds_done()
            self.sample()
            server = self.procs["server"]
            rc = server.poll()
            if rc == 0:
                break
            if rc is not None:
                self.note(f"server exited with {rc} after {done} rounds: restarting it")
                assert self.server_starts < 20, f"the server keeps dying\n{self.context()}"
                self.start_server()
                continue
            self._fire(monkey, done)
            if time.monotonic() > end:
                raise AssertionError(
                    f"the run did not finish within {timeout_s:g} s × load "
                    f"({done} of {self.rounds} rounds)\n{self.context()}"
                )
            time.sleep(0.05)
        self.note(f"the server finished all {self.rounds} rounds")
        self.end_clients()

    def _fire(self, monkey: Monkey, done: int) -> None:
        """Undo what is due, then fire at most one due action (so that two kills of the
        server never land on one process)."""
        now = time.monotonic()
        for a in monkey.actions:
            if a.done_at is not None and not a.undone and now >= a.done_at + a.undo_s:
                a.undone = True
                if a.kind == "kill_client":
                    self.start_client(a.target)
                elif a.kind == "stop_client":
                    self.signal(f"client{a.target}", signal.SIGCONT)
        for a in monkey.actions:
            if a.armed_at is None and done >= a.at_round:
                a.armed_at = now
            if a.armed_at is None or a.done_at is not None or now < a.armed_at + a.offset_s:
                continue
            a.done_at = now
            name = f"client{a.target}"
            if a.kind == "kill_server":
                self.signal("server", signal.SIGKILL)
            elif name in self.stopped or self.procs[name].poll() is not None:
                monkey.log.append(f"{self.clock()} skipped ({name} is down): {a}")
                a.undone = True
                continue
            elif a.kind == "kill_client":
                self.signal(name, signal.SIGKILL)
            else:
                self.signal(name, signal.SIGSTOP)
            monkey.log.append(f"{self.clock()} fired after round {done}: {a}")
            return

    def end_clients(self) -> None:
        """After the run: wake stopped clients, then wait for each client to end. One that
        was told the run finished must exit 0 by itself; one that missed it (down or
        stopped when the server said so) is ended once it is seen retrying."""
        marks = {name: self.log_size(name) for name in self.procs if name != "server"}
        if self.proxy is not None:
            self.proxy.upstream_retry_s = 0.0  # no server will come back: refuse at once
        for name in list(self.stopped):
            self.signal(name, signal.SIGCONT)

        def settled(name: str) -> bool:
            proc = self.procs[name]
            if proc.poll() is not None:
                return True
            if "retrying in" in self.log(name, marks[name]):
                self.note(f"{name} missed the end of the run (retrying): SIGTERM")
                proc.terminate()
                proc.wait(30)
                return True
            return False

        self.wait(lambda: all(settled(n) for n in marks), 60, "the clients to end")
        for name in marks:
            proc = self.procs[name]
            if "the run finished all" in self.log(name, marks[name]):
                assert proc.returncode == 0, f"{name} exited {proc.returncode}\n{self.context()}"

    # --- checks ----------------------------------------------------------------------------

    def history(self) -> dict[str, Any]:
        return json.loads((self.run_dir / "history.json").read_text())  # type: ignore[no-any-return]

    def check_rounds(self) -> list[dict[str, Any]]:
        """Rounds 1..N each recorded exactly once, in history.json and server.sqlite alike;
        returns the records."""
        records = self.history()["rounds"]
        numbers = [r["round"] for r in records]
        expected = list(range(1, self.rounds + 1))
        assert numbers == expected, f"history.json rounds {numbers}\n{self.context()}"
        with sqlite3.connect(f"file:{self.run_dir / 'server.sqlite'}?mode=ro", uri=True) as db:
            rows = db.execute("SELECT round, record_json FROM rounds ORDER BY round").fetchall()
            (status,) = db.execute("SELECT status FROM run").fetchone()
        assert [r[0] for r in rows] == expected, f"server.sqlite rounds {[r[0] for r in rows]}"
        for (number, text), record in zip(rows, records):
            assert json.loads(text) == record, f"round {number}: sqlite and history.json differ"
        assert status == "finished"
        return records  # type: ignore[no-any-return]

    def final_model(self) -> list[np.ndarray]:
        """The last round's checkpoint in server.sqlite's folder; the run folder's last.npz
        must hold the same, and best.npz the round with the best centralized accuracy (the
        first of equals), whatever restarts happened in between."""
        from pollinate.callbacks import load_checkpoint

        folder = self.run_dir / "checkpoints"
        state, meta = load_checkpoint(folder / f"round-{self.rounds}.npz")
        last, last_meta = load_checkpoint(folder / "last.npz")
        assert meta["round"] == last_meta["round"] == self.rounds, (
            f"round-{self.rounds}.npz says round {meta['round']}, last.npz round "
            f"{last_meta['round']}\n{self.context()}"
        )
        assert_same_model(state, last)
        scores = [r["centralized"]["accuracy"] for r in self.history()["rounds"]]
        best_round = 1 + scores.index(max(scores))
        _, best_meta = load_checkpoint(folder / "best.npz")
        assert best_meta["round"] == best_round, (
            f"best.npz holds round {best_meta['round']} (accuracy {best_meta.get('score')}), "
            f"but round {best_round} scored best ({max(scores)}); server starts: "
            f"{self.server_starts}"
        )
        return state

    def rewind_run_folder(self) -> None:
        """Put the run folder back as a SIGKILL between the last round's commit to
        server.sqlite and the run folder's own writes leaves it: history.json without the
        last round, last.npz holding the round before. (That window is a few milliseconds
        wide: waiting for a kill to land in it would take many runs.)"""
        from pollinate.callbacks import load_checkpoint, save_checkpoint

        history = self.history()
        before = history["rounds"][-2]
        history["rounds"] = history["rounds"][:-1]
        (self.run_dir / "history.json").write_text(json.dumps(history, indent=2))
        folder = self.run_dir / "checkpoints"
        arrays, _ = load_checkpoint(folder / f"round-{before['round']}.npz")
        meta = {"round": before["round"], "score": before["centralized"]["accuracy"]}
        save_checkpoint(folder / "last.npz", arrays, meta)
        self.note(f"run folder rewound to round {before['round']} (server.sqlite untouched)")

    def check_processes(self) -> None:
        """Every process this deployment started, and any child of theirs, is gone."""
        alive = []
        for pid, (name, created) in self.seen.items():
            try:
                p = psutil.Process(pid)
                if p.create_time() == created and p.status() != psutil.STATUS_ZOMBIE:
                    alive.append(f"{name} (pid {pid}, {p.status()})")
            except psutil.NoSuchProcess:
                pass
        assert not alive, f"processes left behind: {alive}\n{self.context()}"
        mine = {p.pid for p in psutil.Process().children(recursive=True)} & set(self.seen)
        assert not mine, f"children of the test still running: {mine}"

    def check_memory(self, bound_mib: float) -> int:
        """The server's RSS stayed below ``bound_mib`` in every sample; returns the peak."""
        assert self.rss, "no memory sample of the server"
        peak = max(rss for _, _, rss in self.rss)
        every = self.rss[:: max(1, len(self.rss) // 40)]
        shown = [(round(t, 1), n, rss // MiB) for t, n, rss in every]
        assert peak <= bound_mib * MiB, (
            f"server RSS peaked at {peak / MiB:.0f} MiB, above the {bound_mib:g} MiB bound; "
            f"samples (s, rounds, MiB): {shown}\n{self.context()}"
        )
        self.note(f"server RSS peak {peak / MiB:.0f} MiB in {len(self.rss)} samples")
        return peak


def assert_same_model(a: list[np.ndarray], b: list[np.ndarray]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(x, y)


def check_ledger(
    final: list[np.ndarray], initial: list[np.ndarray], records: list[dict[str, Any]]
) -> int:
    """Each round's row of the ledger (see ``apps.py``) shows exactly the contributors its
    record lists, each counted once (1 / C each, C = the round's contributors); cells of
    rounds never run are untouched. Returns the number of contributions."""
    delta = final[0].astype(np.float64).reshape(-1) - initial[0].astype(np.float64).reshape(-1)
    total = 0
    for record in records:
        r = record["round"]
        row = delta[(r - 1) * STRIDE : r * STRIDE]
        trained = sorted(int(c) for c, v in record["clients"].items() if "train" in v)
        count = record["train"]["clients"]
        assert len(trained) == count, f"round {r}: {count} clients counted, records {trained}"
        for cid in trained:
            metrics = record["clients"][str(cid)]["train"]
            assert (metrics["client"], metrics["round"]) == (cid, r), f"round {r}: {metrics}"
        expected = np.zeros(STRIDE)
        expected[trained] = 1.0 / count
        assert np.allclose(row, expected, atol=1e-4), (
            f"round {r}: the ledger row {np.round(row, 4).tolist()} is not 1/{count} for "
            f"each of clients {trained} (an update averaged in twice, or one missing)"
        )
        total += count
    rest = delta[len(records) * STRIDE :]
    assert np.allclose(rest, 0, atol=1e-6), "the ledger has marks past the last round"
    assert np.array_equal(final[1], initial[1]), "the bias moved: no client trains it"
    return total


def reference_model(folder: Path) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """(initial, final) model of a fault-free deterministic run of ``folder/run.toml`` with
    the same ledger clients, simulated in this process."""
    from pollinate import config
    from pollinate.experiment import build_run, build_strategy
    from pollinate.simulation import simulate
    from tests.chaos.apps import ledger

    cfg = config.load(folder / "run.toml")
    initial = build_run(cfg).initial_arrays
    result = simulate(
        ledger,
        num_clients=cfg.data.num_clients,
        strategy=build_strategy(cfg, None),
        initial_arrays=initial,
        rounds=cfg.run.rounds,
        backend="sequential",
        seed=cfg.run.seed,
        deterministic=True,
    )
    return initial, result.arrays
