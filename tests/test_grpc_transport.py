"""The gRPC transport end to end: real servers and clients on 127.0.0.1, ephemeral ports.

Clients run in threads (``run_client``), in a subprocess (killed with SIGKILL), or as a raw
hand-written stream on the generated stub that sends exactly the messages a test wants.
Every test stops the servers, clients and processes it starts.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import queue
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from pollinate import serde
from pollinate.client import ClientContext, task_seed
from pollinate.errors import ConfigError
from pollinate.security import make_ca, make_server_cert
from pollinate.server import run
from pollinate.simulation import simulate
from pollinate.strategy import FedAvg
from pollinate.strategy.check import failure_kind
from pollinate.transport.grpc import pollinate_pb2 as pb
from pollinate.transport.grpc import pollinate_pb2_grpc as pb_grpc
from pollinate.transport.grpc.auth import AllowList, Verifier, public_key_b64, sign
from pollinate.transport.grpc.client import (
    Backoff,
    ClientRejected,
    ServerUnreachable,
    fetch_status,
    run_client,
)
from pollinate.transport.grpc.codec import (
    PROTOCOL,
    register_digest,
    result_digest,
    to_signed,
)
from pollinate.transport.grpc.connection import ResultMemory
from pollinate.transport.grpc.server import FleetServer, GrpcExecutor
from pollinate.types import (
    EvaluateIns,
    EvaluateRes,
    Outcome,
    QueryIns,
    QueryRes,
    TrainIns,
    TrainRes,
)
from tests.chaos.proxy import DOWN, UP, ChaosProxy, Fault, Schedule
from tests.fakes import MeanClientFn, initial
from tests.waiting import WAIT, patience, wait_until

FAST = Backoff(initial_s=0.05, factor=2.0, max_s=0.5)
REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------ helpers


class ClientThread:
    """``run_client`` in a thread; ``close`` stops it and returns what it raised (if anything)."""

    def __init__(self, address: str, client_fn: Callable[[ClientContext], Any], cid: int, **kw):
        self.stop = threading.Event()
        self.error: BaseException | None = None
        kw.setdefault("backoff", FAST)
        self.thread = threading.Thread(
            target=self._run, args=(address, client_fn, cid), kwargs=kw, daemon=True
        )
        self.thread.start()

    def _run(self, address: str, client_fn: Any, cid: int, **kw: Any) -> None:
        try:
            run_client(address, client_fn, cid, stop_event=self.stop, **kw)
        except BaseException as e:
            self.error = e

    def close(self) -> BaseException | None:
        self.stop.set()
        self.thread.join(WAIT)
        assert not self.thread.is_alive(), "run_client did not stop"
        return self.error


@pytest.fixture
def started() -> Iterator[Callable[..., Any]]:
    """``started(thing)`` registers a server / client thread / raw stream / process to stop."""
    things: list[Any] = []
    yield lambda thing: things.append(thing) or thing
    for thing in reversed(things):
        if isinstance(thing, FleetServer):
            thing.stop(grace=0.1)
        elif isinstance(thing, ClientThread):
            thing.close()
        elif isinstance(thing, RawStream):
            thing.close()
        elif isinstance(thing, subprocess.Popen):
            if thing.poll() is None:
                thing.kill()
            thing.wait(WAIT)


def serve(started: Callable[..., Any], address: str = "127.0.0.1:0", **kw: Any) -> FleetServer:
    # 3 missed heartbeats drop a client: on a busy machine a thread can sleep that long
    kw.setdefault("heartbeat_s", patience(0.5))
    kw.setdefault("run_id", "test-run")
    return started(FleetServer(address, **kw).start())


def clients(
    started: Callable[..., Any], fleet: FleetServer, ids, client_fn: Any = None, **kw: Any
) -> list[ClientThread]:
    fn = client_fn if client_fn is not None else MeanClientFn()
    threads = [started(ClientThread(fleet.address, fn, cid, **kw)) for cid in ids]
    wait_connected(fleet, ids)
    return threads


def wait_connected(fleet: FleetServer, ids) -> None:
    wait_until(lambda: set(ids) <= set(fleet.connected()), f"clients {sorted(ids)} to connect")


def by_id(outcomes: Iterator[Outcome]) -> dict[int, Outcome]:
    out: dict[int, Outcome] = {}
    for o in outcomes:
        assert o.client_id not in out, "one outcome per planned client"
        out[o.client_id] = o
    return out


def train_plan(ids, arrays=None, config=None):
    ins = TrainIns(arrays if arrays is not None else initial(), dict(config or {"round": 1}))
    return [(cid, ins) for cid in ids]


class RawStream:
    """A hand-written client on the generated stub: sends what the test says, records replies."""

    def __init__(self, address: str, *, raw_bytes: bool = False) -> None:
        options = [("grpc.use_local_subchannel_pool", 1), ("grpc.max_send_message_length", -1)]
        self.channel = grpc.insecure_channel(address, options=options)
        if raw_bytes:  # send arbitrary bytes as frames, bypassing protobuf encoding
            join = self.channel.stream_stream(
                "/pollinate.v1.Fleet/Join",
                request_serializer=lambda b: b,
                response_deserializer=pb.ServerMessage.FromString,
            )
        else:
            join = pb_grpc.FleetStub(self.channel).Join
        self.out: queue.Queue[Any] = queue.Queue()
        self.inbox: queue.Queue[Any] = queue.Queue()
        self.call = join(self._requests())
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _requests(self) -> Iterator[Any]:
        while (msg := self.out.get()) is not None:
            yield msg

    def _read(self) -> None:
        try:
            for msg in self.call:
                self.inbox.put(msg)
            self.inbox.put("end")
        except grpc.RpcError as e:
            self.inbox.put(("error", e.code()))

    def send(self, msg: Any = None, **body: Any) -> None:
        self.out.put(msg if msg is not None else pb.ClientMessage(**body))

    def recv(self, skip: tuple[str, ...] = ("heartbeat",)) -> Any:
        """The next message (skipping ``skip`` kinds), "end", or ("error", code)."""
        while True:
            item = self.inbox.get(timeout=WAIT)
            if isinstance(item, pb.ServerMessage) and item.WhichOneof("body") in skip:
                continue
            return item

    def register(self, cid: int, key: Ed25519PrivateKey | None = None) -> pb.ServerMessage:
        self.send(register_message(cid, key))
        return self.recv()

    def expect_reject(self) -> str:
        """Read until the server's Reject; the stream must end right after it."""
        while True:
            item = self.recv(skip=("heartbeat", "welcome", "task", "chunk", "cancel"))
            assert isinstance(item, pb.ServerMessage), f"stream ended without a Reject: {item}"
            if item.WhichOneof("body") == "reject":
                assert self.recv() in ("end", ("error", grpc.StatusCode.CANCELLED))
                return item.reject.reason

    def take_task(self) -> tuple[pb.Task, bytes]:
        """Receive one task and its payload bytes."""
        msg = self.recv()
        assert msg.WhichOneof("body") == "task", msg
        data = b""
        while True:
            chunk = self.recv().chunk
            data += chunk.data
            if chunk.last:
                return msg.task, data

    def close(self) -> None:
        self.out.put(None)
        self.call.cancel()
        self.channel.close()
        self.reader.join(WAIT)


