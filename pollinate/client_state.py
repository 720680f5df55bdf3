"""Clients' state between rounds, kept in files: the one on-disk ``StateStore``.

A stateful algorithm keeps per-client values in ``ClientContext.state`` (SCAFFOLD's control
variate, local DP's count of releases, secure aggregation's keys during a round). Two users
keep them in :class:`FileStateStore`:

- a deployed client (``pollinate client --state-dir DIR``) saves after every task, so that a
  restarted client goes on where it stopped;
- ``pollinate run`` commits the simulated clients' state once per completed round
  (``pollinate.resume.RoundStateStore``), each save tagged with its round. A client's file
  then also keeps the newest version from an earlier round, and a store opened with
  ``upto=r`` reads the newest version from round ``r`` or before: a crash between committing
  round ``r``'s client state and writing its checkpoint resumes from round ``r - 1``
  consistently.

Client ``<id>``'s state is two files, never a pickle:

- ``client-<id>.json``: the state as JSON, with NumPy arrays replaced by references into
- ``client-<id>.<token>.npz``: its arrays (absent when the state holds none). With a round
  tag the JSON holds ``"round"`` and, when there is one, ``"previous": {"round", "state"}``;
  the arrays of both versions share the one npz.

Both are written to temporary files and renamed into place, the JSON last: a crash leaves
either the old state or the new one (an orphaned ``.npz`` is removed by the next save).
Values kept: ``None``, bool, int, float, str, bytes, NumPy arrays (not of objects) and
scalars, and lists, tuples and dicts of them (dict keys of any of these kinds). The files
are readable by their owner only: the state may hold secrets.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import secrets
import zipfile
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import numpy as np

from pollinate.errors import PollinateError
from pollinate.types import ClientId

log = logging.getLogger("pollinate")

FORMAT = "pollinate-client-state"
VERSION = 1

# what reading a damaged .npz can raise (missing file, bad zip, bad header, bad CRC …)
_NPZ_ERRORS = (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, zlib.error)


class ClientStateError(PollinateError):
    """A client's saved state cannot be read (damaged, or not a state file) or written."""


class FileStateStore:
    """A ``StateStore`` in a folder: each client's state in its own JSON (+ npz) files.

    ``run_id``, when set, is recorded with each save; :meth:`saved_run_id` reads it back so
    that a client can drop state saved for another run. ``upto``, when set, makes :meth:`get`
    return the newest version saved for round ``upto`` or before (``{}`` if none): the state
    that goes with a checkpoint of round ``upto``.
    """

    def __init__(
        self, directory: str | Path, run_id: str | None = None, upto: int | None = None
    ) -> None:
        self.directory = Path(directory)
        self.run_id = run_id
        self.upto = upto

    def path(self, client_id: ClientId) -> Path:
        """Client ``client_id``'s JSON file."""
        return self.directory / f"client-{int(client_id)}.json"

    def get(self, client_id: ClientId) -> dict[str, Any]:
        """The client's saved state ({} if none); ``ClientStateError`` if it is damaged."""
        doc = self._document(client_id)
        if doc is None:
            return {}
        for round_number, tree in _versions(doc):  # newest first
            if self.upto is None or round_number is None or round_number <= self.upto:
                return self._decode(client_id, doc, tree)
        return {}

    def saved_run_id(self, client_id: ClientId) -> str | None:
        """The run id the client's state was saved under (None: none saved, or no run id)."""
        doc = self._document(client_id)
        run_id = doc.get("run_id") if doc is not None else None
        return run_id if isinstance(run_id, str) else None

    def put(
        self, client_id: ClientId, state: dict[str, Any], round_number: int | None = None
    ) -> None:
        """Save the client's state atomically (an empty state removes its files).

        With ``round_number`` the save is tagged with that round and the newest version from
        an earlier round is kept beside it (an empty state is then kept too, when there is
        such a version: reading ``upto`` an earlier round must still find it).
        """
        path = self.path(client_id)
        previous = None
        if round_number is not None:
            previous = self._previous(client_id, round_number)
        if not state and previous is None:
            path.unlink(missing_ok=True)
            self._remove_arrays(client_id, keep=None)
            return
        arrays: list[np.ndarray] = []
        old: dict[str, Any] | None = None
        try:
            tree = _encode(state, arrays, "state")
            if previous is not None:
                old = {"round": previous[0], "state": _encode(previous[1], arrays, "state")}
        except TypeError as exc:
            raise ClientStateError(
                f"cannot save client {client_id}'s state to {path}: {exc}"
            ) from None
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        doc: dict[str, Any] = {"format": FORMAT, "version": VERSION, "client_id": int(client_id)}
        if self.run_id is not None:
            doc["run_id"] = self.run_id
        if round_number is not None:
            doc["round"] = int(round_number)
        if old is not None:
            doc["previous"] = old
        npz = None
        if arrays:
            npz = f"client-{int(client_id)}.{secrets.token_hex(6)}.npz"
            with _atomic(self.directory / npz) as f:
                np.savez(f, *arrays, allow_pickle=False)
            doc["arrays"] = npz
        doc["state"] = tree
        with _atomic(path) as f:
            f.write(json.dumps(doc, separators=(",", ":")).encode("utf-8"))
        _sync_directory(self.directory)
        self._remove_arrays(client_id, keep=npz)

    def _previous(
        self, client_id: ClientId, round_number: int
    ) -> tuple[int, dict[str, Any]] | None:
        """The newest saved version from a round before ``round_number``, if any."""
        doc = self._document(client_id)
        if doc is None:
            return None
        for saved, tree in _versions(doc):
            if saved is not None and saved < round_number:
                return saved, self._decode(client_id, doc, tree)
        return None

    def _decode(self, client_id: ClientId, doc: dict[str, Any], tree: Any) -> dict[str, Any]:
        path = self.path(client_id)
        arrays: dict[str, np.ndarray] = {}
        name = doc.get("arrays")
        if name is not None:
            arrays = self._arrays(path, name)
        try:
            state = _decode(tree, arrays)
        except (KeyError, TypeError, ValueError) as exc:
            raise self._damaged(path, f"its contents do not decode ({exc})") from None
        if not isinstance(state, dict):
            raise self._damaged(path, "it holds no state object")
        return state

    def _document(self, client_id: ClientId) -> dict[str, Any] | None:
        path = self.path(client_id)
        try:
            text = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise ClientStateError(f"cannot read the client state file {path}: {exc}") from None
        try:
            doc = json.loads(text)
        except (UnicodeDecodeError, ValueError) as exc:
            raise self._damaged(path, f"it is not valid JSON ({exc})") from None
        if not isinstance(doc, dict) or doc.get("format") != FORMAT or "state" not in doc:
            raise self._damaged(path, "it is not a pollinate client state file")
        if doc.get("version") != VERSION:
            raise self._damaged(
                path,
                f"it has format version {doc.get('version')!r}; this pollinate reads {VERSION}",
            )
        return doc

    def _arrays(self, path: Path, name: object) -> dict[str, np.ndarray]:
        if not isinstance(name, str) or Path(name).name != name or not name.endswith(".npz"):
            raise self._damaged(path, f"it names an invalid arrays file {name!r}")
        npz = self.directory / name
        try:
            with np.load(npz, allow_pickle=False) as data:
                return {key: data[key] for key in data.files}
        except _NPZ_ERRORS as exc:
            raise self._damaged(path, f"its arrays file {npz} cannot be read ({exc})") from None

    def _remove_arrays(self, client_id: ClientId, keep: str | None) -> None:
        for old in self.directory.glob(f"client-{int(client_id)}.*.npz"):
            if old.name != keep:
                old.unlink(missing_ok=True)

    def _damaged(self, path: Path, why: str) -> ClientStateError:
        return ClientStateError(
            f"the client state file {path} is damaged: {why}. Restore it from a backup, or "
            f"delete {path.parent / path.stem}.* to start this client afresh (it then loses "
            "what it kept between rounds, e.g. SCAFFOLD's control variate or the count of "
            "local DP releases)"
        )


