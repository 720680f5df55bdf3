"""Two hundred light clients (logistic regression on tiny digits partitions), each with its
own gRPC connection, complete three rounds with one server."""

from __future__ import annotations

import threading

import pytest
import torch

from pollinate.data import FederatedDataset, load_dataset, make_partitioner
from pollinate.frameworks.torch import classification_app, initial_arrays, torch_evaluator
from pollinate.models import model_fn
from pollinate.server import run
from pollinate.strategy import FedAvg
from pollinate.transport.grpc.client import Backoff, run_client
from pollinate.transport.grpc.server import FleetServer, GrpcExecutor
from tests.waiting import patience

CLIENTS = 200


@pytest.mark.slow
def test_two_hundred_clients_complete_three_rounds() -> None:
    data = FederatedDataset.build(
        load_dataset("digits"), make_partitioner("iid"), CLIENTS, test_fraction=0.0, seed=0
    )
    build = model_fn("logreg", (1, 8, 8), 10)
    app = classification_app(build, data)
    threads_before = torch.get_num_threads()
    torch.set_num_threads(1)
    fleet = FleetServer("127.0.0.1:0", run_id="scale", heartbeat_s=patience(5.0)).start()
    stop = threading.Event()
    workers = [
        threading.Thread(
            target=run_client,
            args=(fleet.address, app, cid),
            kwargs={"stop_event": stop, "backoff": Backoff(0.05, 2.0, 1.0)},
            daemon=True,
        )
        for cid in range(CLIENTS)
    ]
    try:
        for w in workers:
            w.start()
        assert fleet.wait_for(CLIENTS, timeout=patience(120)), f"{len(fleet.connected())} connected"
        strategy = FedAvg(
            min_train_clients=CLIENTS,
            min_available_clients=CLIENTS,
            fraction_evaluate=0.0,
            round_timeout_s=patience(300),
            train_config={"epochs": 1, "batch_size": 8, "lr": 0.1},
            evaluate_fn=torch_evaluator(build, *data.server_test()),
        )
        result = run(
            strategy,
            GrpcExecutor(fleet),
            fleet.connected(),
            initial_arrays(build, 0),
            rounds=3,
        )
    finally:
        stop.set()
        fleet.stop(grace=0.5)
        for w in workers:
            w.join(timeout=30)
        torch.set_num_threads(threads_before)
    assert [r["train"]["clients"] for r in result.history.rounds] == [CLIENTS] * 3
    assert all(r["train"]["failures"] == 0 for r in result.history.rounds)
    accuracy = result.history.metric("centralized", "accuracy")
    assert accuracy[-1] > accuracy[0]  # they really trained together