def register_message(
    cid: int, key: Ed25519PrivateKey | None = None, *, claimed_key: str | None = None
) -> pb.ClientMessage:
    """A Register signed with ``key``, presenting ``claimed_key`` (default: key's own)."""
    public = claimed_key or (public_key_b64(key) if key is not None else "")
    reg = pb.Register(client_id=cid, public_key=public, version="test", protocol=PROTOCOL)
    if key is not None:
        digest = register_digest(cid, public, "test", PROTOCOL)
        reg.signed.CopyFrom(to_signed(sign(key, "register", cid, digest)))
    return pb.ClientMessage(register=reg)


def submit_in_background(
    executor: GrpcExecutor, plan, timeout_s: float = WAIT, kind: str = "train"
) -> tuple[threading.Thread, list[Outcome]]:
    results: list[Outcome] = []

    def work() -> None:
        results.extend(executor.submit(1, kind, plan, timeout_s))  # type: ignore[arg-type]

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    return thread, results


class EchoClient:
    """Returns the arrays it was given (a model of any size goes there and back)."""

    def train(self, arrays, config):
        return TrainRes(list(arrays), num_examples=1, metrics={})

    def evaluate(self, arrays, config):
        return EvaluateRes(0.0, num_examples=1)


class GateClient:
    """Trains only once ``gate`` is open: a straggler on demand."""

    def __init__(self, gate: threading.Event) -> None:
        self.gate = gate

    def train(self, arrays, config):
        self.gate.wait(WAIT)
        return TrainRes(list(arrays), num_examples=1, metrics={"late": True})

    def evaluate(self, arrays, config):
        return EvaluateRes(0.0, num_examples=1)


# --------------------------------------------------------------------------- rounds and tasks


def test_train_and_evaluate_round_trip(started) -> None:
    fleet = serve(started)
    clients(started, fleet, [0, 1, 2])
    executor = GrpcExecutor(fleet, seed=7)
    arrays = initial()
    outcomes = by_id(executor.submit(1, "train", train_plan([0, 1, 2, 9], arrays), WAIT))
    assert outcomes[9].error == "client 9 is not connected"  # absent: fails at once
    for cid in (0, 1, 2):
        o = outcomes[cid]
        assert o.ok and isinstance(o.result, TrainRes), o.error
        np.testing.assert_array_equal(o.result.arrays[0], np.full((3, 4), cid, np.float32))
        np.testing.assert_array_equal(o.result.arrays[1], arrays[1] + 1)
        assert o.result.arrays[0].dtype == np.float32 and o.result.num_examples == cid + 1
        assert o.result.metrics["seed"] == task_seed(7, 1, cid) % 1000  # same seeds as simulation
        assert o.result.metrics["worker_pid"] == os.getpid()
    plan = [(cid, EvaluateIns(arrays, {"round": 1})) for cid in (0, 1, 2)]
    evaluated = by_id(executor.submit(1, "evaluate", plan, WAIT))
    for cid in (0, 1, 2):
        res = evaluated[cid].result
        assert isinstance(res, EvaluateRes) and res.loss == cid and res.num_examples == cid + 1
        assert res.metrics == {"accuracy": 1.0 / (1 + cid)}
    status = fleet.status()
    assert status["connected"] == [0, 1, 2] and status["tasks_in_flight"] == 0


def test_query_round_trip(started) -> None:
    fleet = serve(started)
    clients(started, fleet, [0, 1, 2], MeanClientFn({2: "raise"}))
    executor = GrpcExecutor(fleet)
    plan = [(cid, QueryIns([], {"scale": 3.0})) for cid in (0, 1, 2)]
    outcomes = by_id(executor.submit(1, "query", plan, WAIT))
    assert outcomes[2].error == "RuntimeError: refused"  # a refusal's reason reaches the server
    for cid in (0, 1):
        res = outcomes[cid].result
        assert isinstance(res, QueryRes) and res.num_examples == cid + 1
        n = cid + 1
        np.testing.assert_array_equal(res.arrays[0], [3 * n, 3 * n * cid, 3 * n * cid**2])
        assert res.arrays[0].dtype == np.float64


def test_client_errors_are_failed_outcomes_and_state_persists(started) -> None:
    fleet = serve(started)
    clients(started, fleet, [0, 1], MeanClientFn({1: "raise"}))
    executor = GrpcExecutor(fleet)
    for round_number in (1, 2, 3):
        outcomes = by_id(executor.submit(round_number, "train", train_plan([0, 1]), WAIT))
        assert outcomes[1].error == "RuntimeError: client 1 exploded"
        metrics = outcomes[0].result.metrics  # type: ignore[union-attr]
        assert metrics["state_rounds"] == round_number  # client state kept between rounds
    assert fleet.connected() == [0, 1]  # a failing client stays connected


def test_model_is_built_once_per_client_process(started) -> None:
    from tests.fakes import cache_client_fn

    fleet = serve(started)
    clients(started, fleet, [0, 1], cache_client_fn)
    executor = GrpcExecutor(fleet)
    for round_number in (1, 2, 3):
        outcomes = by_id(executor.submit(round_number, "train", train_plan([0, 1]), WAIT))
        for o in outcomes.values():
            assert o.result.metrics["model_builds"] == 1  # type: ignore[union-attr]
            assert o.result.metrics["worker_tasks"] == round_number  # type: ignore[union-attr]


def test_deployed_run_equals_simulation(started) -> None:
    def strategy() -> FedAvg:
        return FedAvg(min_train_clients=4, min_evaluate_clients=4, round_timeout_s=WAIT, seed=3)

    fleet = serve(started)
    clients(started, fleet, range(4))
    executor = GrpcExecutor(fleet, seed=5, deterministic=True)
    deployed = run(strategy(), executor, fleet.connected(), initial(), rounds=3)
    simulated = simulate(
        MeanClientFn(),
        num_clients=4,
        strategy=strategy(),
        initial_arrays=initial(),
        rounds=3,
        backend="sequential",
        seed=5,
        deterministic=True,
    )
    for a, b in zip(deployed.arrays, simulated.arrays):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(a, b)
    for mine, theirs in zip(deployed.history.rounds, simulated.history.rounds):
        assert mine["federated"] == theirs["federated"]
        for cid, entry in theirs["clients"].items():
            assert mine["clients"][cid]["train"]["seed"] == entry["train"]["seed"]
            assert mine["clients"][cid]["train"]["state_rounds"] == entry["train"]["state_rounds"]


def test_fifty_clients_one_round(started) -> None:
    fleet = serve(started, heartbeat_s=2.0)
    clients(started, fleet, range(50))
    outcomes = by_id(GrpcExecutor(fleet).submit(1, "train", train_plan(range(50)), WAIT))
    assert sorted(outcomes) == list(range(50))
    assert all(o.ok for o in outcomes.values()), [o.error for o in outcomes.values() if o.error]
    assert {o.result.arrays[0][0, 0] for o in outcomes.values()} == set(range(50))  # type: ignore[union-attr]


