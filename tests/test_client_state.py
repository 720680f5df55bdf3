"""Client state in files (``FileStateStore``) and the deployed client that keeps it there."""

from __future__ import annotations

import json
import math
import os
import stat
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from pollinate.client import ClientContext
from pollinate.client_state import ClientStateError, FileStateStore
from pollinate.types import Arrays, Config, EvaluateRes, TrainIns, TrainRes
from tests.waiting import WAIT, patience, wait_until


def rich_state() -> dict[str, Any]:
    """Every kind of value the store keeps, the way algorithms keep them."""
    return {
        "scaffold_c": [
            np.arange(12, dtype=np.float32).reshape(3, 4),
            np.zeros((0,), np.float64),
            np.array(7, dtype=np.int64),  # a 0-d array
        ],
        "dp_releases": 3,
        "ratio": 0.25,
        "not_a_number": float("nan"),
        "flag": True,
        "nothing": None,
        "name": "ünïcode",
        "secagg": {
            "tag": b"\x00\xffround-1",
            "secret": {"c_sk": os.urandom(32), "big": 2**200 + 1},
            "peers": {3: "pk3", 10: "pk10"},  # int keys stay ints
        },
        "odd": {"$array": "not a tag", 1: 2},  # keys that look like the file's tags
        "pair": (1, np.float32(2.5)),
        "empty": [],
    }


def assert_same(a: Any, b: Any) -> None:
    assert type(a) is type(b), (a, b)
    if isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_array_equal(a, b)
    elif isinstance(a, np.generic):
        assert a.dtype == b.dtype and a == b
    elif isinstance(a, dict):
        assert list(a) == list(b)
        for k in a:
            assert_same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_same(x, y)
    elif isinstance(a, float) and math.isnan(a):
        assert math.isnan(b)
    else:
        assert a == b


def files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_round_trip_of_every_kind_of_value(tmp_path):
    store = FileStateStore(tmp_path / "state", run_id="run-a")
    state = rich_state()
    store.put(3, state)
    back = FileStateStore(tmp_path / "state").get(3)
    assert_same(back, state)
    assert store.saved_run_id(3) == "run-a"
    assert store.get(4) == {} and store.saved_run_id(4) is None
    [npz, json_file] = files(tmp_path / "state")
    assert json_file == "client-3.json" and npz.startswith("client-3.") and npz.endswith(".npz")
    doc = json.loads((tmp_path / "state" / json_file).read_text())
    assert doc["state"]["dp_releases"] == 3  # readable JSON, arrays by reference
    assert doc["state"]["scaffold_c"][0] == {"$array": "arr_0"}


def test_files_are_private_and_saves_replace_the_arrays(tmp_path):
    folder = tmp_path / "state"
    store = FileStateStore(folder)
    store.put(0, {"c": [np.ones(3)]})
    first = files(folder)
    store.put(0, {"c": [np.full(3, 2.0)]})
    second = files(folder)
    assert len(second) == 2 and second != first  # a new npz; the old one is gone
    np.testing.assert_array_equal(store.get(0)["c"][0], [2.0, 2.0, 2.0])
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    for name in second:
        assert stat.S_IMODE((folder / name).stat().st_mode) == 0o600
    store.put(0, {"rounds": 1})  # no arrays: no npz
    assert files(folder) == ["client-0.json"]
    store.put(0, {})  # empty: nothing kept
    assert files(folder) == [] and store.get(0) == {}


def test_an_orphaned_arrays_file_is_ignored_then_removed(tmp_path):
    """A crash after writing the new npz but before the JSON leaves the old state whole."""
    store = FileStateStore(tmp_path)
    store.put(1, {"c": np.arange(3)})
    store.put(12, {"c": np.arange(2)})  # another client whose name starts alike
    (tmp_path / "client-1.0123456789ab.npz").write_bytes(b"half-written")
    np.testing.assert_array_equal(store.get(1)["c"], [0, 1, 2])
    store.put(1, {"c": np.arange(4)})
    assert len([n for n in files(tmp_path) if n.startswith("client-1.") and n.endswith("npz")]) == 1
    np.testing.assert_array_equal(store.get(12)["c"], [0, 1])


