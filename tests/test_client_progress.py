"""A deployed client says what it does: one INFO line per task (round, kind, seconds)."""

from __future__ import annotations

import logging
import re
import threading

from pollinate.server import run
from pollinate.strategy import FedAvg
from pollinate.transport.grpc.client import run_client
from pollinate.transport.grpc.server import FleetServer, GrpcExecutor
from tests.fakes import MeanClientFn, initial
from tests.waiting import WAIT, patience


def test_a_deployed_client_logs_one_line_per_task(caplog) -> None:
    caplog.set_level(logging.INFO, logger="pollinate")
    fleet = FleetServer("127.0.0.1:0", heartbeat_s=patience(0.5), run_id="progress").start()
    stop = threading.Event()
    threads = [
        threading.Thread(
            target=run_client,
            args=(fleet.address, MeanClientFn({2: "raise"}), cid),
            kwargs={"stop_event": stop},
            daemon=True,
        )
        for cid in (0, 1, 2)
    ]
    try:
        for thread in threads:
            thread.start()
        assert fleet.wait_for(3, timeout=WAIT)
        strategy = FedAvg(min_train_clients=2, min_evaluate_clients=2, min_available_clients=3)
        run(strategy, GrpcExecutor(fleet), [0, 1, 2], initial(), 2)
    finally:
        stop.set()
        fleet.stop(grace=0.1)
        for thread in threads:
            thread.join(WAIT)
    lines = [r for r in caplog.records if re.match(r"client \d: round \d", r.getMessage())]
    done = sorted(r.getMessage() for r in lines if r.levelno == logging.INFO)
    assert [m.split(" done in ")[0] for m in done] == [
        f"client {c}: round {r} {kind}"
        for c in (0, 1)
        for r in (1, 2)
        for kind in ("evaluate", "train")
    ]
    assert all(re.search(r" done in \d+\.\d\d s$", m) for m in done)
    failed = sorted(r.getMessage() for r in lines if r.levelno == logging.ERROR)
    assert [m.split(" failed after ")[0] for m in failed] == [
        "client 2: round 1 evaluate",
        "client 2: round 1 train",
        "client 2: round 2 evaluate",
        "client 2: round 2 train",
    ]
    assert all("Traceback" in m and "RuntimeError:" in m for m in failed)  # with the reason
    assert len(lines) == 12  # one line per task, nothing else