def test_straggler_times_out_and_serves_the_next_round(started) -> None:
    gate = threading.Event()
    fleet = serve(started)
    clients(started, fleet, [0])
    clients_now = clients(started, fleet, [1], lambda ctx: GateClient(gate))
    assert fleet.connected() == [0, 1]
    executor = GrpcExecutor(fleet)
    outcomes = by_id(executor.submit(1, "train", train_plan([0, 1]), timeout_s=patience(3.0)))
    assert outcomes[0].ok
    assert outcomes[1].error is not None and outcomes[1].error.startswith("timeout")
    assert fleet.status()["tasks_in_flight"] == 0
    gate.set()  # the straggler finishes late: its result is dropped, not a protocol error
    outcomes = by_id(executor.submit(2, "train", train_plan([0, 1]), WAIT))
    assert outcomes[1].ok and outcomes[1].result.metrics == {"late": True}  # type: ignore[union-attr]
    assert fleet.connected() == [0, 1] and clients_now[0].error is None


def test_consumer_stopping_early_frees_the_tasks(started) -> None:
    gate = threading.Event()
    fleet = serve(started)
    clients(started, fleet, [0])
    clients(started, fleet, [1], lambda ctx: GateClient(gate))
    stream = GrpcExecutor(fleet).submit(1, "train", train_plan([0, 1]), WAIT)
    assert next(stream).client_id == 0
    stream.close()  # type: ignore[attr-defined]
    assert fleet.status()["tasks_in_flight"] == 0
    gate.set()


def test_result_memory_bound_holds_clients_back_until_the_consumer_catches_up(started) -> None:
    arrays = [np.arange(50_000, dtype=np.float32)]  # a 200 KB result per client
    size = len(serde.dumps(arrays))
    scale = patience(1.0)  # heartbeats and the slow aggregation alike
    fleet = serve(started, heartbeat_s=0.5 * scale, result_memory_bytes=3 * size)
    clients(started, fleet, range(12), lambda ctx: EchoClient())
    executor = GrpcExecutor(fleet)
    seen = []
    for outcome in executor.submit(1, "train", train_plan(range(12), arrays), WAIT):
        assert outcome.ok, outcome.error
        np.testing.assert_array_equal(outcome.result.arrays[0], arrays[0])  # type: ignore[union-attr]
        seen.append(outcome.client_id)
        time.sleep(0.3 * scale)  # a slow aggregation: 3.6 s in all, past 3 heartbeats (1.5 s)
    memory = fleet.result_memory
    assert sorted(seen) == list(range(12))
    assert memory.peak <= 3 * size  # never more than the bound held at once
    assert memory.waits > 0  # ... because readers waited, not because results trickled in
    assert memory.held == 0 and fleet.connected() == list(range(12))  # nobody timed out
    # a consumer that stops early frees what it did not take, late results included
    stream = executor.submit(2, "train", train_plan(range(12), arrays), WAIT)
    next(stream)
    stream.close()  # type: ignore[attr-defined]
    wait_until(lambda: not memory.held, "the held result memory to be freed")


def test_result_memory_lets_a_result_in_beside_any_one_other() -> None:
    memory = ResultMemory(100)
    big = memory.hold(250, lambda: True)  # alone: let in though past the bound
    assert big is not None and memory.held == 250
    asked: list[int] = []
    assert memory.hold(10, lambda: asked.append(1) or False) is None  # closed meanwhile
    assert asked and memory.held == 250
    # one holder, however large (or stuck), never holds the next result back ...
    beside = memory.hold(60, lambda: True)
    assert beside is not None and memory.held == 310 and memory.count == 2
    # ... but a third waits until the bound has room again
    got: list[Any] = []
    waiter = threading.Thread(target=lambda: got.append(memory.hold(30, lambda: True)))
    waiter.start()
    # it counts itself as waiting before it waits
    wait_until(lambda: memory.waits > 0, "the third holder to wait")
    assert waiter.is_alive() and not got
    big.release()
    big.release()  # idempotent
    waiter.join(WAIT)
    assert got[0] is not None and memory.held == 90 and memory.peak == 310
    with pytest.raises(ConfigError, match="result_memory_bytes"):
        ResultMemory(0)


