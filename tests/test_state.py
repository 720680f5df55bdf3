"""Tests for pollinate.state: the server's run state in SQLite (real files, real processes)."""

from __future__ import annotations

import os
import random
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from pollinate.callbacks import save_checkpoint
from pollinate.errors import PollinateError
from pollinate.state import ServerState, StateError

CONFIG: dict[str, Any] = {
    "run": {"name": "t", "rounds": 5, "seed": 0, "output": "runs/t"},
    "data": {"dataset": "digits", "num_clients": 5},
    "train": {"epochs": 1, "lr": 0.01},
    "strategy": {"name": "fedavg", "min_train_clients": 2},
}


def model(round_number: int) -> list[np.ndarray]:
    """A small model whose values say which round produced it."""
    return [
        np.full((3, 4), round_number, dtype=np.float32),
        np.arange(5, dtype=np.int64) * round_number,
        np.array(round_number / 7, dtype=np.float64),
    ]


def record(round_number: int) -> dict[str, Any]:
    return {
        "round": round_number,
        "wall_s": 1.5 * round_number,
        "centralized": {"loss": 1.0 / round_number, "accuracy": 0.5 + round_number / 100},
        "train": {"clients": 5, "failures": 0},
        "clients": {"3": {"num_examples": 10}},
    }


def assert_arrays_equal(got: list[np.ndarray] | None, want: list[np.ndarray]) -> None:
    assert got is not None
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.dtype == w.dtype and g.shape == w.shape
        np.testing.assert_array_equal(g, w)


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "run" / "server.sqlite"


# --- create, record, resume -----------------------------------------------------------------


def test_new_state_is_empty(db: Path) -> None:
    with ServerState.open(db, CONFIG) as state:
        assert len(state.run_id) == 32 and int(state.run_id, 16) >= 0
        assert state.last_round() == 0
        assert state.completed_rounds() == []
        assert state.load_latest() == (0, None, [])
        assert state.status == "running"
        assert state.config == CONFIG
    conn = sqlite3.connect(db)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("SELECT version FROM schema_version").fetchall() == [(1,)]
    conn.close()


def test_record_close_reopen_resumes(db: Path) -> None:
    state = ServerState.open(db, CONFIG)
    run_id = state.run_id
    for r in (1, 2, 3):
        state.record_round(r, record(r), model(r))
    state.close()

    with ServerState.open(db, CONFIG) as resumed:
        assert resumed.run_id == run_id
        assert resumed.last_round() == 3
        assert resumed.completed_rounds() == [1, 2, 3]
        round_number, arrays, records = resumed.load_latest()
        assert round_number == 3
        assert_arrays_equal(arrays, model(3))
        assert records == [record(1), record(2), record(3)]
        resumed.record_round(4, record(4), model(4))
        assert resumed.completed_rounds() == [1, 2, 3, 4]
    assert (db.parent / "checkpoints" / "round-4.npz").is_file()


def test_config_compared_canonically(db: Path) -> None:
    first = {"b": {"y": (1, 2), "x": np.float64(0.5)}, "a": 1}
    same = {"a": 1, "b": {"x": 0.5, "y": [1, 2]}}
    with ServerState.open(db, first) as state:
        run_id = state.run_id
    with ServerState.open(db, same) as state:
        assert state.run_id == run_id


def test_record_json_is_plain(db: Path) -> None:
    rec = {"round": 1, "train": {"clients": np.int64(4), "loss": float("nan")}}
    with ServerState.open(db, CONFIG) as state:
        state.record_round(1, rec, model(1))
        _, _, records = state.load_latest()
    assert records == [{"round": 1, "train": {"clients": 4, "loss": None}}]
    assert type(records[0]["train"]["clients"]) is int


def test_status_persists(db: Path) -> None:
    with ServerState.open(db, CONFIG) as state:
        state.set_status("finished")
    with ServerState.open(db, CONFIG) as state:
        assert state.status == "finished"


# --- rounds exactly once, in order -----------------------------------------------------------