@pytest.mark.parametrize(
    ("damage", "why"),
    [
        (lambda p, n: p.write_text("{not json"), "not valid JSON"),
        (lambda p, n: p.write_bytes(b"\xff\xfe"), "not valid JSON"),
        (lambda p, n: p.write_text('{"state": {}}'), "not a pollinate client state file"),
        (lambda p, n: p.write_text("[1, 2]"), "not a pollinate client state file"),
        (lambda p, n: n.unlink(), "cannot be read"),
        (lambda p, n: n.write_bytes(n.read_bytes()[:40]), "cannot be read"),
        (
            lambda p, n: p.write_text(p.read_text().replace('"arr_0"', '"arr_9"')),
            "do not decode",
        ),
        (
            lambda p, n: p.write_text(p.read_text().replace('"$bytes"', '"$what"')),
            "do not decode",
        ),
        (
            lambda p, n: p.write_text(p.read_text().replace('"version":1', '"version":99')),
            "format version 99",
        ),
        (
            lambda p, n: p.write_text(p.read_text().replace(n.name, "../../etc/passwd")),
            "invalid arrays file",
        ),
    ],
)
def test_a_damaged_file_gives_an_error_naming_it_and_the_fix(tmp_path, damage, why):
    store = FileStateStore(tmp_path)
    store.put(5, {"c": [np.ones(4, np.float32)], "tag": b"x"})
    path = tmp_path / "client-5.json"
    [npz] = [p for p in tmp_path.iterdir() if p.suffix == ".npz"]
    damage(path, npz)
    with pytest.raises(ClientStateError, match=why) as info:
        store.get(5)
    message = str(info.value)
    assert str(path) in message and f"delete {tmp_path / 'client-5'}.*" in message


def test_saves_tagged_with_a_round_keep_the_newest_earlier_version(tmp_path):
    """What a resumable run needs: reading ``upto`` the checkpoint's round finds that state."""
    store = FileStateStore(tmp_path)
    store.put(7, {"c": np.arange(2), "pair": (1, b"k")}, 1)
    store.put(7, {"c": np.arange(3)}, 2)
    store.put(7, {"c": np.arange(4)}, 2)  # round 2 again (resumed after round 1): replaces it
    store.put(7, {"c": np.arange(5)}, 4)
    sizes = [len(FileStateStore(tmp_path, upto=u).get(7).get("c", [])) for u in range(6)]
    assert sizes == [0, 0, 4, 4, 5, 5]  # round 1's version went when round 4's came
    store.put(7, {}, 5)  # dropped in round 5: round 4's version stays for a resume from there
    assert FileStateStore(tmp_path).get(7) == {}
    assert len(FileStateStore(tmp_path, upto=4).get(7)["c"]) == 5
    assert len(files(tmp_path)) == 2  # the JSON and one npz for both versions
    store.put(7, {})  # an untagged empty save removes everything
    assert files(tmp_path) == []


def test_values_it_cannot_keep_are_refused_by_name(tmp_path):
    store = FileStateStore(tmp_path)
    with pytest.raises(ClientStateError, match=r"state\['model'\]\[1\] is a set"):
        store.put(0, {"model": [1, {2}]})
    with pytest.raises(ClientStateError, match="array of Python objects"):
        store.put(0, {"x": np.array([None, 1], dtype=object)})
    assert files(tmp_path) == []  # nothing half-written


# --- the deployed client ------------------------------------------------------------------------