KILLED_CLIENT = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from pollinate.transport.grpc.client import run_client
    from pollinate.types import EvaluateRes, TrainRes

    marker = Path(sys.argv[2])

    class Hang:
        def train(self, arrays, config):
            marker.write_text("training")
            time.sleep(600)
            return TrainRes(list(arrays), 1)

        def evaluate(self, arrays, config):
            return EvaluateRes(0.0, 1)

    run_client(sys.argv[1], lambda ctx: Hang(), 99, max_retries=0)
    """
)


def test_client_killed_mid_task_fails_fast(started, tmp_path: Path) -> None:
    fleet = serve(started, heartbeat_s=2.0)
    clients(started, fleet, [0, 1])
    marker = tmp_path / "training"
    proc = started(
        subprocess.Popen(
            [sys.executable, "-c", KILLED_CLIENT, fleet.address, str(marker)],
            cwd=REPO,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
    )
    wait_connected(fleet, [0, 1, 99])

    def kill_when_training() -> None:
        try:
            wait_until(marker.exists, "client 99 to start training", poll_s=0.05)
        finally:
            proc.send_signal(signal.SIGKILL)

    killer = threading.Thread(target=kill_when_training)
    killer.start()
    # a deadline far away: the killed client must fail on its broken stream, not time out
    outcomes = by_id(GrpcExecutor(fleet).submit(1, "train", train_plan([0, 1, 99]), 300.0))
    killer.join()
    assert marker.exists() and proc.wait(WAIT) == -signal.SIGKILL
    assert outcomes[0].ok and outcomes[1].ok
    error = outcomes[99].error
    assert error is not None and not error.startswith("timeout"), error
    assert "client 99" in error
    assert fleet.connected() == [0, 1]
    outcomes = by_id(GrpcExecutor(fleet).submit(2, "train", train_plan([0, 1, 99]), WAIT))
    assert outcomes[0].ok and outcomes[1].ok
    assert outcomes[99].error == "client 99 is not connected"


def test_silent_client_fails_on_missed_heartbeats(started) -> None:
    fleet = serve(started, heartbeat_s=0.3)
    clients(started, fleet, [0])
    raw = started(RawStream(fleet.address))
    assert raw.register(5).WhichOneof("body") == "welcome"
    # keep the stream alive with heartbeats until the task arrives, then go silent
    thread, results = submit_in_background(GrpcExecutor(fleet), train_plan([0, 5]), WAIT)
    while True:
        raw.send(heartbeat=pb.Heartbeat())
        try:
            item = raw.inbox.get(timeout=0.1)
        except queue.Empty:
            continue
        if isinstance(item, pb.ServerMessage) and item.WhichOneof("body") == "task":
            break
    thread.join(WAIT)
    outcomes = by_id(iter(results))
    assert outcomes[0].ok
    error = outcomes[5].error
    assert error is not None and "no message for" in error and "heartbeat" in error, error
    assert fleet.connected() == [0]


# --------------------------------------------------------------------------------- robustness


def test_out_of_protocol_messages_are_rejected_and_honest_clients_served(started) -> None:
    fleet = serve(started, max_payload_bytes=1 << 20)
    clients(started, fleet, [0])
    executor = GrpcExecutor(fleet)

    def rejected_before_register(*messages: pb.ClientMessage) -> str:
        raw = started(RawStream(fleet.address))
        for m in messages:
            raw.send(m)
        return raw.expect_reject()

    heartbeat = pb.ClientMessage(heartbeat=pb.Heartbeat())
    assert "first message must be Register" in rejected_before_register(heartbeat)
    assert "first message must be Register, got none" in rejected_before_register(
        pb.ClientMessage()
    )
    bad_protocol = pb.ClientMessage(register=pb.Register(client_id=3, protocol=99))
    assert "protocol 99" in rejected_before_register(bad_protocol)
    negative = pb.ClientMessage(register=pb.Register(client_id=-1, protocol=PROTOCOL))
    assert "client id must be >= 0" in rejected_before_register(negative)
    assert "Register sent twice" in rejected_before_register(
        register_message(3), register_message(3)
    )
    stray_result = pb.ClientMessage(result=pb.Result(task_id="1.train.3.1", ok=True))
    assert "was not given" in rejected_before_register(register_message(3), stray_result)
    stray_chunk = pb.ClientMessage(chunk=pb.Chunk(task_id="nope", offset=0, data=b"x"))
    assert "no Result header" in rejected_before_register(register_message(3), stray_chunk)

    def rejected_with_a_task(make: Callable[[pb.Task, bytes], list[pb.ClientMessage]]) -> str:
        """Client 4 takes a real task, answers with ``make``'s messages; the task must fail."""
        raw = started(RawStream(fleet.address))
        assert raw.register(4).WhichOneof("body") == "welcome"
        thread, results = submit_in_background(executor, train_plan([0, 4]))
        task, data = raw.take_task()
        for m in make(task, data):
            raw.send(m)
        reason = raw.expect_reject()
        thread.join(WAIT)
        outcomes = by_id(iter(results))
        assert outcomes[0].ok, "the honest client is served"
        assert outcomes[4].error is not None and reason in outcomes[4].error
        return reason

    def result(task: pb.Task, payload: bytes, **kw: Any) -> pb.ClientMessage:
        fields = dict(task_id=task.task_id, ok=True, num_examples=1, metrics_json="{}")
        fields.update(payload_size=len(payload), payload_sha256=hashlib.sha256(payload).digest())
        fields.update(kw)
        return pb.ClientMessage(result=pb.Result(**fields))

    def chunk(task: pb.Task, data: bytes, offset: int = 0, last: bool = True) -> pb.ClientMessage:
        return pb.ClientMessage(
            chunk=pb.Chunk(task_id=task.task_id, offset=offset, data=data, last=last)
        )

    reasons = [
        rejected_with_a_task(
            lambda t, d: [result(t, d), chunk(t, d[:64], 0, False), chunk(t, d, 9)]
        ),
        rejected_with_a_task(lambda t, d: [result(t, d, payload_size=2 << 20)]),
        rejected_with_a_task(lambda t, d: [result(t, b"", payload_size=0)]),
        rejected_with_a_task(lambda t, d: [result(t, d, metrics_json='{"a": [1]}')]),
        rejected_with_a_task(lambda t, d: [result(t, d, num_examples=-5)]),
        rejected_with_a_task(lambda t, d: [result(t, d), result(t, d)]),
        rejected_with_a_task(lambda t, d: [result(t, b"junk"), chunk(t, b"junk")]),
        rejected_with_a_task(lambda t, d: [result(t, d, task_id="someone-else")]),
    ]
    expected = [
        "expected 64",
        "exceeds the limit",
        "must carry Arrays",
        "must be int, float, str or bool",
        "num_examples must be >= 0",
        "a second Result",
        "not valid Arrays",
        "was not given",
    ]
    for reason, words in zip(reasons, expected):
        assert words in reason
    outcomes = by_id(executor.submit(2, "train", train_plan([0]), WAIT))
    assert outcomes[0].ok and fleet.connected() == [0]


def test_garbage_frames_and_fuzzed_messages_do_not_hurt_the_server(started) -> None:
    fleet = serve(started, max_message_bytes=(1 << 20) + (64 << 10), chunk_bytes=1 << 20)
    clients(started, fleet, [0])
    rng = np.random.default_rng(0)
    # frames that are not protobuf, and one over the message size limit
    frames = [b"\xff\xff\xff", b"\x0a\x05ab"] + [rng.bytes(9) for _ in range(6)]
    for frame in frames:
        raw = started(RawStream(fleet.address, raw_bytes=True))
        raw.send(frame)
        reason = raw.expect_reject()
        assert "first message must be Register" in reason or "not a valid ClientMessage" in reason
        raw.close()
    raw = started(RawStream(fleet.address, raw_bytes=True))
    raw.send(b"\x0a" * (2 << 20))  # over max_message_bytes: gRPC itself refuses it
    assert raw.recv() == ("error", grpc.StatusCode.RESOURCE_EXHAUSTED)
    raw.close()
    # well-formed messages with random content, after a valid Register
    kinds = ["heartbeat", "result", "chunk", "register"]
    for i in range(30):
        raw = started(RawStream(fleet.address))
        raw.register(100 + i)
        for _ in range(int(rng.integers(1, 5))):
            kind = kinds[int(rng.integers(len(kinds)))]
            if kind == "result":
                msg = pb.ClientMessage(
                    result=pb.Result(
                        task_id=rng.bytes(4).hex(),
                        ok=bool(rng.integers(2)),
                        payload_size=int(rng.integers(0, 1 << 40)),
                        metrics_json=rng.bytes(8).decode("latin-1"),
                    )
                )
            elif kind == "chunk":
                msg = pb.ClientMessage(
                    chunk=pb.Chunk(
                        task_id=rng.bytes(4).hex(),
                        offset=int(rng.integers(0, 1 << 40)),
                        data=rng.bytes(16),
                    )
                )
            elif kind == "register":
                msg = register_message(int(rng.integers(0, 1000)))
            else:
                msg = pb.ClientMessage(heartbeat=pb.Heartbeat())
            raw.send(msg)
        raw.close()
    outcomes = by_id(GrpcExecutor(fleet).submit(1, "train", train_plan([0]), WAIT))
    assert outcomes[0].ok and 0 in fleet.connected()


def test_grpc_options_reach_the_server(started) -> None:
    fleet = serve(started, grpc_options=[("grpc.max_receive_message_length", 4096)])
    raw = started(RawStream(fleet.address, raw_bytes=True))
    raw.send(b"\x0a" * 8192)  # fine under the default limit, over the one passed in
    assert raw.recv() == ("error", grpc.StatusCode.RESOURCE_EXHAUSTED)


TRIM_PROBE = textwrap.dedent(
    """
    import threading
    from pollinate.transport.grpc.server import give_memory_back

    def rss():
        for line in open("/proc/self/status"):
            if line.startswith("VmRSS"):
                return int(line.split()[1]) * 1024

    x = bytearray(2 << 20)
    del x  # glibc now serves 1 MiB blocks from its arenas instead of mmap
    small = []

    def churn():  # what reader threads do: big buffers freed between small live objects
        big = []
        for _ in range(150):
            b = bytearray(1 << 20)
            b[::4096] = b"\\1" * 256
            big.append(b)
            small.append(bytearray(64))
        big.clear()

    baseline = rss()
    threads = [threading.Thread(target=churn) for _ in range(4)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    before = rss()
    give_memory_back()
    print(baseline, before, rss())
    """
)


