"""Deployment end to end: real `pollinate server` and `pollinate client` processes on
127.0.0.1, with TLS and client authentication, started and stopped by the tests."""

from __future__ import annotations

import functools
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from pollinate import config
from pollinate.callbacks import load_checkpoint
from pollinate.experiment import run_experiment
from tests import waiting
from tests.waiting import patience

TESTS = Path(__file__).resolve().parent
pytestmark = pytest.mark.slow
# these waits poll log and history files that change every few seconds
wait_until = functools.partial(waiting.wait_until, poll_s=0.2)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Cluster:
    """Starts pollinate processes in a folder and kills whatever is left at the end."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.procs: list[subprocess.Popen[str]] = []
        self.env = {
            **os.environ,
            "OMP_NUM_THREADS": "1",  # many torch processes share two cores
            "PYTHONUNBUFFERED": "1",
            "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
            "POLLINATE_TEST_CONFIG": str(folder / "run.toml"),
        }

    def cli(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "pollinate.cli", *args],
            cwd=self.folder,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def start(
        self, name: str, *args: str, env: dict[str, str] | None = None
    ) -> subprocess.Popen[str]:
        log = open(self.folder / f"{name}.log", "a")  # noqa: SIM115 - closed with the process
        proc = subprocess.Popen(
            [sys.executable, "-m", "pollinate.cli", *args],
            cwd=self.folder,
            env={**self.env, **(env or {})},
            stdout=log,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.procs.append(proc)
        return proc

    def log(self, name: str) -> str:
        return (self.folder / f"{name}.log").read_text()

    def stop_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
        for proc in self.procs:
            proc.wait(timeout=30)


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    c = Cluster(tmp_path)
    assert c.cli("certs", "certs").returncode == 0
    assert c.cli("keys", "certs", "0", "1", "2", "3", "4", "5").returncode == 0
    try:
        yield c
    finally:
        c.stop_all()


def write_config(
    folder: Path,
    rounds: int,
    clients: int,
    extra: str = "",
    *,
    dataset: str | None = None,
    epochs: int = 2,
    **strategy: object,
) -> Path:
    """``folder/run.toml``: a deterministic run of ``clients`` clients, the ``strategy`` keys,
    then the ``extra`` TOML text (sections of its own)."""
    lines = [
        "[run]",
        f"rounds = {rounds}",
        'output = "runs/deployed"',
        "deterministic = true",
        "[data]",
        *([f"dataset = {json.dumps(dataset)}"] if dataset else []),
        f"num_clients = {clients}",
        "[train]",
        f"epochs = {epochs}",
        "[strategy]",
        f"min_available_clients = {clients}",
    ]
    lines += [f"{k} = {json.dumps(v)}" for k, v in strategy.items()]
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "run.toml"
    path.write_text("\n".join(lines) + "\n" + extra)
    return path


def simulated(folder: Path, backend: str = "sequential") -> list[np.ndarray]:
    cfg = config.load(
        folder / "run.toml",
        [f"run.output={folder / 'runs' / 'simulated'}", f"simulation.backend={backend}"],
    )
    return run_experiment(cfg, quiet=True).arrays


def rounds_done(folder: Path) -> int:
    try:
        return len(json.loads((folder / "runs/deployed/history.json").read_text())["rounds"])
    except (OSError, ValueError):
        return 0


def server_args(port: int) -> list[str]:
    return ["server", "run.toml", "--address", f"127.0.0.1:{port}", "--certs", "certs", "-q"]


def client_args(port: int, i: int) -> list[str]:
    return [
        "client",
        "--server",
        f"127.0.0.1:{port}",
        "--config",
        "run.toml",
        "--partition",
        str(i),
        "--certs",
        "certs",
    ]


def assert_same_model(a: list[np.ndarray], b: list[np.ndarray]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)


def test_deployed_run_equals_simulation(cluster: Cluster) -> None:
    folder = cluster.folder
    write_config(folder, rounds=3, clients=5)
    port = free_port()
    transport = ["--heartbeat-s", "1.5", "--result-memory-mib", "1"]
    transport += ["--grpc-option", "grpc.http2.bdp_probe=0"]
    transport += ["--stall-s", "7", "--max-metrics-keys", "32", "--max-streams", "64"]
    server = cluster.start("server", *server_args(port), *transport)
    clients = [cluster.start(f"client{i}", *client_args(port, i)) for i in range(5)]
    wait_until(lambda: rounds_done(folder) >= 1, "round 1", timeout=180, alive=(server,))
    status = cluster.cli("status", f"127.0.0.1:{port}", "--certs", "certs", "--client-id", "0")
    assert status.returncode == 0, status.stderr
    assert "clients connected: 5" in status.stdout and "  0 1 2 3 4" in status.stdout
    assert "heartbeat_s: 1.5" in status.stdout  # the transport settings reached the server
    assert f"result_memory_bytes: {1 << 20}" in status.stdout
    assert "stall_s: 7" in status.stdout and "max_metrics_keys: 32" in status.stdout
    anonymous = cluster.cli("status", f"127.0.0.1:{port}", "--certs", "certs")
    assert "clients connected: 5" in anonymous.stdout  # a count only, without a client key
    assert "0 1 2 3 4" not in anonymous.stdout and "counts only" in anonymous.stdout
    assert server.wait(timeout=patience(300)) == 0, cluster.log("server")
    history = json.loads((folder / "runs/deployed/history.json").read_text())
    assert [r["round"] for r in history["rounds"]] == [1, 2, 3]
    assert all(r["train"]["clients"] == 5 for r in history["rounds"])
    deployed, _ = load_checkpoint(folder / "runs/deployed/checkpoints/last.npz")
    assert_same_model(deployed, simulated(folder))
    assert (folder / "runs/deployed/report.html").is_file()
    for i, c in enumerate(clients):  # told the run is over, clients stop by themselves
        assert c.wait(timeout=patience(60)) == 0, cluster.log(f"client{i}")
    assert "finished all 3 rounds" in cluster.log("client0")


@pytest.mark.parametrize(
    ("strategy", "keys"),
    [
        ("fedprox", {"proximal_mu": 0.1}),
        ("fednova", {}),
        ("qfedavg", {"q": 0.5}),
        ("multikrum", {"num_malicious": 1, "min_train_clients": 5}),
    ],
)
def test_strategies_over_grpc_equal_the_simulation(
    cluster: Cluster, strategy: str, keys: dict[str, object]
) -> None:
    """Each family's client and server halves work with real client processes, and the
    deployed model is bit-identical to the deterministic simulation."""
    folder = cluster.folder
    write_config(folder, rounds=2, clients=5, name=strategy, **keys)
    port = free_port()
    server = cluster.start("server", *server_args(port))
    for i in range(5):
        cluster.start(f"client{i}", *client_args(port, i), "--threads", "1")
    assert server.wait(timeout=patience(300)) == 0, cluster.log("server")
    deployed, _ = load_checkpoint(folder / "runs/deployed/checkpoints/last.npz")
    assert_same_model(deployed, simulated(folder))


def test_client_killed_mid_round_then_rejoins(cluster: Cluster) -> None:
    folder = cluster.folder
    write_config(folder, rounds=4, clients=4, min_train_clients=2, round_timeout_s=120)
    port = free_port()
    server = cluster.start("server", *server_args(port)[:-1])
    for i in range(3):
        cluster.start(f"client{i}", *client_args(port, i))
    app = [
        "client",
        "--server",
        f"127.0.0.1:{port}",
        "--app",
        "deploy_apps:sleepy",
        "--client-id",
        "3",
        "--certs",
        "certs",
    ]
    victim = cluster.start("victim", *app, env={"POLLINATE_SLEEP_ROUND": "2"})
    wait_until(
        lambda: "stalling in round 2" in cluster.log("victim"),
        "the stall",
        timeout=180,
        alive=(server,),
    )
    victim.send_signal(signal.SIGKILL)
    victim.wait(timeout=30)
    wait_until(
        lambda: rounds_done(folder) >= 2,
        "round 2 without the killed client",
        timeout=60,
        alive=(server,),
    )
    cluster.start("victim-again", *app)  # same identity, no stall
    wait_until(lambda: rounds_done(folder) >= 4, "round 4", timeout=240, alive=(server,))
    history = json.loads((folder / "runs/deployed/history.json").read_text())
    round2 = history["rounds"][1]
    assert round2["train"]["clients"] == 3
    assert any(f["client_id"] == 3 for f in round2["failures"])
    assert "3" in history["rounds"][3]["clients"]  # back in a later round


@pytest.mark.parametrize("strategy", ["fedavg", "fedadam", "scaffold"])
def test_server_killed_after_round_2_resumes(cluster: Cluster, strategy: str) -> None:
    """The resumed run ends bit-identical to a simulation that never stopped: the global model,
    the strategy's state (FedAdam's moments, SCAFFOLD's server variate) and the clients'
    state (SCAFFOLD's client variates, back to their start of round 3)."""
    folder = cluster.folder
    write_config(folder, rounds=5, clients=3, name=strategy)
    port = free_port()
    server = cluster.start("server", *server_args(port))
    for i in range(1, 3):
        cluster.start(f"client{i}", *client_args(port, i))
    # client 0 holds round 3 until the gate file exists: the kill lands mid-run, however
    # fast the rounds are
    gate = folder / "gate"
    app = ["client", "--server", f"127.0.0.1:{port}", "--app", "deploy_apps:gated"]
    app += ["--client-id", "0", "--certs", "certs"]
    cluster.start(
        "client0", *app, env={"POLLINATE_GATE_ROUND": "3", "POLLINATE_GATE_FILE": str(gate)}
    )
    wait_until(
        lambda: "gate in round 3" in cluster.log("client0"), "round 3", timeout=180, alive=(server,)
    )
    assert rounds_done(folder) == 2
    server.send_signal(signal.SIGKILL)
    server.wait(timeout=30)
    gate.touch()
    restarted = cluster.start("server-again", *server_args(port))
    assert restarted.wait(timeout=patience(300)) == 0, cluster.log("server-again")
    assert "resuming after round 2" in cluster.log("server-again")
    history = json.loads((folder / "runs/deployed/history.json").read_text())
    assert [r["round"] for r in history["rounds"]] == [1, 2, 3, 4, 5]
    deployed, meta = load_checkpoint(folder / "runs/deployed/checkpoints/last.npz")
    assert meta["round"] == 5
    assert_same_model(deployed, simulated(folder))
    again = cluster.cli(*server_args(port))  # a finished run says so, even with -q
    assert again.returncode == 0 and "already finished all 5 rounds" in again.stdout


def test_secure_aggregation_survives_two_clients_killed_mid_protocol(cluster: Cluster) -> None:
    folder = cluster.folder
    secure = "[secure_aggregation]\nenabled = true\nneighbours = 5\nthreshold = 3\n"
    write_config(folder, rounds=1, clients=6, extra=secure, min_train_clients=3)
    port = free_port()
    server = cluster.start("server", *server_args(port))
    for i in range(4):
        cluster.start(f"client{i}", *client_args(port, i))
    victims = []
    for i in (4, 5):  # they stall in the masked stage, after their keys and shares went out
        app = ["client", "--server", f"127.0.0.1:{port}", "--app", "deploy_apps:sleepy"]
        app += ["--client-id", str(i), "--certs", "certs"]
        victims.append(cluster.start(f"victim{i}", *app, env={"POLLINATE_SLEEP_ROUND": "1"}))
    for i in (4, 5):  # eight processes start on shared cores: the wait scales with the load
        wait_until(
            lambda i=i: "stalling in round 1" in cluster.log(f"victim{i}"),
            f"victim {i} to stall in the masked stage",
            timeout=120,
            alive=(server, *victims),
        )
    for victim in victims:
        victim.send_signal(signal.SIGKILL)
        victim.wait(timeout=30)
    assert server.wait(timeout=patience(300)) == 0, cluster.log("server")
    (record,) = json.loads((folder / "runs/deployed/history.json").read_text())["rounds"]
    assert record["train"]["clients"] == 4
    dropped = {f["client_id"]: f["reason"] for f in record["failures"] if f["task"] == "train"}
    assert set(dropped) == {4, 5} and all("masked stage" in r for r in dropped.values())
    # the unmasked sum is a trained model (a wrongly unmasked one scores like chance, 0.1)
    assert record["centralized"]["accuracy"] > 0.3


def test_unknown_client_and_wrong_ca_are_refused(cluster: Cluster) -> None:
    folder = cluster.folder
    write_config(folder, rounds=1, clients=2)
    port = free_port()
    cluster.start("server", *server_args(port))
    # an identity the server's allow-list does not hold
    assert cluster.cli("keys", "stranger", "7").returncode == 0
    unknown = cluster.cli(
        "client",
        "--server",
        f"127.0.0.1:{port}",
        "--config",
        "run.toml",
        "--partition",
        "1",
        "--client-id",
        "7",
        "--ca",
        "certs/ca.crt",
        "--key",
        "stranger/client-7.key",
        timeout=patience(120),
    )
    assert unknown.returncode != 0
    assert "allow-list" in unknown.stderr
    # a client that trusts another CA cannot talk to this server
    assert cluster.cli("certs", "other").returncode == 0
    wrong_ca = cluster.cli(
        "client",
        "--server",
        f"127.0.0.1:{port}",
        "--config",
        "run.toml",
        "--partition",
        "0",
        "--ca",
        "other/ca.crt",
        "--key",
        "certs/client-0.key",
        "--max-retries",
        "1",
        timeout=patience(120),
    )
    assert wrong_ca.returncode != 0
    assert "gave up" in wrong_ca.stderr


def server_status(folder: Path) -> str:
    conn = sqlite3.connect(folder / "runs/deployed/server.sqlite")
    try:
        return str(conn.execute("SELECT status FROM run").fetchone()[0])
    finally:
        conn.close()


def test_a_second_server_on_the_same_run_folder_is_refused_at_once(cluster: Cluster) -> None:
    folder = cluster.folder
    write_config(folder, rounds=1, clients=2)
    first = cluster.start("server", *server_args(free_port()))
    wait_until(
        lambda: "listening on" in cluster.log("server"), "the server", timeout=60, alive=(first,)
    )
    second = cluster.cli(*server_args(free_port()))  # another port, the same run.output
    assert second.returncode == 2, second.stderr
    assert f"runs/deployed is in use by process {first.pid} " in second.stderr, second.stderr
    assert first.poll() is None  # the first one carries on, untouched


def test_a_failed_round_is_recorded_and_the_same_command_resumes(cluster: Cluster) -> None:
    folder = cluster.folder
    write_config(folder, rounds=2, clients=2, min_train_clients=2)
    port = free_port()
    server = cluster.start("server", *server_args(port))
    client0 = cluster.start("client0", *client_args(port, 0))
    fixed = folder / "fixed"
    app = ["client", "--server", f"127.0.0.1:{port}", "--app", "deploy_apps:failing"]
    app += ["--client-id", "1", "--certs", "certs"]
    env = {"POLLINATE_FAIL_ROUND": "2", "POLLINATE_FIXED_FILE": str(fixed)}
    client1 = cluster.start("client1", *app, env=env)
    # round 2 cannot count (one of its two clients fails): the server stops, and says why
    assert server.wait(timeout=patience(300)) == 1, cluster.log("server")
    log = cluster.log("server")
    assert "failed in round 2: RoundFailedError" in log, log
    assert "run the same command again to resume after round 1" in log
    assert server_status(folder).startswith("failed in round 2: RoundFailedError")
    assert rounds_done(folder) == 1
    fixed.touch()  # the clients keep trying to reconnect; the same command resumes
    again = cluster.start("server-again", *server_args(port))
    assert again.wait(timeout=patience(300)) == 0, cluster.log("server-again")
    assert "resuming after round 1" in cluster.log("server-again")
    assert server_status(folder) == "finished" and rounds_done(folder) == 2
    for c in (client0, client1):
        assert c.wait(timeout=patience(60)) == 0
    # a state database emptied by mistake next to this run is refused, not overwritten
    (folder / "runs/deployed/server.sqlite").write_bytes(b"")
    lost = cluster.cli(*server_args(port))
    assert lost.returncode == 1 and "is empty, but" in lost.stderr, lost.stderr
    assert "--fresh" in lost.stderr and rounds_done(folder) == 2
