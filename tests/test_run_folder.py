"""RunFolderWriter across a server restart: best.npz keeps the best round, and a round the
state recorded but the run folder missed (a kill in between) is written on resuming."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from pollinate.callbacks import RunFolderWriter, load_checkpoint
from pollinate.server import History


def record(r: int, accuracy: float) -> dict[str, Any]:
    return {"round": r, "wall_s": float(r), "centralized": {"loss": 1.0, "accuracy": accuracy}}


def model(r: int) -> list[np.ndarray]:
    return [np.full((2, 3), r, dtype=np.float32)]


def play(writer: RunFolderWriter, history: History, scores: dict[int, float]) -> None:
    """What run() does per round: append the record, then call the callback."""
    for r, accuracy in scores.items():
        history.rounds.append(record(r, accuracy))
        writer.on_round_end(history.rounds[-1], model(r))


def checkpoint_round(folder: Path, name: str) -> int:
    arrays, meta = load_checkpoint(folder / "checkpoints" / name)
    assert arrays[0][0, 0] == meta["round"]  # the file holds that round's model
    return int(meta["round"])


def test_a_resumed_writer_keeps_the_best_round(tmp_path: Path) -> None:
    history = History(config={})
    play(RunFolderWriter(tmp_path, history, plots=False), history, {1: 0.5, 2: 0.9, 3: 0.6})
    assert checkpoint_round(tmp_path, "best.npz") == 2
    # the server restarts: a new writer over the recorded rounds
    resumed = History(config={}, rounds=list(history.rounds))
    play(RunFolderWriter(tmp_path, resumed, plots=False), resumed, {4: 0.7, 5: 0.9})
    assert checkpoint_round(tmp_path, "best.npz") == 2  # 0.7 and an equal 0.9 are not better
    assert checkpoint_round(tmp_path, "last.npz") == 5
    play(RunFolderWriter(tmp_path, resumed, plots=False), resumed, {6: 0.95})
    assert checkpoint_round(tmp_path, "best.npz") == 6


def test_catch_up_writes_the_round_a_stopped_server_left_undone(tmp_path: Path) -> None:
    history = History(config={})
    play(RunFolderWriter(tmp_path, history, plots=False), history, {1: 0.5, 2: 0.4})
    # round 3 reached the server's state, then the server was killed before the run folder
    recorded = History(config={}, rounds=[*history.rounds, record(3, 0.8)])
    writer = RunFolderWriter(tmp_path, recorded, plots=False)
    assert checkpoint_round(tmp_path, "last.npz") == 2
    writer.catch_up(model(3))
    assert checkpoint_round(tmp_path, "last.npz") == 3
    assert checkpoint_round(tmp_path, "best.npz") == 3  # round 3 was the best
    rounds = json.loads((tmp_path / "history.json").read_text())["rounds"]
    assert [r["round"] for r in rounds] == [1, 2, 3]
    assert (tmp_path / "metrics.csv").read_text().count("\n") == 4  # header + 3 rounds

    recorded.rounds.append(record(4, 0.1))  # the same again, with a round that is not best
    RunFolderWriter(tmp_path, recorded, plots=False).catch_up(model(4))
    assert checkpoint_round(tmp_path, "last.npz") == 4
    assert checkpoint_round(tmp_path, "best.npz") == 3


def test_catch_up_of_a_new_run_writes_nothing(tmp_path: Path) -> None:
    RunFolderWriter(tmp_path / "run", History(config={}), plots=False).catch_up(model(1))
    assert not (tmp_path / "run" / "checkpoints").exists()
    assert not (tmp_path / "run" / "history.json").exists()