@pytest.mark.skipif(sys.platform != "linux", reason="malloc_trim is glibc's")
def test_freed_memory_goes_back_to_the_os() -> None:
    out = subprocess.run(
        [sys.executable, "-c", TRIM_PROBE], capture_output=True, text=True, check=True, cwd=REPO
    ).stdout
    baseline, before, after = map(int, out.split())
    kept = before - baseline  # 600 MiB were freed; glibc kept this much of it
    assert kept > 64 << 20, (baseline >> 20, before >> 20)  # the probe did make it keep some
    assert before - after > 0.4 * kept, (baseline >> 20, before >> 20, after >> 20)


def test_status_rpc(started) -> None:
    fleet = serve(started, run_id="run-42")
    clients(started, fleet, [3, 1])
    fleet.progress["rounds"] = 5
    status = fetch_status(fleet.address, timeout_s=WAIT)
    assert status["run_id"] == "run-42" and status["connected"] == [1, 3]
    assert status["clients"] == 2 and status["tasks_in_flight"] == 0 and status["rounds"] == 5
    fleet.stop()
    with pytest.raises(ServerUnreachable, match="no status from"):
        fetch_status(fleet.address, timeout_s=WAIT)


def test_status_over_tls(started, tls) -> None:
    fleet = serve(started, tls=(tls["cert"], tls["key"]), run_id="secure")
    assert fetch_status(fleet.address, ca_cert_pem=tls["ca"])["run_id"] == "secure"
    with pytest.raises(ServerUnreachable):
        fetch_status(fleet.address, ca_cert_pem=tls["other_ca"])


# ------------------------------------------------------------------------------ TLS and auth


@pytest.fixture
def tls(tmp_path: Path) -> dict[str, bytes]:
    ca_cert, ca_key = make_ca(tmp_path / "ca")
    cert, key = make_server_cert(tmp_path / "server", ca_cert, ca_key)
    other_ca, _ = make_ca(tmp_path / "other")
    return {
        "ca": ca_cert.read_bytes(),
        "cert": cert.read_bytes(),
        "key": key.read_bytes(),
        "other_ca": other_ca.read_bytes(),
    }


def test_tls_round_trip_and_wrong_ca_refused(started, tls) -> None:
    fleet = serve(started, tls=(tls["cert"], tls["key"]))
    clients(started, fleet, [0, 1], ca_cert_pem=tls["ca"])
    outcomes = by_id(GrpcExecutor(fleet).submit(1, "train", train_plan([0, 1]), WAIT))
    assert all(o.ok for o in outcomes.values())
    with pytest.raises(ServerUnreachable, match="gave up") as err:
        run_client(
            fleet.address,
            MeanClientFn(),
            2,
            ca_cert_pem=tls["other_ca"],
            max_retries=1,
            backoff=FAST,
        )
    assert "UNAVAILABLE" in str(err.value)
    with pytest.raises(ServerUnreachable):  # plaintext against a TLS server fails too
        run_client(fleet.address, MeanClientFn(), 2, max_retries=0, backoff=FAST)
    assert fleet.connected() == [0, 1]


@pytest.fixture
def keys() -> dict[int, Ed25519PrivateKey]:
    return {cid: Ed25519PrivateKey.generate() for cid in range(3)}


def verifier_for(keys: dict[int, Ed25519PrivateKey], ids=(0, 1)) -> Verifier:
    text = "\n".join(f"{cid} {public_key_b64(keys[cid])}" for cid in ids)
    return Verifier(AllowList.from_text(text))


def test_authenticated_clients_work_and_strangers_are_refused(started, keys) -> None:
    fleet = serve(started, verifier=verifier_for(keys))
    seen: list[tuple[int, str]] = []
    fleet.on_register = lambda cid, key: seen.append((cid, key))
    for cid in (0, 1):
        started(ClientThread(fleet.address, MeanClientFn(), cid, private_key=keys[cid]))
    assert fleet.wait_for(2, WAIT)
    outcomes = by_id(GrpcExecutor(fleet).submit(1, "train", train_plan([0, 1]), WAIT))
    assert all(o.ok for o in outcomes.values())  # signed results accepted
    assert sorted(seen) == sorted((cid, public_key_b64(keys[cid])) for cid in (0, 1))
    # an unknown client stops at once with the server's reason (no retry loop)
    with pytest.raises(ClientRejected, match="client 2 is not on the server's allow-list"):
        run_client(fleet.address, MeanClientFn(), 2, private_key=keys[2], backoff=FAST)
    # a listed id with the wrong key, and a client without a key
    with pytest.raises(ClientRejected, match="does not match"):
        run_client(fleet.address, MeanClientFn(), 1, private_key=keys[2], backoff=FAST)
    with pytest.raises(ClientRejected, match="not signed"):
        run_client(fleet.address, MeanClientFn(), 1, backoff=FAST)
    assert fleet.connected() == [0, 1]  # failed claims did not replace the real clients
    outcomes = by_id(GrpcExecutor(fleet).submit(2, "train", train_plan([0, 1]), WAIT))
    assert all(o.ok for o in outcomes.values())


def test_replayed_register_and_forged_result_are_refused(started, keys) -> None:
    fleet = serve(started, verifier=verifier_for(keys))
    started(ClientThread(fleet.address, MeanClientFn(), 0, private_key=keys[0]))
    assert fleet.wait_for(1, WAIT)
    captured = register_message(1, keys[1])
    first = started(RawStream(fleet.address))
    first.send(captured)
    assert first.recv().WhichOneof("body") == "welcome"
    replay = started(RawStream(fleet.address))
    replay.send(captured)  # the same signed bytes again: a replay
    assert "replayed request" in replay.expect_reject()
    assert fleet.connected() == [0, 1]  # the replay did not take client 1's place
    # client 1 answers its task with a result whose signature does not cover its content
    thread, results = submit_in_background(GrpcExecutor(fleet), train_plan([0, 1]))
    task, data = first.take_task()
    res = pb.Result(
        task_id=task.task_id,
        ok=True,
        num_examples=10**6,  # inflated after signing
        payload_size=len(data),
        payload_sha256=hashlib.sha256(data).digest(),
    )
    honest = pb.Result()
    honest.CopyFrom(res)
    honest.num_examples = 1
    res.signed.CopyFrom(to_signed(sign(keys[1], "result", 1, result_digest(honest))))
    first.send(result=res)
    assert "bad signature" in first.expect_reject()
    thread.join(WAIT)
    outcomes = by_id(iter(results))
    assert outcomes[0].ok and "bad signature" in (outcomes[1].error or "")


def test_reconnect_replaces_the_old_stream_only_when_authenticated(started, keys) -> None:
    fleet = serve(started, verifier=verifier_for(keys))
    old = started(RawStream(fleet.address))
    assert old.register(1, keys[1]).WhichOneof("body") == "welcome"
    forged = started(RawStream(fleet.address))
    forged.send(register_message(1, keys[2], claimed_key=public_key_b64(keys[1])))
    assert "bad signature" in forged.expect_reject()
    assert fleet.connected() == [1]
    new = started(RawStream(fleet.address))
    assert new.register(1, keys[1]).WhichOneof("body") == "welcome"
    assert "registered again" in old.expect_reject()  # the older stream is closed
    assert fleet.connected() == [1]
    thread, results = submit_in_background(GrpcExecutor(fleet), train_plan([1]), timeout_s=1.0)
    task, _ = new.take_task()  # the task goes to the new stream
    thread.join(WAIT)
    assert results[0].error is not None and results[0].error.startswith("timeout")