def test_rounds_out_of_order_or_twice_are_refused(db: Path) -> None:
    with ServerState.open(db, CONFIG) as state:
        with pytest.raises(StateError, match="next must be 1"):
            state.record_round(2, record(2), model(2))
        state.record_round(1, record(1), model(1))
        with pytest.raises(StateError, match="round 1 is already recorded"):
            state.record_round(1, record(1), model(9))
        with pytest.raises(StateError, match="next must be 2"):
            state.record_round(3, record(3), model(3))
        with pytest.raises(StateError, match="says it is round 1"):
            state.record_round(2, record(1), model(2))
        assert state.completed_rounds() == [1]
        _, arrays, _ = state.load_latest()
        assert_arrays_equal(arrays, model(1))  # the refused re-record left round 1 intact
    assert not (db.parent / "checkpoints" / "round-3.npz").exists()


def test_two_handles_cannot_record_the_same_round(db: Path) -> None:
    with ServerState.open(db, CONFIG) as one, ServerState.open(db, CONFIG) as two:
        one.record_round(1, record(1), model(1))
        with pytest.raises(StateError, match="already recorded"):
            two.record_round(1, record(1), model(1))
        assert two.completed_rounds() == [1]


def test_object_arrays_are_refused(db: Path) -> None:
    with ServerState.open(db, CONFIG) as state:
        with pytest.raises(StateError, match="numeric NumPy arrays"):
            state.record_round(1, record(1), [np.array([{"a": 1}], dtype=object)])
        assert state.last_round() == 0


# --- config mismatch and --fresh -------------------------------------------------------------


def test_config_mismatch_names_the_differing_keys(db: Path) -> None:
    with ServerState.open(db, CONFIG) as state:
        state.record_round(1, record(1), model(1))
    changed = {**CONFIG, "train": {"epochs": 1, "lr": 0.1}, "privacy": {"epsilon": 1.0}}
    del changed["strategy"]
    with pytest.raises(StateError) as info:
        ServerState.open(db, changed)
    message = str(info.value)
    assert isinstance(info.value, PollinateError)
    assert "top-level keys that differ: privacy, strategy, train (" in message
    assert "train.lr: 0.01 -> 0.1" in message
    assert "data" not in message.split("(")[1]  # unchanged sections are not named
    assert "run.output" in message and "--fresh" in message
    assert "(1 round done)" in message
    with ServerState.open(db, CONFIG) as state:  # the stored run is untouched
        assert state.completed_rounds() == [1]


def test_fresh_moves_the_whole_old_run_aside(db: Path) -> None:
    with ServerState.open(db, CONFIG) as state:
        old_id = state.run_id
        state.record_round(1, record(1), model(1))
        state.record_round(2, record(2), model(2))
    folder = db.parent
    run_files = {  # what the run folder writer adds next to the state
        "history.json": "{}",
        "metrics.csv": "round\n",
        "report.html": "<html>",
        "checkpoints/last.npz": "npz",
    }
    for name, text in run_files.items():
        (folder / name).write_text(text)
    (folder / ".lock").write_text("123\n")
    other = {**CONFIG, "train": {"epochs": 2, "lr": 0.01}}

    with ServerState.open(db, other, fresh=True) as state:
        assert state.run_id != old_id
        assert state.last_round() == 0
        state.record_round(1, record(1), model(11))

    (backup,) = folder.glob("previous-*")
    conn = sqlite3.connect(backup / "server.sqlite")
    assert conn.execute("SELECT run_id FROM run").fetchone()[0] == old_id
    assert [r[0] for r in conn.execute("SELECT round FROM rounds ORDER BY round")] == [1, 2]
    conn.close()
    assert sorted(p.name for p in (backup / "checkpoints").iterdir()) == [
        "last.npz",
        "round-1.npz",
        "round-2.npz",
    ]
    for name, text in run_files.items():  # every file of the old run went along, unchanged
        assert (backup / name).read_text() == text
        assert not (folder / name).exists() or name.startswith("checkpoints/")
    assert not (folder / "checkpoints" / "last.npz").exists()
    assert (folder / ".lock").read_text() == "123\n"  # the run lock stays where it is
    assert sorted(p.name for p in (folder / "checkpoints").iterdir()) == ["round-1.npz"]

    # a second --fresh in the same second gets its own folder; nothing is overwritten
    with ServerState.open(db, CONFIG, fresh=True) as state:
        assert state.last_round() == 0
    backups = sorted(folder.glob("previous-*"))
    assert len(backups) == 2 and backup in backups
    (newer,) = set(backups) - {backup}
    assert (newer / "server.sqlite").is_file() and not list(newer.glob("previous-*"))