class Counter:
    """Counts its rounds and accumulates the received arrays in its state."""

    def __init__(self, ctx: ClientContext) -> None:
        self.ctx = ctx

    def train(self, arrays: Arrays, config: Config) -> TrainRes:
        state = self.ctx.state
        state["rounds"] = state.get("rounds", 0) + 1
        state["sum"] = state.get("sum", np.zeros_like(arrays[0])) + arrays[0]
        return TrainRes([state["sum"]], 1, {"rounds": state["rounds"]})

    def evaluate(self, arrays: Arrays, config: Config) -> EvaluateRes:
        return EvaluateRes(0.0, 1)


class ClientThread:
    def __init__(self, address: str, state_dir: Path) -> None:
        from pollinate.transport.grpc.client import Backoff, run_client

        self.stop = threading.Event()
        self.error: BaseException | None = None

        def target() -> None:
            try:
                run_client(
                    address,
                    Counter,
                    0,
                    stop_event=self.stop,
                    backoff=Backoff(0.05, 2.0, 0.5),
                    state_dir=state_dir,
                )
            except BaseException as exc:
                self.error = exc

        self.thread = threading.Thread(target=target, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.stop.set()
        self.thread.join(WAIT)
        assert not self.thread.is_alive()


def rounds_through(run_id: str, state_dir: Path, values: list[float]) -> list[TrainRes]:
    """Start a server and the client, run one train task per value, stop both."""
    from pollinate.transport.grpc.server import FleetServer, GrpcExecutor

    fleet = FleetServer("127.0.0.1:0", heartbeat_s=patience(0.5), run_id=run_id).start()
    client = ClientThread(fleet.address, state_dir)
    try:
        assert fleet.wait_for(1, timeout=WAIT), client.error
        executor = GrpcExecutor(fleet)
        out = []
        for r, value in enumerate(values, start=1):
            plan = [(0, TrainIns([np.full(2, value, np.float32)], {"round": r}))]
            [outcome] = executor.submit(r, "train", plan, WAIT)
            assert outcome.ok, outcome.error
            assert isinstance(outcome.result, TrainRes)
            out.append(outcome.result)
        return out
    finally:
        client.close()
        fleet.stop(grace=0.1)


def saved_rounds(folder: Path, rounds: int) -> dict[str, Any]:
    """The client saves right after sending its result: wait for that save to land."""

    def saved() -> bool:
        try:
            return FileStateStore(folder).get(0).get("rounds") == rounds
        except ClientStateError:  # read between a save's JSON and its old arrays' removal
            return False

    wait_until(saved, f"the state of round {rounds} to be saved")
    return FileStateStore(folder).get(0)


def test_a_deployed_client_keeps_its_state_across_restarts_of_the_same_run(tmp_path):
    pytest.importorskip("grpc")
    folder = tmp_path / "client-state"
    first = rounds_through("run-a", folder, [1.0, 2.0])
    assert [r.metrics["rounds"] for r in first] == [1, 2]
    saved = saved_rounds(folder, 2)
    np.testing.assert_array_equal(saved["sum"], [3.0, 3.0])
    assert FileStateStore(folder).saved_run_id(0) == "run-a"

    again = rounds_through("run-a", folder, [4.0])  # a new process would load the same files
    assert again[0].metrics["rounds"] == 3
    np.testing.assert_array_equal(again[0].arrays[0], [7.0, 7.0])
    saved_rounds(folder, 3)

    other = rounds_through("run-b", folder, [5.0])  # another run: the old state is dropped
    assert other[0].metrics["rounds"] == 1
    np.testing.assert_array_equal(other[0].arrays[0], [5.0, 5.0])


def test_a_deployed_client_with_a_damaged_state_file_stops_at_once(tmp_path):
    pytest.importorskip("grpc")
    from pollinate.transport.grpc.client import run_client

    (tmp_path / "client-0.json").write_text("garbage")
    with pytest.raises(ClientStateError, match="client-0.json is damaged"):
        run_client("127.0.0.1:1", Counter, 0, state_dir=tmp_path, max_retries=0)