# ------------------------------------------------------- one client cannot stop or take a run


class Heartbeats:
    """Keeps a raw stream alive with heartbeats (a client that is there but sends nothing)."""

    def __init__(self, raw: RawStream) -> None:
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._beat, args=(raw,), daemon=True)
        self.thread.start()

    def _beat(self, raw: RawStream) -> None:
        while not self.stop.wait(0.1):
            raw.send(heartbeat=pb.Heartbeat())

    def close(self) -> None:
        self.stop.set()
        self.thread.join(WAIT)


def signed_result(key: Ed25519PrivateKey, cid: int, **fields: Any) -> pb.Result:
    res = pb.Result(ok=True, num_examples=1, **fields)
    res.signed.CopyFrom(to_signed(sign(key, "result", cid, result_digest(res))))
    return res


def test_a_declared_result_beyond_the_round_bound_is_refused_before_memory_is_held(
    started, keys
) -> None:
    fleet = serve(started, verifier=verifier_for(keys, ids=(0, 1, 2)), result_memory_bytes=1 << 20)
    gate = threading.Event()
    for cid in (0, 1):
        started(
            ClientThread(fleet.address, lambda ctx: GateClient(gate), cid, private_key=keys[cid])
        )
    attacker = started(RawStream(fleet.address))
    assert attacker.register(2, keys[2]).WhichOneof("body") == "welcome"
    wait_connected(fleet, [0, 1, 2])
    executor = GrpcExecutor(fleet)
    thread, results = submit_in_background(executor, train_plan([0, 1, 2]), timeout_s=WAIT)
    task, data = attacker.take_task()
    expected = executor.expected_result_bytes(len(data))
    assert task.max_result_bytes == expected == 8 << 20  # a small model: the floor
    # an allow-listed client signs a header declaring 300 MiB, then sends nothing
    claim = signed_result(
        keys[2], 2, task_id=task.task_id, payload_size=300 << 20, payload_sha256=bytes(32)
    )
    attacker.send(result=claim)
    beats = Heartbeats(attacker)  # ... only heartbeats, so it never looks silent
    try:
        reason = attacker.expect_reject()
    finally:
        beats.close()
    assert "exceeds the limit of 8388608 bytes for this task" in reason, reason
    assert fleet.result_memory.peak == 0  # nothing was reserved for the claim
    gate.set()
    thread.join(WAIT)
    outcomes = by_id(iter(results))
    assert outcomes[0].ok and outcomes[1].ok
    assert "exceeds the limit" in (outcomes[2].error or "")
    assert fleet.connected() == [0, 1]


def test_a_result_whose_bytes_stop_is_failed_and_holds_no_honest_result_back(started, keys) -> None:
    arrays = [np.arange(50_000, dtype=np.float32)]  # a 200 KB result per client
    size = len(serde.dumps(arrays))
    fleet = serve(
        started,
        verifier=verifier_for(keys, ids=(0, 1, 2)),
        result_memory_bytes=size,  # the stalled result alone fills the bound
        stall_s=5.0,
    )
    gate = threading.Event()
    for cid in (0, 1):
        started(
            ClientThread(fleet.address, lambda ctx: GateClient(gate), cid, private_key=keys[cid])
        )
    attacker = started(RawStream(fleet.address))
    assert attacker.register(2, keys[2]).WhichOneof("body") == "welcome"
    wait_connected(fleet, [0, 1, 2])
    thread, results = submit_in_background(GrpcExecutor(fleet), train_plan([0, 1, 2], arrays))
    task, data = attacker.take_task()
    digest = hashlib.sha256(data).digest()
    res = signed_result(
        keys[2], 2, task_id=task.task_id, payload_size=len(data), payload_sha256=digest
    )
    attacker.send(result=res)  # a plausible result: its first chunk, then only heartbeats
    attacker.send(chunk=pb.Chunk(task_id=task.task_id, offset=0, data=data[:4096], last=False))
    beats = Heartbeats(attacker)
    try:
        wait_until(
            lambda: fleet.result_memory.held == len(data), "the stalled result's reservation"
        )
        gate.set()  # the honest results arrive while the stalled one holds the whole bound
        thread.join(WAIT)
    finally:
        beats.close()
    assert [o.client_id for o in results[:2]] in ([0, 1], [1, 0])  # served first, not queued
    assert all(o.ok for o in results[:2]), [o.error for o in results]
    error = results[2].error or ""
    assert results[2].client_id == 2 and "stalled: no bytes for" in error, error
    assert "4096 of" in error and "stall_s = 5" in error
    assert fleet.result_memory.held == 0 and fleet.connected() == [0, 1]


def test_a_corrupted_upload_fails_its_task_and_the_client_stays_until_too_many_in_a_row(
    started, keys, caplog
) -> None:
    """An allow-listed client's signed result whose bytes fail their SHA-256: its task fails
    as ``corrupted``, its memory is released, it is told with a Cancel and keeps its stream; a
    good upload ends the run of bad ones; ``max_corrupt_uploads`` in a row get it rejected."""
    caplog.set_level(logging.WARNING, logger="pollinate")
    fleet = serve(started, verifier=verifier_for(keys, ids=(0, 2)), max_corrupt_uploads=2)
    clients(started, fleet, [0], private_key=keys[0])
    raw = started(RawStream(fleet.address))
    assert raw.register(2, keys[2]).WhichOneof("body") == "welcome"
    wait_connected(fleet, [0, 2])
    executor = GrpcExecutor(fleet)

    def one_round(corrupt: bool) -> dict[int, Outcome]:
        thread, results = submit_in_background(executor, train_plan([0, 2]))
        task, data = raw.take_task()
        digest = hashlib.sha256(data).digest()
        res = signed_result(
            keys[2], 2, task_id=task.task_id, payload_size=len(data), payload_sha256=digest
        )
        sent = bytes([data[0] ^ 0xFF]) + data[1:] if corrupt else data  # one byte inverted
        raw.send(result=res)
        raw.send(chunk=pb.Chunk(task_id=task.task_id, offset=0, data=sent, last=True))
        thread.join(WAIT)
        outcomes = by_id(iter(results))
        assert outcomes[0].ok, outcomes[0].error
        return outcomes

    beats = Heartbeats(raw)
    try:
        error = one_round(corrupt=True)[2].error or ""
        assert error.startswith("corrupted: the upload failed its SHA-256 check and was rejected")
        assert failure_kind(error) == "corrupted" and "does not match" in error, error
        told = raw.recv()
        assert told.WhichOneof("body") == "cancel" and told.cancel.reason == error, told
        assert fleet.connected() == [0, 2] and fleet.result_memory.held == 0
        good = one_round(corrupt=False)[2]  # the same stream goes on: a good upload counts
        assert good.ok and good.result is not None
        assert all(np.array_equal(a, b) for a, b in zip(good.result.arrays, initial()))
        assert failure_kind(one_round(corrupt=True)[2].error or "") == "corrupted"
        assert raw.recv().WhichOneof("body") == "cancel"  # one in a row again: still here
        assert fleet.connected() == [0, 2] and fleet.status()["corrupted_uploads"] == 2
        assert failure_kind(one_round(corrupt=True)[2].error or "") == "corrupted"
        reason = raw.expect_reject()  # two in a row: dropped, saying why
    finally:
        beats.close()
    assert "2 uploads in a row failed their SHA-256 check (max_corrupt_uploads = 2)" in reason
    wait_until(lambda: fleet.connected() == [0], "client 2 dropped")
    assert caplog.text.count("was rejected, 1 in a row (at most 2): corrupted") == 2
    assert f"rejected: {reason}" in caplog.text  # the server's log says why it dropped it
    assert fleet.result_memory.held == 0