def test_fresh_without_old_state_just_creates(db: Path) -> None:
    with ServerState.open(db, CONFIG, fresh=True) as state:
        assert state.last_round() == 0
    assert list(db.parent.glob("previous-*")) == []


@pytest.mark.parametrize("how", ["emptied", "deleted"])
def test_a_lost_state_next_to_an_earlier_run_is_refused(db: Path, how: str) -> None:
    with ServerState.open(db, CONFIG) as state:
        state.record_round(1, record(1), model(1))
    (db.parent / "history.json").write_text('{"rounds": [{"round": 1}]}')
    if how == "emptied":
        db.write_bytes(b"")  # `: > server.sqlite`
    else:
        db.unlink()
    for side in (db.with_name(db.name + "-wal"), db.with_name(db.name + "-shm")):
        side.unlink(missing_ok=True)
    with pytest.raises(StateError) as info:
        ServerState.open(db, CONFIG)
    message = str(info.value)
    assert f"is {'empty' if how == 'emptied' else 'missing'}" in message
    assert "history.json" in message and "checkpoints/" in message and "--fresh" in message
    assert (db.parent / "checkpoints" / "round-1.npz").is_file()  # nothing was touched
    with ServerState.open(db, CONFIG, fresh=True) as state:  # --fresh moves it aside
        assert state.last_round() == 0
    (backup,) = db.parent.glob("previous-*")
    assert (backup / "history.json").is_file() and (backup / "checkpoints/round-1.npz").is_file()


def test_checkpoints_alone_are_an_earlier_run_too(db: Path) -> None:
    save_checkpoint(db.parent / "checkpoints" / "last.npz", model(1), {"round": 1})
    with pytest.raises(StateError, match=r"is missing, but .* \(checkpoints/\)"):
        ServerState.open(db, CONFIG)
    (db.parent / "checkpoints" / "last.npz").unlink()
    with ServerState.open(db, CONFIG) as state:  # an empty checkpoints folder is no run
        assert state.last_round() == 0


def test_a_file_that_is_not_a_state_is_refused(db: Path) -> None:
    db.parent.mkdir(parents=True)
    db.write_bytes(b"this is not sqlite at all" * 100)
    with pytest.raises(StateError, match="not a pollinate server state"):
        ServerState.open(db, CONFIG)
    other = db.with_name("other.sqlite")
    conn = sqlite3.connect(other)
    conn.execute("CREATE TABLE t (x)")
    conn.close()
    with pytest.raises(StateError, match="tables: t"):
        ServerState.open(other, CONFIG)


# --- checkpoints -----------------------------------------------------------------------------


def test_pruning_keeps_the_latest_checkpoints(db: Path) -> None:
    checkpoints = db.parent / "checkpoints"
    with ServerState.open(db, CONFIG, keep_checkpoints=2) as state:
        # a file of the run-folder writer in the same folder is not ours to delete
        save_checkpoint(checkpoints / "last.npz", model(0), {})
        for r in range(1, 6):
            state.record_round(r, record(r), model(r))
            names = sorted(p.name for p in checkpoints.glob("round-*.npz"))
            assert f"round-{r}.npz" in names and len(names) == min(r, 2)
        assert sorted(p.name for p in checkpoints.iterdir()) == [
            "last.npz",
            "round-4.npz",
            "round-5.npz",
        ]
        round_number, arrays, records = state.load_latest()
    assert round_number == 5
    assert_arrays_equal(arrays, model(5))
    assert len(records) == 5


def test_keep_one_and_keep_all(tmp_path: Path) -> None:
    with ServerState.open(tmp_path / "a" / "s.sqlite", CONFIG, keep_checkpoints=1) as state:
        for r in range(1, 4):
            state.record_round(r, record(r), model(r))
    assert [p.name for p in (tmp_path / "a" / "checkpoints").iterdir()] == ["round-3.npz"]
    with ServerState.open(tmp_path / "b" / "s.sqlite", CONFIG, keep_checkpoints=None) as state:
        for r in range(1, 5):
            state.record_round(r, record(r), model(r))
    assert len(list((tmp_path / "b" / "checkpoints").iterdir())) == 4
    with pytest.raises(PollinateError, match="at least 1"):
        ServerState.open(tmp_path / "c" / "s.sqlite", CONFIG, keep_checkpoints=0)


