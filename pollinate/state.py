"""The deployed server's run state in one SQLite file, so a restarted server resumes its run.

``<run.output>/server.sqlite`` holds::

    schema_version(version)
    run(run_id, config_json, config_hash, created_at, status)        one row: this run
    rounds(round PRIMARY KEY, record_json, checkpoint_path, finished_at)
    clients(client_id PRIMARY KEY, public_key, first_seen, last_seen)
    nonces(nonce PRIMARY KEY, expires_at)                             replay protection

A round is recorded exactly once, in order: its checkpoint is first written atomically to
``<db folder>/checkpoints/round-<N>.npz``, then its row is committed. A crash between the two
leaves an orphan checkpoint that the next attempt at that round overwrites, so resuming always
starts after the last committed round, with that round's model. The database runs in WAL mode;
one connection, guarded by a lock, serves every thread of the server.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sqlite3
import threading
import time
import uuid
import zipfile
import zlib
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from pollinate.callbacks import load_checkpoint, load_strategy_state, save_checkpoint
from pollinate.errors import ConfigError, PollinateError
from pollinate.report.files import to_json_safe
from pollinate.types import Arrays

log = logging.getLogger("pollinate")

SCHEMA_VERSION = 1
CHECKPOINT_DIR = "checkpoints"
BACKUP_PREFIX = "previous-"  # --fresh moves an earlier run into <folder>/previous-<time>/
RUN_MARKERS = ("history.json",)  # files that say a folder holds a run
NONCE_PRUNE_INTERVAL_S = 60.0

_SCHEMA = """
CREATE TABLE schema_version (version INTEGER NOT NULL);
CREATE TABLE run (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    run_id TEXT NOT NULL UNIQUE,
    config_json TEXT NOT NULL,
    config_hash TEXT NOT NULL,
    created_at REAL NOT NULL,
    status TEXT NOT NULL
);
CREATE TABLE rounds (
    round INTEGER PRIMARY KEY CHECK (round >= 1),
    run_id TEXT NOT NULL REFERENCES run (run_id),
    record_json TEXT NOT NULL,
    checkpoint_path TEXT,
    finished_at REAL NOT NULL
);
CREATE TABLE clients (
    client_id INTEGER PRIMARY KEY,
    public_key TEXT NOT NULL,
    first_seen REAL NOT NULL,
    last_seen REAL NOT NULL
);
CREATE TABLE nonces (nonce BLOB PRIMARY KEY, expires_at REAL NOT NULL) WITHOUT ROWID;
CREATE INDEX nonces_by_expiry ON nonces (expires_at);
"""

# What reading a damaged .npz can raise (missing file, bad zip, bad header, bad CRC …).
_CHECKPOINT_ERRORS = (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, zlib.error)


class StateError(PollinateError):
    """The server's state file cannot be used as asked (other config, damaged, out of order)."""


