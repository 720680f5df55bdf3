"""FedBuff over gRPC: a real `pollinate server` applying results as they arrive from real
`pollinate client` processes on 127.0.0.1."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from pollinate.callbacks import load_checkpoint
from pollinate.config import load
from pollinate.experiment import build_run
from tests.test_deploy import (
    Cluster,
    client_args,
    free_port,
    patience,
    server_args,
    write_config,
)

pytestmark = pytest.mark.slow


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Cluster]:
    c = Cluster(tmp_path)
    assert c.cli("certs", "certs").returncode == 0
    assert c.cli("keys", "certs", "0", "1", "2", "3").returncode == 0
    try:
        yield c
    finally:
        c.stop_all()


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