def test_missing_or_corrupt_checkpoint_is_named(db: Path) -> None:
    with ServerState.open(db, CONFIG) as state:
        state.record_round(1, record(1), model(1))
        state.record_round(2, record(2), model(2))
    latest = db.parent / "checkpoints" / "round-2.npz"
    data = latest.read_bytes()

    latest.write_bytes(data[: len(data) // 2])
    with ServerState.open(db, CONFIG) as state:
        with pytest.raises(StateError, match="round-2.npz of round 2 cannot be read"):
            state.load_latest()

    latest.unlink()
    with ServerState.open(db, CONFIG) as state:
        with pytest.raises(StateError, match="round-2.npz of round 2 is missing"):
            state.load_latest()

    # another run's file in its place is caught too
    save_checkpoint(latest, model(2), {"round": 2, "run_id": "someone-else"})
    with ServerState.open(db, CONFIG) as state:
        with pytest.raises(StateError, match="belongs to run someone-else"):
            state.load_latest()


# --- kill -9 in the middle of recording a round ----------------------------------------------

CHILD = r"""
import sys, time
import numpy as np
import numpy.lib.format as npformat
import pollinate.state as st

db, mode = sys.argv[1], sys.argv[2]
state = st.ServerState.open(db, {"run": {"rounds": 3}})
state.record_round(1, {"round": 1}, [np.full(3, 1.0), np.arange(4)])

second = np.arange(4) * 2
if mode == "mid_write":  # stall after part of the .npz is on disk
    real_write = npformat.write_array
    def write_array(fp, array, *args, **kwargs):
        if array is second:
            print("writing", flush=True)
            time.sleep(600)
        return real_write(fp, array, *args, **kwargs)
    npformat.write_array = write_array
else:  # stall after the checkpoint file is complete, before the row is committed
    real_save = st.save_checkpoint
    def save_checkpoint(*args, **kwargs):
        real_save(*args, **kwargs)
        print("writing", flush=True)
        time.sleep(600)
    st.save_checkpoint = save_checkpoint
state.record_round(2, {"round": 2}, [np.full(3, 2.0), second])
print("not killed", flush=True)
"""


@pytest.mark.parametrize("mode", ["mid_write", "after_write"])
def test_kill_9_while_recording_a_round_loses_nothing(db: Path, mode: str) -> None:
    db.parent.mkdir(parents=True)
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(db), mode],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = child.stdout.readline() if child.stdout else ""
        if line.strip() != "writing":
            child.kill()
            _, err = child.communicate()
            pytest.fail(f"child did not reach round 2's checkpoint: {line!r}\n{err}")
        os.kill(child.pid, signal.SIGKILL)
        child.communicate()
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert child.returncode == -signal.SIGKILL

    checkpoints = db.parent / "checkpoints"
    if mode == "mid_write":
        assert (checkpoints / "round-2.npz.tmp.npz").is_file()
        assert not (checkpoints / "round-2.npz").exists()
    else:
        assert (checkpoints / "round-2.npz").is_file()  # the harmless orphan

    config = {"run": {"rounds": 3}}
    with ServerState.open(db, config) as state:
        assert state.completed_rounds() == [1]
        round_number, arrays, records = state.load_latest()
        assert round_number == 1 and records == [{"round": 1}]
        assert_arrays_equal(arrays, [np.full(3, 1.0), np.arange(4)])
        # the server goes on: round 2 is recorded over the orphan
        state.record_round(2, {"round": 2}, [np.full(3, 5.0)])
    with ServerState.open(db, config) as state:
        round_number, arrays, _ = state.load_latest()
    assert round_number == 2
    assert_arrays_equal(arrays, [np.full(3, 5.0)])


# --- clients ---------------------------------------------------------------------------------


def test_clients_are_bound_to_their_key(db: Path) -> None:
    with ServerState.open(db, CONFIG) as state:
        state.upsert_client(3, "a2V5LTM=")
        state.upsert_client(1, "a2V5LTE=")
        listed = state.clients()
        assert [c["client_id"] for c in listed] == [1, 3]
        first = listed[1]
        assert first["public_key"] == "a2V5LTM="
        assert first["first_seen"] == first["last_seen"]

        time.sleep(0.01)  # so last_seen can move (not a timing assertion: only ordering)
        state.upsert_client(3, "a2V5LTM=")
        again = {c["client_id"]: c for c in state.clients()}
        assert again[3]["last_seen"] > first["last_seen"]
        assert again[3]["first_seen"] == first["first_seen"]

        with pytest.raises(StateError, match="client 3 .* different public key"):
            state.upsert_client(3, "b3RoZXI=")
        assert {c["client_id"]: c["public_key"] for c in state.clients()}[3] == "a2V5LTM="
        state.upsert_client(3, "b3RoZXI=", replace_key=True)

    with ServerState.open(db, CONFIG) as state:
        assert {c["client_id"]: c["public_key"] for c in state.clients()} == {
            1: "a2V5LTE=",
            3: "b3RoZXI=",
        }


# --- nonces ----------------------------------------------------------------------------------


def test_nonce_replay_is_detected_across_restarts(db: Path) -> None:
    later = time.time() + 300
    nonce = os.urandom(16)
    with ServerState.open(db, CONFIG) as state:
        assert state.seen_nonce(nonce, later) is False
        assert state.seen_nonce(nonce, later) is True
        assert state.seen_nonce(os.urandom(16), later) is False
        with pytest.raises(StateError, match="non-empty bytes"):
            state.seen_nonce(b"", later)
    with ServerState.open(db, CONFIG) as state:
        assert state.seen_nonce(nonce, later) is True


def test_expired_nonces_are_pruned(db: Path) -> None:
    now = time.time()
    with ServerState.open(db, CONFIG) as state:
        for i in range(10):
            state.seen_nonce(b"old-%d" % i, now - 1)  # already expired
        state.seen_nonce(b"live", now + 300)
        assert state.prune_nonces() == 10
        assert state.seen_nonce(b"live", now + 300) is True
        assert state.prune_nonces(now=now + 301) == 1
        assert state.seen_nonce(b"live", now + 600) is False
        state.seen_nonce(b"old-x", now - 1)
    with ServerState.open(db, CONFIG) as state:  # opening prunes
        assert state.prune_nonces() == 0
        assert state.seen_nonce(b"old-x", now + 300) is False


def test_concurrent_threads_share_one_state(db: Path) -> None:
    nonces = [os.urandom(16) for _ in range(300)]
    expires = time.time() + 300
    fresh_counts: dict[bytes, int] = {n: 0 for n in nonces}
    errors: list[BaseException] = []
    counts_lock = threading.Lock()

    with ServerState.open(db, CONFIG) as state:

        def check_nonces(seed: int) -> None:
            order = nonces[:]
            random.Random(seed).shuffle(order)
            try:
                for n in order:
                    if not state.seen_nonce(n, expires):
                        with counts_lock:
                            fresh_counts[n] += 1
                    state.upsert_client(seed, f"key-{seed}")
            except BaseException as exc:  # surfaced below
                errors.append(exc)

        def record_rounds() -> None:
            try:
                for r in range(1, 6):
                    state.record_round(r, record(r), model(r))
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=check_nonces, args=(s,)) for s in range(6)]
        threads.append(threading.Thread(target=record_rounds))
        for t in threads:
            t.start()
        for t in threads:
            t.join()

        assert errors == []
        assert set(fresh_counts.values()) == {1}  # each nonce was new to exactly one thread
        assert state.completed_rounds() == [1, 2, 3, 4, 5]
        assert [c["client_id"] for c in state.clients()] == list(range(6))


def test_closed_state_refuses_use(db: Path) -> None:
    state = ServerState.open(db, CONFIG)
    state.close()
    state.close()  # idempotent
    with pytest.raises(StateError, match="is closed"):
        state.last_round()
    with pytest.raises(StateError, match="is closed"):
        state.seen_nonce(b"n", time.time() + 1)