@pytest.mark.parametrize("direction", [UP, DOWN])
def test_a_payload_corrupted_in_transit_costs_one_task_not_the_client(
    started, caplog, direction: str
) -> None:
    """A real client behind a relay that inverts one byte of the first payload going
    ``direction`` (a model download, or the client's upload): that task fails as
    ``corrupted``, the client says so in a warning, and the same connection serves round 2."""
    caplog.set_level(logging.WARNING, logger="pollinate")
    fleet = serve(started)
    flip = Fault("flip", direction, at_bytes=8, marker=b"PLN1")  # inside the payload's header
    with ChaosProxy(fleet.port, Schedule(fixed={0: [flip]})) as proxy:
        client = started(ClientThread(proxy.address, MeanClientFn(), 0))
        wait_connected(fleet, [0])
        executor = GrpcExecutor(fleet)
        first = by_id(executor.submit(1, "train", train_plan([0]), WAIT))[0]
        assert len(proxy.flipped) == 1, proxy.events
        error = first.error or ""
        if direction == DOWN:  # the client did not train on it and said why
            assert error.startswith("corrupted: the model download failed its SHA-256 check")
            wait_until(lambda: "task 1.train.0.1 failed: corrupted" in caplog.text, "the warning")
        else:
            assert error.startswith("corrupted: the upload failed its SHA-256 check")
            wait_until(
                lambda: (
                    "its upload for task 1.train.0.1 was rejected by the server: corrupted"
                    in caplog.text
                ),
                "the warning",
            )
        second = by_id(executor.submit(2, "train", train_plan([0], config={"round": 2}), WAIT))
        assert second[0].ok, second[0].error
        assert proxy.connections == 1 and fleet.connected() == [0]  # never reconnected
    assert client.close() is None


def test_metrics_beyond_the_bounds_are_refused_and_an_honest_client_says_why(started, keys) -> None:
    fleet = serve(started, max_metrics_keys=8, max_metrics_bytes=200)

    class Chatty:
        def train(self, arrays, config):
            return TrainRes(list(arrays), 1, {"note": "x" * 500})

        def evaluate(self, arrays, config):
            return EvaluateRes(0.0, 1, {f"m{i}": i for i in range(9)})

    clients(started, fleet, [0])
    clients(started, fleet, [1], lambda ctx: Chatty())
    raw = started(RawStream(fleet.address))
    assert raw.register(2).WhichOneof("body") == "welcome"
    executor = GrpcExecutor(fleet)
    thread, results = submit_in_background(executor, train_plan([0, 1, 2]))
    task, data = raw.take_task()
    many = json.dumps({f"k{i}": i for i in range(9)})
    raw.send(
        result=pb.Result(
            task_id=task.task_id,
            ok=True,
            num_examples=1,
            metrics_json=many,
            payload_size=len(data),
            payload_sha256=hashlib.sha256(data).digest(),
        )
    )
    assert "9 keys, more than the 8 allowed" in raw.expect_reject()
    thread.join(WAIT)
    outcomes = by_id(iter(results))
    assert outcomes[0].ok
    # the client checks the server's bounds (from Welcome) before sending: a failed task
    # with the reason, and it stays connected
    assert "more than the 200 allowed" in (outcomes[1].error or ""), outcomes[1].error
    assert "'note'" in (outcomes[1].error or "")
    plan = [(cid, EvaluateIns(initial(), {})) for cid in (0, 1)]
    evaluated = by_id(executor.submit(1, "evaluate", plan, WAIT))
    assert evaluated[0].ok and "9 keys" in (evaluated[1].error or "")
    assert fleet.connected() == [0, 1]


def test_revoking_a_client_closes_its_stream_at_once(started, keys, tmp_path: Path) -> None:
    listed = tmp_path / "allow-list.txt"
    lines = {cid: f"{cid} {public_key_b64(keys[cid])}\n" for cid in (0, 1)}
    listed.write_text(lines[0] + lines[1])
    fleet = serve(started, verifier=Verifier(AllowList.load(listed)))
    threads = {
        cid: started(ClientThread(fleet.address, MeanClientFn(), cid, private_key=keys[cid]))
        for cid in (0, 1)
    }
    wait_connected(fleet, [0, 1])
    listed.write_text(lines[0])  # client 1's line removed: no request of its is needed
    threads[1].thread.join(WAIT)
    assert isinstance(threads[1].error, ClientRejected)
    assert "client 1 was removed from the server's allow-list (revoked)" in str(threads[1].error)
    assert fleet.connected() == [0]
    outcomes = by_id(GrpcExecutor(fleet).submit(1, "train", train_plan([0, 1]), WAIT))
    assert outcomes[0].ok and outcomes[1].error == "client 1 is not connected"
    # a key replaced on the list ends the stream registered with the old key too
    listed.write_text(f"0 {public_key_b64(keys[2])}\n")
    threads[0].thread.join(WAIT)
    assert "key on the server's allow-list was replaced" in str(threads[0].error)
    assert fleet.connected() == []


def test_status_details_only_for_allow_listed_callers(started, keys) -> None:
    fleet = serve(started, verifier=verifier_for(keys), run_id="run-7")
    for cid in (0, 1):
        started(ClientThread(fleet.address, MeanClientFn(), cid, private_key=keys[cid]))
    wait_connected(fleet, [0, 1])
    anonymous = fetch_status(fleet.address, timeout_s=WAIT)
    assert anonymous["clients"] == 2 and anonymous["run_id"] == "run-7"
    assert "connected" not in anonymous and "tasks_in_flight" not in anonymous
    assert anonymous["authenticated"] is False and "signed" in anonymous["details"]
    full = fetch_status(fleet.address, timeout_s=WAIT, private_key=keys[0], client_id=0)
    assert full["connected"] == [0, 1] and full["tasks_in_flight"] == 0
    stranger = fetch_status(fleet.address, timeout_s=WAIT, private_key=keys[2], client_id=2)
    assert "connected" not in stranger and "not on the server's allow-list" in stranger["details"]
    forged = fetch_status(fleet.address, timeout_s=WAIT, private_key=keys[2], client_id=0)
    assert "connected" not in forged and "bad signature" in forged["details"]


def server_threads() -> int:
    prefixes = ("pollinate-grpc", "pollinate-reader")
    return sum(1 for t in threading.enumerate() if t.name.startswith(prefixes))


