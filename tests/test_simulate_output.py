"""The run folder from Python: ``simulate(..., output=...)`` and ``RunFolderWriter(path)``."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest

import pollinate
from pollinate.callbacks import RunFolderWriter, load_checkpoint
from pollinate.runlock import RunFolderLocked, RunLock
from pollinate.server import Callback
from pollinate.types import Arrays
from tests.fakes import MeanClientFn, initial

# FedAvg over MeanClients 0, 1, 2 (client i: i + 1 examples of value i): (0·1 + 1·2 + 2·3) / 6
MEAN = 8 / 6


def strategy() -> pollinate.FedAvg:
    return pollinate.FedAvg(min_train_clients=3, min_evaluate_clients=3, min_available_clients=3)


class TriesTheLock(Callback):
    """Records whether another writer could take the run folder during the run."""

    def __init__(self, folder: Any) -> None:
        self.folder = folder
        self.refused: list[str] = []

    def on_round_end(self, record: dict[str, Any], arrays: Arrays) -> None:
        try:
            RunLock(self.folder).acquire().release()
        except RunFolderLocked as exc:
            self.refused.append(str(exc))


def test_simulate_with_output_writes_the_run_folder(tmp_path) -> None:
    out = tmp_path / "runs" / "my-run"
    probe = TriesTheLock(out)
    result = pollinate.simulate(
        MeanClientFn(),
        num_clients=3,
        strategy=strategy(),
        initial_arrays=initial(),
        rounds=2,
        backend="sequential",
        callbacks=[probe],
        output=str(out),
    )
    np.testing.assert_allclose(result.arrays[0], np.full((3, 4), MEAN, np.float32), rtol=1e-6)
    history = json.loads((out / "history.json").read_text())
    assert [r["round"] for r in history["rounds"]] == [1, 2]
    assert history["rounds"] == json.loads(json.dumps(result.history.rounds))
    assert (out / "metrics.csv").read_text().splitlines()[0].startswith("round,")
    assert len((out / "metrics.csv").read_text().splitlines()) == 3
    last, meta = load_checkpoint(out / "checkpoints" / "last.npz")
    assert meta["round"] == 2
    np.testing.assert_array_equal(last[0], result.arrays[0])
    assert (out / "checkpoints" / "best.npz").is_file()
    assert (out / "report.html").read_text().count("data:image/png;base64,") >= 1
    assert (out / "accuracy.png").is_file()  # the clients' federated accuracy
    assert len(probe.refused) == 2 and "is in use by process" in probe.refused[0]
    RunLock(out).acquire().release()  # given back when the run ends


def test_run_folder_writer_needs_only_a_path(tmp_path) -> None:
    out = tmp_path / "w"
    result = pollinate.simulate(
        MeanClientFn(),
        num_clients=3,
        strategy=strategy(),
        initial_arrays=initial(),
        rounds=3,
        backend="sequential",
        callbacks=[RunFolderWriter(out, config={"note": "by hand"})],
    )
    history = json.loads((out / "history.json").read_text())
    assert [r["round"] for r in history["rounds"]] == [1, 2, 3]
    assert history["rounds"] == json.loads(json.dumps(result.history.rounds))
    assert history["config"] == {"note": "by hand"}
    assert json.loads((out / "config.json").read_text()) == {"note": "by hand"}
    assert load_checkpoint(out / "checkpoints" / "last.npz")[1]["round"] == 3
    assert (out / "report.html").is_file()


def test_a_writer_given_only_a_path_keeps_history_json_current_every_round(tmp_path) -> None:
    writer = RunFolderWriter(tmp_path)
    seen: list[int] = []

    class Reads(Callback):
        def on_round_end(self, record: dict[str, Any], arrays: Arrays) -> None:
            rounds = json.loads((tmp_path / "history.json").read_text())["rounds"]
            seen.append(len(rounds))

    with pytest.raises(pollinate.RoundFailedError):  # round 3 fails: rounds 1-2 stay written
        pollinate.simulate(
            _FailsInRound3(),
            num_clients=3,
            strategy=strategy(),
            initial_arrays=initial(),
            rounds=4,
            backend="sequential",
            callbacks=[writer, Reads()],
        )
    assert seen == [1, 2]
    assert len(json.loads((tmp_path / "history.json").read_text())["rounds"]) == 2


class _FailsInRound3(MeanClientFn):
    """MeanClients whose training raises from round 3 on."""

    def __call__(self, ctx: Any) -> Any:
        client = super().__call__(ctx)
        train = client.train

        def failing(arrays: Arrays, config: dict[str, Any]) -> Any:
            if config["round"] >= 3:
                raise RuntimeError("round 3")
            return train(arrays, config)

        client.train = failing  # type: ignore[method-assign]
        return client
