"""FedBuff over gRPC: a real `pollinate server` applying results as they arrive from real
`pollinate client` processes on 127.0.0.1 (slow), and the asynchronous task executor on an
in-process FleetServer with client threads (fast)."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from pollinate.callbacks import load_checkpoint
from pollinate.client import task_seed
from pollinate.config import load
from pollinate.experiment import build_run
from pollinate.transport.grpc.asynchronous import AsyncGrpcTasks
from pollinate.types import TrainIns, TrainRes
from tests.fakes import initial
from tests.test_deploy import (
    Cluster,
    client_args,
    free_port,
    patience,
    server_args,
    write_config,
)
from tests.test_grpc_transport import GateClient, clients, serve, started  # noqa: F401 (fixture)


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Cluster]:
    c = Cluster(tmp_path)
    assert c.cli("certs", "certs").returncode == 0
    assert c.cli("keys", "certs", "0", "1", "2", "3").returncode == 0
    try:
        yield c
    finally:
        c.stop_all()


@pytest.mark.slow
def test_fedbuff_server_steps_as_results_arrive(fleet: Cluster) -> None:
    """Three clients train at once, the server steps every two results. Client 3 stalls in
    its first task (from the first model: it is the one idle client when the first result
    frees a slot, if not picked before) and the others carry the run without waiting for it;
    its task is still in flight at the end and is cancelled."""
    folder = fleet.folder
    write_config(
        folder,
        rounds=4,
        clients=4,
        name="fedbuff",
        concurrency=3,
        buffer_size=2,
        evaluate_every=2,
        round_timeout_s=120,
    )
    port = free_port()
    server = fleet.start("server", *server_args(port))
    clients = [fleet.start(f"client{i}", *client_args(port, i), "--threads", "1") for i in range(3)]
    app = ["client", "--server", f"127.0.0.1:{port}", "--app", "deploy_apps:sleepy"]
    app += ["--client-id", "3", "--certs", "certs"]
    fleet.start("straggler", *app, env={"POLLINATE_SLEEP_ROUND": "1"})
    assert server.wait(timeout=patience(300)) == 0, fleet.log("server")
    straggler = fleet.log("straggler")
    assert "task 1.train.3." in straggler and "cancelled by the server" in straggler
    history = json.loads((folder / "runs/deployed/history.json").read_text())
    steps = history["rounds"]
    assert [r["round"] for r in steps] == [1, 2, 3, 4]  # one record per server step
    assert all(r["train"]["clients"] == 2 and r["async"]["applied"] == 2 for r in steps)
    # three clients in flight, two results per step: some results were a step stale
    assert steps[0]["async"]["mean_staleness"] == 0
    assert max(r["async"]["max_staleness"] for r in steps[1:]) >= 1
    assert all(r["async"]["dispatched"] >= 2 * r["round"] + 1 for r in steps)
    assert all("3" not in r["clients"] for r in steps)  # the straggler held no step up
    assert [("centralized" in r) for r in steps] == [False, True, False, True]
    cfg = load(folder / "run.toml")
    initial = build_run(cfg).initial_arrays
    final, _ = load_checkpoint(folder / "runs/deployed/checkpoints/last.npz")
    moved = sum(float(np.abs(a - b).sum()) for a, b in zip(final, initial))
    assert moved > 0 and all(np.isfinite(a).all() for a in final)
    assert steps[-1]["centralized"]["accuracy"] > 0.5  # digits: 10 classes, chance is 0.1
    for i, c in enumerate(clients):  # told the run is over, clients stop by themselves
        assert c.wait(timeout=60) == 0, fleet.log(f"client{i}")


def test_async_tasks_over_grpc_time_out_fail_fast_and_carry_their_seed(
    started: Any,  # noqa: F811 (the fixture imported from test_grpc_transport)
) -> None:
    """``AsyncGrpcTasks`` on a real FleetServer with client threads: a stalled client's
    task times out (its slot is free again), an unconnected client fails at once, and a
    result carries the simulation's seed for its dispatch number."""
    gate = threading.Event()
    fleet = serve(started)
    clients(started, fleet, [0])
    clients(started, fleet, [1], lambda ctx: GateClient(gate))
    tasks = AsyncGrpcTasks(fleet, seed=5, timeout_s=0.5)
    ins = TrainIns(initial(), {"round": 1})
    tasks.start(0, 1, ins)
    task, outcome = tasks.next()  # nothing else in flight: the stalled task's timeout
    assert task == 0 and outcome.client_id == 1 and (outcome.error or "").startswith("timeout")
    tasks.start(1, 7, ins)
    task, outcome = tasks.next()
    assert task == 1 and outcome.error == "client 7 is not connected"
    tasks.start(2, 0, ins)
    task, outcome = tasks.next()
    assert task == 2 and outcome.ok and isinstance(outcome.result, TrainRes)
    assert outcome.result.metrics["seed"] == task_seed(5, 2, 0) % 1000
    gate.set()
    tasks.close()
    assert fleet.status()["tasks_in_flight"] == 0
