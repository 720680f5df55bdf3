"""Resuming a simulated run from its run folder, and never overwriting one silently.

A run folder written by ``pollinate run`` holds everything a resumed run needs:
``history.json`` (the config and the completed rounds), ``checkpoints/last.npz`` (the global
model after the last completed round and the strategy's state: server momentum, moments,
control variates, the selection policy's memory) and ``client_state/`` (what stateful
clients keep between rounds, e.g. SCAFFOLD's control variates).

- ``resume_point(folder, config)``: None for a new run folder; the completed rounds, the
  model and the strategy's state when the folder holds an interrupted run of the same
  config (``run.rounds`` may differ: raising it continues a finished run); ``ConfigError``
  naming the differences when it holds a run of another config.
- ``move_aside(folder)``: ``--fresh`` renames the old folder to ``<name>.<timestamp>``
  (never deleted).
- ``RoundStateStore``: the clients' state, committed once per completed round to a
  ``FileStateStore`` (``pollinate.client_state``). Each client's file keeps its latest
  version and the one before, each tagged with its round, so a crash between committing the
  clients' state and writing the checkpoint resumes consistently (the newest version not
  after the checkpoint's round is used).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pollinate.callbacks import load_checkpoint, load_strategy_state
from pollinate.client_state import FileStateStore
from pollinate.errors import ConfigError, DataError
from pollinate.report.files import read_history, to_json_safe
from pollinate.server import Callback
from pollinate.types import Arrays, ClientId

LAST_CHECKPOINT = Path("checkpoints") / "last.npz"
CLIENT_STATE = "client_state"


@dataclass(frozen=True)
class ResumePoint:
    """Where an interrupted run stopped: after round ``last``."""

    last: int
    records: list[dict[str, Any]]
    arrays: Arrays
    strategy_state: dict[str, Any]


def resume_point(folder: Path, config: dict[str, Any]) -> ResumePoint | None:
    """The point to resume ``folder``'s run from (None: nothing to resume)."""
    from pollinate.state import config_differences

    if not (folder / "history.json").is_file():
        return None
    try:
        history = read_history(folder)
    except DataError as exc:
        raise ConfigError(
            f"{folder} holds a history.json that cannot be read ({exc}); pass --fresh to move "
            "the old run aside, or choose another run.output"
        ) from exc
    if not history["rounds"]:
        return None
    done = len(history["rounds"])
    rounds_done = f"{done} round{'' if done == 1 else 's'}"
    stored = json.loads(json.dumps(to_json_safe(history["config"])))
    given = json.loads(json.dumps(to_json_safe(config)))
    for c in (stored, given):  # more rounds continue a run: run.rounds may differ
        c.get("run", {}).pop("rounds", None)
    if stored != given:
        _, details = config_differences(stored, given)
        raise ConfigError(
            f"{folder} holds a run of another config ({rounds_done} done); "
            f"it differs in: {'; '.join(details[:8])}. Pass --fresh to move the old run aside "
            "and start again, choose another run.output, or resume with the same config"
        )
    checkpoint = folder / LAST_CHECKPOINT
    if not checkpoint.is_file():
        raise ConfigError(
            f"{folder} holds {rounds_done} completed but no {LAST_CHECKPOINT}; "
            "pass --fresh to move the old run aside and start again"
        )
    arrays, meta = load_checkpoint(checkpoint)
    last = int(meta.get("round", 0))
    records = [r for r in history["rounds"] if int(r["round"]) <= last]
    if [int(r["round"]) for r in records] != list(range(1, last + 1)):
        raise ConfigError(
            f"{folder}: history.json and {LAST_CHECKPOINT} (round {last}) disagree; pass "
            "--fresh to move the old run aside and start again"
        )
    return ResumePoint(last, records, arrays, load_strategy_state(checkpoint))


def move_aside(folder: Path) -> Path | None:
    """Rename ``folder`` to ``<folder>.<timestamp>`` (``--fresh``); None when it is absent."""
    if not folder.exists():
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S")
    target, n = folder.with_name(f"{folder.name}.{stamp}"), 1
    while target.exists():
        target, n = folder.with_name(f"{folder.name}.{stamp}-{n}"), n + 1
    folder.rename(target)
    return target


class RoundStateStore(Callback):
    """The simulated clients' ``StateStore`` of a run folder, committed once per round.

    States put during a round are held in memory and saved to a
    :class:`~pollinate.client_state.FileStateStore` in ``folder``, tagged with the round,
    when the round ends (``on_round_end``), so an interrupted round leaves no trace.
    ``upto``: when resuming after round ``upto``, the newest saved version of each client's
    state from that round or before is used.
    """

    def __init__(self, folder: Path, upto: int | None = None) -> None:
        old = sorted(Path(folder).glob("[0-9]*.npz"))  # the layout before client-<id>.json
        if old:
            raise ConfigError(
                f"{folder} holds client state in an older layout ({old[0].name} …) that this "
                "pollinate does not read; pass --fresh to move the old run aside and start again"
            )
        self.files = FileStateStore(folder, upto=upto)
        self._pending: dict[ClientId, dict[str, Any]] = {}
        self._cache: dict[ClientId, dict[str, Any]] = {}

    def get(self, client_id: ClientId) -> dict[str, Any]:
        if client_id in self._pending:
            return dict(self._pending[client_id])
        if client_id not in self._cache:
            self._cache[client_id] = self.files.get(client_id)
        return dict(self._cache[client_id])

    def put(self, client_id: ClientId, state: dict[str, Any]) -> None:
        if state or self.get(client_id):
            self._pending[client_id] = dict(state)

    def on_round_end(self, record: dict[str, Any], arrays: Arrays) -> None:
        round_number = int(record["round"])
        for cid, state in self._pending.items():
            self.files.put(cid, state, round_number)
            self._cache[cid] = state
        self._pending.clear()
