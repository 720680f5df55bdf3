"""Real-world conditions on the wire: real `pollinate server` and `pollinate client` processes
on 127.0.0.1 talking through a TCP relay (tests/chaos/proxy.py) that counts every byte and
can flip one: compressed updates really shrink on the wire, and an upload corrupted in transit
is caught by the transport's SHA-256 check and never averaged in, and its client stays."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from pollinate import config
from pollinate.callbacks import load_checkpoint
from pollinate.experiment import run_experiment
from tests.chaos.proxy import DOWN, UP, ChaosProxy, Fault, Schedule
from tests.test_deploy import Cluster, assert_same_model, free_port, patience, write_config

pytestmark = pytest.mark.slow


def _server(cluster: Cluster, port: int) -> list[str]:
    return ["server", "run.toml", "--address", f"127.0.0.1:{port}", "--insecure", "-q"]


def _client(address: str, i: int) -> list[str]:
    args = ["client", "--server", address, "--config", "run.toml", "--partition", str(i)]
    return [*args, "--insecure", "--threads", "1"]


def _simulated(folder: Path, *overrides: str) -> list[np.ndarray]:
    out = folder / "runs" / f"simulated-{len(list((folder / 'runs').glob('simulated-*')))}"
    cfg = config.load(
        folder / "run.toml",
        [f"run.output={out}", "simulation.backend=sequential", *overrides],
    )
    return run_experiment(cfg, quiet=True).arrays


def _deploy(folder: Path, clients: int) -> tuple[dict[str, int], dict[str, object]]:
    """Run the config in ``folder`` with every client behind one relay; the bytes that went
    each way through it, and the history."""
    cluster = Cluster(folder)
    try:
        port = free_port()
        server = cluster.start("server", *_server(cluster, port))
        with ChaosProxy(port, upstream_retry_s=30.0) as proxy:
            procs = [
                cluster.start(f"client{i}", *_client(proxy.address, i)) for i in range(clients)
            ]
            assert server.wait(timeout=patience(300)) == 0, cluster.log("server")
            for i, proc in enumerate(procs):
                assert proc.wait(timeout=patience(60)) == 0, cluster.log(f"client{i}")
            moved = dict(proxy.moved)
    finally:
        cluster.stop_all()
    return moved, json.loads((folder / "runs/deployed/history.json").read_text())


def test_compressed_updates_shrink_on_the_wire_and_train_as_in_simulation(tmp_path: Path) -> None:
    """The same run twice through the relay: float32 models both ways, then 8-bit QSGD
    updates up and float16 models down. The client half runs in the deployed client, the
    server half on the server before the update check: the deployed model is bit-identical to
    the simulation's, and the bytes on the wire (payloads and all gRPC framing) shrink."""
    model = '[model]\nname = "mlp"\nhidden = [256]\n'  # 19,210 parameters: 77 kB as float32
    compressed = '[compression]\nuplink = "qsgd"\nbits = 8\ndownlink = "fp16"\n'
    write_config(tmp_path / "plain", 2, 3, model, dataset="digits", epochs=1)
    write_config(tmp_path / "qsgd", 2, 3, model + compressed, dataset="digits", epochs=1)
    plain, plain_history = _deploy(tmp_path / "plain", 3)
    small, history = _deploy(tmp_path / "qsgd", 3)
    # uplink: 6 updates of 77 kB (float32) against ~20 kB (one byte a coordinate, a float64
    # norm per bucket of 512); downlink: the model to 3 clients twice a round, half the bytes
    print(f"bytes through the relay: float32 {plain}, qsgd-8 up / fp16 down {small}")
    assert small[UP] < 0.4 * plain[UP], (small, plain)
    assert small[DOWN] < 0.65 * plain[DOWN], (small, plain)
    assert plain[UP] > 6 * 77_000  # the float32 updates all went through the relay
    for record in history["rounds"]:  # type: ignore[union-attr]
        assert record["train"]["clients"] == 3
        assert {c["train"]["compression"] for c in record["clients"].values()} == {"qsgd"}
    accuracy = [r["centralized"]["accuracy"] for r in history["rounds"]]  # type: ignore[index]
    plain_accuracy = [r["centralized"]["accuracy"] for r in plain_history["rounds"]]  # type: ignore[index]
    assert accuracy[-1] > 0.8 and abs(accuracy[-1] - plain_accuracy[-1]) < 0.05
    deployed, _ = load_checkpoint(tmp_path / "qsgd/runs/deployed/checkpoints/last.npz")
    assert_same_model(deployed, _simulated(tmp_path / "qsgd"))


def test_an_upload_corrupted_in_transit_is_rejected_and_never_averaged_in(tmp_path: Path) -> None:
    """Client 3 reaches the server through a relay that inverts one byte of its first upload,
    inside the model's bytes (200 bytes after the payload's magic), without TLS, so only the
    transport's SHA-256 of the payload can notice. The server rejects that upload, not the
    client: round 1 is the model of clients 0-2 alone (the simulation with client 3 offline),
    and the same client process, on the same connection, takes part in round 2."""
    write_config(
        tmp_path,
        2,
        4,
        '[model]\nname = "logreg"\n',
        dataset="digits",
        epochs=1,
        min_train_clients=3,
        fraction_evaluate=0.0,
    )
    cluster = Cluster(tmp_path)
    flip = Fault("flip", UP, at_bytes=200, marker=b"PLN1")
    try:
        port = free_port()
        server = cluster.start("server", *_server(cluster, port))
        with ChaosProxy(port, Schedule(fixed={0: [flip]}), upstream_retry_s=30.0) as proxy:
            for i in range(3):
                cluster.start(f"client{i}", *_client(f"127.0.0.1:{port}", i))
            relayed = cluster.start("client3", *_client(proxy.address, 3))
            assert server.wait(timeout=patience(300)) == 0, cluster.log("server")
            assert relayed.wait(timeout=patience(60)) == 0, cluster.log("client3")
            assert len(proxy.flipped) == 1, proxy.report()
            assert proxy.connections == 1, proxy.report()  # it never had to reconnect
    finally:
        cluster.stop_all()
    log = cluster.log("client3")
    assert "its upload for task 1.train.3." in log and "was rejected by the server" in log, log
    assert f"rejected by {proxy.address}" not in log, log  # the client itself never was
    history = json.loads((tmp_path / "runs/deployed/history.json").read_text())
    first, second = history["rounds"]
    assert first["train"]["clients"] == 3 and first["train"]["failures"] == 1
    (failure,) = first["failures"]
    assert failure["client_id"] == 3 and failure["task"] == "train"
    assert failure["reason"].startswith("corrupted: the upload failed its SHA-256 check")
    assert first["train"]["corrupted"] == 1
    assert second["train"]["clients"] == 4 and second["train"]["failures"] == 0
    round_1, _ = load_checkpoint(tmp_path / "runs/deployed/checkpoints/round-1.npz")
    trace = tmp_path / "offline3.csv"
    trace.write_text("client_id,online\n0,1\n1,1\n2,1\n3,0\n")
    without_3 = _simulated(tmp_path, "run.rounds=1", f"environment.trace={trace}")
    assert_same_model(round_1, without_3)
    with_3 = _simulated(tmp_path, "run.rounds=1")
    assert not all(np.array_equal(a, b) for a, b in zip(round_1, with_3))