def test_a_flood_of_idle_streams_is_shed_and_its_threads_end(started) -> None:
    fleet = serve(
        started,
        heartbeat_s=patience(0.5),
        max_unregistered=20,
        register_timeout_s=patience(2.0),  # the flood must be open before the first are closed
        thread_idle_s=0.5,
    )
    clients(started, fleet, [0])
    wait_until(lambda: server_threads() <= 3, "the start-up threads to settle")
    baseline = server_threads()
    flood = [started(RawStream(fleet.address)) for _ in range(200)]  # they never register
    ends = [raw.recv() for raw in flood]
    refused = ends.count(("error", grpc.StatusCode.RESOURCE_EXHAUSTED))
    closed = ends.count("end")  # accepted, then closed for not registering
    assert refused + closed == 200 and refused >= 100, ends
    assert fleet.refused_streams == refused
    assert fleet._pool is not None and fleet._pool.peak <= 20 + 1 + 40, fleet._pool.peak
    for raw in flood:
        raw.close()
    # the client that registered before the flood was served throughout, and still is
    outcomes = by_id(GrpcExecutor(fleet).submit(1, "train", train_plan([0]), WAIT))
    assert outcomes[0].ok and fleet.connected() == [0]
    wait_until(lambda: server_threads() <= baseline, f"threads back to {baseline}")


def test_the_thread_pool_grows_on_demand_and_shrinks_when_idle() -> None:
    from pollinate.transport.grpc.threads import ElasticThreadPool

    pool = ElasticThreadPool(4, idle_s=0.2, name="test-pool")
    release = threading.Event()
    futures = [pool.submit(release.wait, WAIT) for _ in range(6)]  # 2 wait for a thread
    wait_until(lambda: pool.threads == 4, "four threads")
    release.set()
    assert [f.result(WAIT) for f in futures] == [True] * 6 and pool.peak == 4
    assert pool.submit(lambda x: x * 2, 21).result(WAIT) == 42
    with pytest.raises(ZeroDivisionError):
        pool.submit(lambda: 1 / 0).result(WAIT)
    wait_until(lambda: pool.threads == 0, "the idle threads to end")
    assert not [t for t in threading.enumerate() if t.name.startswith("test-pool")]
    assert pool.submit(lambda: "again").result(WAIT) == "again"  # a new thread on demand
    pool.shutdown()
    assert pool.threads == 0
    with pytest.raises(RuntimeError, match="after shutdown"):
        pool.submit(print)


# ----------------------------------------------------------------------------- reconnection


def test_clients_reconnect_after_a_server_restart_on_the_same_port(started) -> None:
    fleet = serve(started)
    threads = clients(started, fleet, [0, 1])
    port = fleet.port
    fleet.stop()
    restarted = serve(started, f"127.0.0.1:{port}", run_id="after-restart")
    wait_connected(restarted, [0, 1])
    outcomes = by_id(GrpcExecutor(restarted).submit(1, "train", train_plan([0, 1]), WAIT))
    assert all(o.ok for o in outcomes.values())
    assert all(t.error is None for t in threads)


def test_finished_stops_clients_and_the_server_waits_until_they_hung_up(started) -> None:
    fleet = serve(started)
    threads = clients(started, fleet, [0, 1])
    raw = started(RawStream(fleet.address))
    assert raw.register(7).WhichOneof("body") == "welcome"
    read_finished = threading.Event()

    def slow_reader() -> None:  # reads Finished, then takes its time before hanging up
        msg = raw.recv()
        assert msg.WhichOneof("body") == "finished" and msg.finished.reason == "all done"
        time.sleep(0.3)
        read_finished.set()
        raw.close()

    reader = threading.Thread(target=slow_reader, daemon=True)
    reader.start()
    fleet.stop(finished="all done")
    assert read_finished.is_set()  # the server did not go away before the client hung up
    for t in threads:  # told the run is over, run_client returns by itself
        t.thread.join(WAIT)
        assert not t.thread.is_alive() and t.error is None and t.stop.is_set()
    reader.join(WAIT)


def test_the_wait_for_clients_to_hang_up_is_bounded(started, monkeypatch) -> None:
    from pollinate.transport.grpc import connection, server

    monkeypatch.setattr(connection, "CLOSE_GRACE_S", 0.2)
    monkeypatch.setattr(server, "CLOSE_GRACE_S", 0.2)
    fleet = serve(started)
    raw = started(RawStream(fleet.address))  # reads everything, never hangs up by itself
    assert raw.register(7).WhichOneof("body") == "welcome"
    fleet.stop(finished="all done")
    assert raw.recv().WhichOneof("body") == "finished"
    assert raw.recv() in ("end", ("error", grpc.StatusCode.CANCELLED))


FROZEN_SERVER = textwrap.dedent(
    """
    import time
    from pollinate.transport.grpc.server import FleetServer

    fleet = FleetServer("127.0.0.1:0", heartbeat_s=0.3).start()
    print(fleet.port, flush=True)
    time.sleep(600)
    """
)


def test_client_leaves_a_frozen_server_and_comes_back(started, caplog) -> None:
    caplog.set_level(logging.INFO, logger="pollinate")
    server = started(
        subprocess.Popen(
            [sys.executable, "-c", FROZEN_SERVER],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
    )
    assert server.stdout is not None
    address = f"127.0.0.1:{server.stdout.readline().strip()}"
    client = started(ClientThread(address, MeanClientFn(), 7))

    def connected() -> bool:
        return fetch_status(address, timeout_s=WAIT)["connected"] == [7]

    wait_until(connected, "client 7 to connect", poll_s=0.05)
    server.send_signal(signal.SIGSTOP)  # the server stops answering, its socket stays open
    try:
        wait_until(lambda: "went silent" in caplog.text, "the client to notice", poll_s=0.05)
    finally:
        server.send_signal(signal.SIGCONT)
    new_session = lambda: caplog.text.count("client 7: connected to") == 2  # noqa: E731
    wait_until(new_session, "a new session", poll_s=0.05)
    wait_until(connected, "client 7 to connect again", poll_s=0.05)
    assert client.error is None


def test_max_retries_bounds_the_attempts() -> None:
    with pytest.raises(ServerUnreachable, match="after 3 failed attempts"):
        run_client("127.0.0.1:1", MeanClientFn(), 0, max_retries=2, backoff=FAST)


# ------------------------------------------------------------------------------ large models


@pytest.mark.slow
def test_500_mb_model_round_trip(started) -> None:
    fleet = serve(started, heartbeat_s=2.0)
    clients(started, fleet, [0], lambda ctx: EchoClient())
    n = 125 * 2**20 // 4  # four arrays of 125 MiB
    arrays = [np.arange(n, dtype=np.float32) * (i + 1) for i in range(4)]
    sent = [hashlib.sha256(a).hexdigest() for a in arrays]
    outcomes = by_id(GrpcExecutor(fleet).submit(1, "train", train_plan([0], arrays), 600.0))
    result = outcomes[0].result
    assert isinstance(result, TrainRes), outcomes[0].error
    assert [hashlib.sha256(a).hexdigest() for a in result.arrays] == sent
    assert [a.shape for a in result.arrays] == [a.shape for a in arrays]
