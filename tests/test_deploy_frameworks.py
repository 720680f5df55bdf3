"""Every non-torch framework over gRPC: a config-driven run with a real ``pollinate server``
and two ``pollinate client --config --partition`` processes on 127.0.0.1, compared with the
simulation of the same config (``pollinate run``, sequential backend) in a process with the
clients' thread settings. The torch path is covered by tests/test_deploy.py."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from pollinate.callbacks import load_checkpoint
from tests.test_deploy import (
    Cluster,
    client_args,
    free_port,
    patience,
    server_args,
    wait_until,
)

pytestmark = pytest.mark.slow

# [model] (and the other sections' lines) per framework: small models on 8x8 digits
FRAMEWORKS: dict[str, dict[str, list[str]]] = {
    "keras": {"model": ['framework = "keras"', 'name = "mlp"', "hidden = [32]"]},
    "jax": {"model": ['framework = "jax"', 'name = "mlp"', "hidden = [32]"]},
    "sklearn": {"model": ['framework = "sklearn"', 'name = "sgd"'], "train": ["lr = 0.01"]},
    "xgboost": {
        "model": ['framework = "xgboost"', 'name = "gbtree"', "max_depth = 3"],
        "strategy": ['name = "fedxgb_bagging"'],
    },
}


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    c = Cluster(tmp_path)
    assert c.cli("certs", "certs").returncode == 0
    assert c.cli("keys", "certs", "0", "1").returncode == 0
    try:
        yield c
    finally:
        c.stop_all()


def write_config(folder: Path, framework: str) -> None:
    """Two clients, two rounds, one local epoch, deterministic aggregation."""
    sections = {
        "run": ["rounds = 2", 'output = "runs/deployed"', "deterministic = true"],
        "data": ["num_clients = 2"],
        "model": [],
        "train": ["epochs = 1"],
        "strategy": ["min_available_clients = 2", "min_train_clients = 2"],
        "simulation": ['backend = "sequential"'],
    }
    for section, lines in FRAMEWORKS[framework].items():
        sections[section] += lines
    text = "".join(
        f"[{name}]\n" + "".join(f"{line}\n" for line in lines) for name, lines in sections.items()
    )
    (folder / "run.toml").write_text(text)


def history(folder: Path, run: str) -> list[dict]:
    rounds: list[dict] = json.loads((folder / "runs" / run / "history.json").read_text())["rounds"]
    return rounds


@pytest.mark.parametrize("framework", list(FRAMEWORKS))
def test_framework_over_grpc_equals_the_simulation(cluster: Cluster, framework: str) -> None:
    folder = cluster.folder
    write_config(folder, framework)
    port = free_port()
    server = cluster.start("server", *server_args(port))
    clients = [cluster.start(f"client{i}", *client_args(port, i)) for i in range(2)]

    def finished() -> bool:  # fails at once when a client crashes
        for i, c in enumerate(clients):
            assert c.poll() in (None, 0), cluster.log(f"client{i}")
        return server.poll() is not None

    wait_until(finished, f"the {framework} run over gRPC", 300)
    assert server.returncode == 0, cluster.log("server")
    for i, c in enumerate(clients):  # told the run is over, clients stop by themselves
        assert c.wait(timeout=patience(60)) == 0, cluster.log(f"client{i}")

    deployed = history(folder, "deployed")
    assert [r["round"] for r in deployed] == [1, 2]
    assert all(r["train"]["clients"] == 2 and r["train"]["failures"] == 0 for r in deployed)
    accuracy = [r["centralized"]["accuracy"] for r in deployed]
    assert accuracy[-1] > 0.6, accuracy  # 10 classes: chance is 0.1
    assert all(r["federated"]["accuracy"] > 0.5 for r in deployed)
    arrays, _ = load_checkpoint(folder / "runs/deployed/checkpoints/last.npz")

    # the same config simulated, in a process with the clients' threads (OMP_NUM_THREADS=1)
    sim = cluster.cli(
        "run", "run.toml", "--set", "run.output=runs/simulated", timeout=patience(300)
    )
    assert sim.returncode == 0, sim.stderr[-3000:]
    simulated, _ = load_checkpoint(folder / "runs/simulated/checkpoints/last.npz")
    assert len(arrays) == len(simulated)
    for a, b in zip(arrays, simulated):
        np.testing.assert_array_equal(a, b)
    for d, s in zip(deployed, history(folder, "simulated")):
        assert d["centralized"] == s["centralized"]
        assert d["train"]["metrics"] == s["train"]["metrics"]