def canonical_json(obj: Any, where: str = "config") -> str:
    """``obj`` as canonical JSON: sorted keys, no spaces, NumPy → Python, NaN/inf → null."""
    try:
        safe = to_json_safe(obj, where)
    except TypeError as exc:
        raise ConfigError(str(exc)) from None
    return json.dumps(safe, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def config_hash(config_json: str) -> str:
    """The sha256 hex digest of a canonical config."""
    return hashlib.sha256(config_json.encode("utf-8")).hexdigest()


def config_differences(
    old: Mapping[str, Any], new: Mapping[str, Any]
) -> tuple[list[str], list[str]]:
    """(top-level keys that differ, one line per differing leaf: ``train.lr: 0.01 -> 0.1``)."""
    top = sorted(k for k in set(old) | set(new) if old.get(k, _MISSING) != new.get(k, _MISSING))
    details: list[str] = []
    _leaf_differences(old, new, "", details)
    return top, details


class _Missing:
    def __repr__(self) -> str:
        return "(absent)"


_MISSING: Any = _Missing()


def _leaf_differences(old: Any, new: Any, prefix: str, out: list[str]) -> None:
    if isinstance(old, Mapping) and isinstance(new, Mapping):
        for key in sorted(set(old) | set(new)):
            path = f"{prefix}.{key}" if prefix else str(key)
            _leaf_differences(old.get(key, _MISSING), new.get(key, _MISSING), path, out)
    elif old != new:
        out.append(f"{prefix}: {_short(old)} -> {_short(new)}")


def _short(value: Any, limit: int = 40) -> str:
    text = repr(value) if value is _MISSING else json.dumps(value, ensure_ascii=False)
    return text if len(text) <= limit else text[: limit - 3] + "..."


class ServerState:
    """A deployed run's persistent state: config, rounds with checkpoints, clients, nonces.

    Create or resume with :meth:`open`; every method is safe to call from several threads.
    """

    def __init__(
        self,
        conn: sqlite3.Connection,
        path: Path,
        run_id: str,
        config: dict[str, Any],
        keep_checkpoints: int | None,
    ) -> None:
        self._conn: sqlite3.Connection | None = conn
        self.path = path
        self.folder = path.parent
        self.run_id = run_id
        self.config = config
        self.keep_checkpoints = keep_checkpoints
        self._lock = threading.RLock()  # guards the connection
        self._record_lock = threading.Lock()  # one record_round at a time (file, then row)
        self._last_nonce_prune = time.monotonic()

    # --- opening ------------------------------------------------------------------------------

    @classmethod
    def open(
        cls,
        path: str | os.PathLike[str],
        config: Mapping[str, Any],
        *,
        fresh: bool = False,
        keep_checkpoints: int | None = 3,
    ) -> ServerState:
        """Create the state file at ``path`` or resume the run stored there.

        Resuming with a config other than the stored one raises StateError naming the keys
        that differ. A state file that is missing or empty while the folder holds an earlier
        run (``history.json`` or round checkpoints) is refused too: starting a new run there
        would mix the two. ``fresh=True`` moves the whole earlier run in the folder aside
        (see :func:`move_aside`) and starts a new one. ``keep_checkpoints``: how many of the
        latest round checkpoints to keep (None: all).
        """
        if keep_checkpoints is not None and keep_checkpoints < 1:
            raise ConfigError(
                f"keep_checkpoints must be at least 1 (or None to keep all), not {keep_checkpoints}"
            )
        if not isinstance(config, Mapping):
            raise ConfigError(f"config must be a dict, not {type(config).__name__}")
        config_json = canonical_json(config)
        digest = config_hash(config_json)
        db = Path(path)
        db.parent.mkdir(parents=True, exist_ok=True)
        if fresh:
            move_aside(db)
        else:
            _refuse_orphaned_run(db)
        try:
            conn = sqlite3.connect(db, timeout=30.0, isolation_level=None, check_same_thread=False)
        except sqlite3.Error as exc:
            raise StateError(f"cannot open server state {db}: {exc}") from exc
        try:
            run_id = _initialise(conn, db, config_json, digest)
        except sqlite3.DatabaseError as exc:
            conn.close()
            raise StateError(
                f"{db} is not a pollinate server state file or is damaged ({exc}); restore it "
                "from a backup, or start a new run with --fresh (which moves the old run's "
                f"files to {BACKUP_PREFIX}<time>/ in the run folder)"
            ) from exc
        except BaseException:
            conn.close()
            raise
        state = cls(conn, db, run_id, json.loads(config_json), keep_checkpoints)
        state.prune_nonces()
        return state

    # --- runs and rounds -------------------------------------------------------------------

    @property
    def status(self) -> str:
        """The run's status: ``running`` until :meth:`set_status` says otherwise."""
        with self._lock:
            return str(self._db().execute("SELECT status FROM run").fetchone()[0])

    def set_status(self, status: str) -> None:
        """Record the run's status, e.g. ``finished`` or ``failed``."""
        with self._transaction() as conn:
            conn.execute("UPDATE run SET status = ?", (status,))

    def completed_rounds(self) -> list[int]:
        """The recorded rounds, in order."""
        with self._lock:
            rows = self._db().execute("SELECT round FROM rounds ORDER BY round").fetchall()
        return [int(r[0]) for r in rows]

    def last_round(self) -> int:
        """The last recorded round (0 if none)."""
        with self._lock:
            row = self._db().execute("SELECT MAX(round) FROM rounds").fetchone()
        return int(row[0]) if row[0] is not None else 0

    def record_round(
        self,
        round_number: int,
        record: Mapping[str, Any],
        arrays: Arrays,
        strategy_state: dict[str, Any] | None = None,
    ) -> None:
        """Record a finished round: write its checkpoint (the global model and the strategy's
        state after the round) atomically, then commit its row.

        Rounds are recorded once each, in order (``last_round() + 1``); anything else raises
        StateError. Old round checkpoints beyond ``keep_checkpoints`` are deleted afterwards.
        """
        with self._record_lock:
            last = self.last_round()
            if round_number != last + 1:
                raise StateError(_order_message(round_number, last))
            if "round" in record and record["round"] != round_number:
                raise StateError(
                    f"record for round {round_number} says it is round {record['round']}"
                )
            record_json = canonical_json(record, "record")
            _check_arrays(arrays, round_number)
            relative = f"{CHECKPOINT_DIR}/round-{round_number}.npz"
            file = self.folder / relative
            try:
                meta = {"round": round_number, "run_id": self.run_id}
                save_checkpoint(file, arrays, meta, strategy_state)
            except OSError as exc:
                raise StateError(f"cannot write checkpoint {file}: {exc}") from exc
            try:
                with self._transaction() as conn:
                    conn.execute(
                        "INSERT INTO rounds (round, run_id, record_json, checkpoint_path, "
                        "finished_at) VALUES (?, ?, ?, ?, ?)",
                        (round_number, self.run_id, record_json, relative, time.time()),
                    )
            except sqlite3.IntegrityError as exc:  # another process recorded it meanwhile
                raise StateError(f"round {round_number} is already recorded ({exc})") from exc
            self._prune_checkpoints(round_number)

    def load_latest(self) -> tuple[int, Arrays | None, list[dict[str, Any]]]:
        """(last round, its global model, every round's record in order); (0, None, []) if new.

        Raises StateError naming the checkpoint file when it is missing or cannot be read.
        """
        with self._lock:
            rows = (
                self._db()
                .execute("SELECT round, record_json, checkpoint_path FROM rounds ORDER BY round")
                .fetchall()
            )
        if not rows:
            return 0, None, []
        records = [json.loads(r[1]) for r in rows]
        last, _, relative = rows[-1]
        fix = "restore the file, or start a new run with --fresh"
        if relative is None:
            raise StateError(f"round {last} has no checkpoint recorded in {self.path}; {fix}")
        file = self.folder / relative
        if not file.is_file():
            raise StateError(f"checkpoint {file} of round {last} is missing; {fix}")
        try:
            arrays, meta = load_checkpoint(file)
        except _CHECKPOINT_ERRORS as exc:
            raise StateError(
                f"checkpoint {file} of round {last} cannot be read ({exc}); {fix}"
            ) from exc
        if meta.get("run_id") != self.run_id or meta.get("round") != last:
            raise StateError(
                f"checkpoint {file} belongs to run {meta.get('run_id')} round "
                f"{meta.get('round')}, not run {self.run_id} round {last}; {fix}"
            )
        return int(last), arrays, records

    def strategy_state(self, round_number: int) -> dict[str, Any]:
        """The strategy's state saved with round ``round_number`` (empty if none)."""
        with self._lock:
            row = (
                self._db()
                .execute("SELECT checkpoint_path FROM rounds WHERE round = ?", (round_number,))
                .fetchone()
            )
        if row is None or row[0] is None:
            raise StateError(f"round {round_number} has no checkpoint in {self.path}")
        file = self.folder / row[0]
        try:
            return load_strategy_state(file)
        except _CHECKPOINT_ERRORS as exc:
            raise StateError(
                f"checkpoint {file} of round {round_number} cannot be read ({exc})"
            ) from exc

    # --- clients and nonces ----------------------------------------------------------------

    def upsert_client(
        self, client_id: int, public_key_b64: str, *, replace_key: bool = False
    ) -> None:
        """Remember a client and when it was last seen.

        A different key for a known client id raises StateError unless ``replace_key``
        (a key rotated through the allow-list).
        """
        now = time.time()
        with self._transaction() as conn:
            row = conn.execute(
                "SELECT public_key FROM clients WHERE client_id = ?", (int(client_id),)
            ).fetchone()
            if row is None:
                conn.execute(
                    "INSERT INTO clients (client_id, public_key, first_seen, last_seen) "
                    "VALUES (?, ?, ?, ?)",
                    (int(client_id), public_key_b64, now, now),
                )
            elif row[0] == public_key_b64 or replace_key:
                conn.execute(
                    "UPDATE clients SET public_key = ?, last_seen = ? WHERE client_id = ?",
                    (public_key_b64, now, int(client_id)),
                )
            else:
                raise StateError(
                    f"client {client_id} is registered in this run with a different public key; "
                    "refusing it (if its key was rotated on purpose, update the allow-list and "
                    "re-register it with replace_key=True)"
                )

    def clients(self) -> list[dict[str, Any]]:
        """Every client seen in this run: client_id, public_key, first_seen, last_seen."""
        with self._lock:
            rows = (
                self._db()
                .execute(
                    "SELECT client_id, public_key, first_seen, last_seen FROM clients "
                    "ORDER BY client_id"
                )
                .fetchall()
            )
        keys = ("client_id", "public_key", "first_seen", "last_seen")
        return [dict(zip(keys, row)) for row in rows]

    def seen_nonce(self, nonce: bytes, expires_at: float) -> bool:
        """True if ``nonce`` was seen before (a replay); else remember it until ``expires_at``."""
        if not isinstance(nonce, (bytes, bytearray)) or not nonce:
            raise StateError(f"a nonce must be non-empty bytes, not {nonce!r}")
        with self._transaction() as conn:
            cursor = conn.execute(
                "INSERT OR IGNORE INTO nonces (nonce, expires_at) VALUES (?, ?)",
                (bytes(nonce), float(expires_at)),
            )
            seen = cursor.rowcount == 0
        if time.monotonic() - self._last_nonce_prune >= NONCE_PRUNE_INTERVAL_S:
            self.prune_nonces()
        return seen

    def prune_nonces(self, now: float | None = None) -> int:
        """Forget nonces that expired before ``now`` (default: now); return how many."""
        now = time.time() if now is None else now
        self._last_nonce_prune = time.monotonic()
        with self._transaction() as conn:
            return conn.execute("DELETE FROM nonces WHERE expires_at < ?", (now,)).rowcount

    # --- lifetime --------------------------------------------------------------------------

    def close(self) -> None:
        """Close the database (idempotent)."""
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    def __enter__(self) -> ServerState:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- internals -------------------------------------------------------------------------

    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            raise StateError(f"server state {self.path} is closed")
        return self._conn

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            conn = self._db()
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

    def _prune_checkpoints(self, latest: int) -> None:
        """Delete checkpoints older than the last ``keep_checkpoints`` (row first, then file)."""
        if self.keep_checkpoints is None:
            return
        oldest_kept = latest - self.keep_checkpoints + 1
        with self._transaction() as conn:
            rows = conn.execute(
                "SELECT round, checkpoint_path FROM rounds "
                "WHERE checkpoint_path IS NOT NULL AND round < ?",
                (oldest_kept,),
            ).fetchall()
            conn.execute("UPDATE rounds SET checkpoint_path = NULL WHERE round < ?", (oldest_kept,))
        for _, relative in rows:
            try:
                (self.folder / relative).unlink(missing_ok=True)
            except OSError as exc:  # a file we cannot delete costs disk space, not correctness
                log.warning("could not delete old checkpoint %s: %s", relative, exc)


def _initialise(conn: sqlite3.Connection, db: Path, config_json: str, digest: str) -> str:
    """Set the pragmas, create the schema if the file is new, check the config; the run id."""
    mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
    if str(mode).lower() != "wal":
        log.warning("server state %s: WAL journal not available here, using %s", db, mode)
    conn.execute("PRAGMA foreign_keys=ON")
    conn.execute("PRAGMA synchronous=NORMAL")  # durable across process crashes (kill -9)
    conn.execute("BEGIN IMMEDIATE")
    try:
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        if not tables:
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    conn.execute(statement)
            conn.execute("INSERT INTO schema_version (version) VALUES (?)", (SCHEMA_VERSION,))
        elif "schema_version" not in tables:
            raise StateError(
                f"{db} is an SQLite file but not a pollinate server state (tables: "
                f"{', '.join(sorted(tables))}); choose another run.output folder"
            )
        else:
            version = conn.execute("SELECT MAX(version) FROM schema_version").fetchone()[0]
            if version != SCHEMA_VERSION:
                raise StateError(
                    f"server state {db} has schema version {version}, this pollinate reads "
                    f"version {SCHEMA_VERSION}; use the pollinate that wrote it, or start a new "
                    "run with --fresh"
                )
        row = conn.execute("SELECT run_id, config_json, config_hash FROM run").fetchone()
        if row is None:
            run_id = uuid.uuid4().hex
            conn.execute(
                "INSERT INTO run (id, run_id, config_json, config_hash, created_at, status) "
                "VALUES (1, ?, ?, ?, ?, 'running')",
                (run_id, config_json, digest, time.time()),
            )
        else:
            run_id, stored_json, stored_hash = row
            if stored_hash != digest:
                rounds = conn.execute("SELECT COUNT(*) FROM rounds").fetchone()[0]
                raise StateError(_mismatch_message(db, run_id, rounds, stored_json, config_json))
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")
    return str(run_id)


def _mismatch_message(db: Path, run_id: str, rounds: int, stored: str, given: str) -> str:
    top, details = config_differences(json.loads(stored), json.loads(given))
    shown = "; ".join(details[:6]) + ("; ..." if len(details) > 6 else "")
    return (
        f"{db} holds run {run_id} ({rounds} round{'' if rounds == 1 else 's'} done) with a "
        "different config: "
        f"top-level keys that differ: {', '.join(top)} ({shown}). To resume it, start with the "
        "config it was started with; to start a new run, set a new run.output folder or pass "
        f"--fresh (the old run's files are moved to {BACKUP_PREFIX}<time>/ in the folder)"
    )


def _order_message(round_number: int, last: int) -> str:
    if round_number <= last:
        return (
            f"round {round_number} is already recorded (the last recorded round is {last}); "
            "each round is recorded exactly once"
        )
    return (
        f"round {round_number} cannot be recorded yet: the last recorded round is {last}, "
        f"so the next must be {last + 1}"
    )


def _check_arrays(arrays: Arrays, round_number: int) -> None:
    for i, array in enumerate(arrays):
        if not isinstance(array, np.ndarray) or array.dtype.hasobject:
            kind = array.dtype if isinstance(array, np.ndarray) else type(array).__name__
            raise StateError(
                f"round {round_number}: array {i} is {kind}; a checkpoint holds numeric "
                "NumPy arrays only"
            )


def _refuse_orphaned_run(db: Path) -> None:
    """StateError if ``db`` is missing or empty while its folder holds an earlier run."""
    if db.exists() and db.stat().st_size > 0:  # (this module never leaves an empty file)
        return
    checkpoints = db.parent / CHECKPOINT_DIR
    found = [name for name in RUN_MARKERS if (db.parent / name).is_file()]
    if checkpoints.is_dir() and any(checkpoints.iterdir()):
        found.append(f"{CHECKPOINT_DIR}/")
    if not found:
        return
    what = "is empty" if db.exists() else "is missing"
    raise StateError(
        f"the server state {db} {what}, but {db.parent} holds an earlier run "
        f"({', '.join(found)}): starting a new run over it would mix the two runs' rounds and "
        "checkpoints. Restore the state file from a backup to resume that run, or pass "
        f"--fresh to move the old run's files aside (to {BACKUP_PREFIX}<time>/ in the folder) "
        "and start a new one"
    )


def move_aside(db: Path) -> Path | None:
    """Move the whole earlier run in ``db``'s folder aside; return where it went (None: no run).

    Every file and folder of the run folder moves into ``<folder>/previous-<timestamp>/``: the
    state file and its WAL files, the checkpoints, ``history.json``, metrics, plots and the
    report. Only hidden entries (the run lock ``.lock``) and earlier ``previous-*`` folders
    stay. Nothing is deleted.
    """
    folder = db.parent
    if db.exists():  # fold the WAL into the file so the backup is one self-contained file
        try:
            conn = sqlite3.connect(db, timeout=30.0)
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            conn.close()
        except sqlite3.Error:
            pass  # damaged: move the files as they are
    if not folder.is_dir():
        return None
    entries = sorted(p for p in folder.iterdir() if not p.name.startswith((".", BACKUP_PREFIX)))
    if not entries:
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S")
    suffix, n = stamp, 1
    while (folder / f"{BACKUP_PREFIX}{suffix}").exists():
        suffix, n = f"{stamp}-{n}", n + 1
    target = folder / f"{BACKUP_PREFIX}{suffix}"
    target.mkdir()
    for entry in entries:
        if entry.exists() or entry.is_symlink():
            os.replace(entry, target / entry.name)
    log.warning("moved the earlier run in %s aside to %s", folder, target)
    return target