def _versions(doc: dict[str, Any]) -> list[tuple[int | None, Any]]:
    """A state document's saved versions, newest first: (round or None, encoded state)."""
    out: list[tuple[int | None, Any]] = [(_round(doc.get("round")), doc["state"])]
    previous = doc.get("previous")
    if isinstance(previous, dict) and "state" in previous:
        out.append((_round(previous.get("round")), previous["state"]))
    return out


def _round(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


# --- encoding -------------------------------------------------------------------------------
#
# JSON values stand for themselves, except objects with one key starting with "$":
#   {"$array": "arr_0"}  an array in the npz      {"$scalar": "arr_1"}  a NumPy scalar there
#   {"$bytes": "…"}   base64 bytes                {"$tuple": […]}    a tuple
#   {"$dict": [[k, v], …]}  a dict whose keys are not all plain strings (ints, "$…", …)


def _encode(value: Any, arrays: list[np.ndarray], where: str) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (bytes, bytearray)):
        return {"$bytes": base64.b64encode(bytes(value)).decode("ascii")}
    if isinstance(value, (np.ndarray, np.generic)):
        array = np.asarray(value)
        if array.dtype.hasobject:
            raise TypeError(f"{where} is a NumPy array of Python objects; keep numeric arrays")
        arrays.append(array)
        name = f"arr_{len(arrays) - 1}"  # np.savez's name for a positional array
        return {"$array" if isinstance(value, np.ndarray) else "$scalar": name}
    if isinstance(value, list):
        return [_encode(v, arrays, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, tuple):
        return {"$tuple": [_encode(v, arrays, f"{where}[{i}]") for i, v in enumerate(value)]}
    if isinstance(value, dict):
        if all(isinstance(k, str) and not k.startswith("$") for k in value):
            return {k: _encode(v, arrays, f"{where}[{k!r}]") for k, v in value.items()}
        return {
            "$dict": [
                [_encode(k, arrays, f"{where} key {k!r}"), _encode(v, arrays, f"{where}[{k!r}]")]
                for k, v in value.items()
            ]
        }
    raise TypeError(
        f"{where} is a {type(value).__name__}; a client's state may hold None, numbers, "
        "strings, bytes, NumPy arrays and lists, tuples and dicts of them"
    )


def _decode(value: Any, arrays: dict[str, np.ndarray]) -> Any:
    if isinstance(value, list):
        return [_decode(v, arrays) for v in value]
    if not isinstance(value, dict):
        return value
    if len(value) == 1:
        ((tag, inner),) = value.items()
        if tag == "$array":
            return arrays[inner]
        if tag == "$scalar":
            return arrays[inner][()]
        if tag == "$bytes":
            return base64.b64decode(inner, validate=True)
        if tag == "$tuple":
            return tuple(_decode(v, arrays) for v in inner)
        if tag == "$dict":
            return {_decode(k, arrays): _decode(v, arrays) for k, v in inner}
        if tag.startswith("$"):
            raise ValueError(f"unknown tag {tag!r}")
    return {k: _decode(v, arrays) for k, v in value.items()}


# --- files ------------------------------------------------------------------------------------


@contextmanager
def _atomic(path: Path) -> Iterator[IO[bytes]]:
    """Write ``path`` through a temporary file (owner-only) renamed into place once synced."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _sync_directory(directory: Path) -> None:
    """Make the renames in ``directory`` durable (where the platform allows it)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
