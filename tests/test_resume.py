"""Resumable simulation: a run folder is resumed with the same config, refused with another,
moved aside with --fresh, and a resumed deterministic run ends bit-identical."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from pollinate import config
from pollinate.callbacks import load_checkpoint
from pollinate.client_state import FileStateStore
from pollinate.errors import ConfigError
from pollinate.experiment import run_experiment
from pollinate.resume import RoundStateStore
from tests.waiting import patience, wait_until

SMALL = [
    "simulation.backend=sequential",
    "data.num_clients=6",
    "train.epochs=1",
    "run.deterministic=true",
    "strategy.fraction_train=0.5",
]


def _cfg(tmp_path: Path, *extra: str):
    return config.load(None, [*SMALL, f"run.output={tmp_path / 'run'}", *extra])


def _same(a: list[np.ndarray], b: list[np.ndarray]) -> None:
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("strategy", ["fedavg", "fedadam", "scaffold"])
def test_more_rounds_continue_a_run_bit_identically(tmp_path: Path, strategy: str) -> None:
    extra = [f"strategy.name={strategy}", "train.momentum=0.0"]
    straight = run_experiment(_cfg(tmp_path / "a", "run.rounds=4", *extra), quiet=True)
    run_experiment(_cfg(tmp_path / "b", "run.rounds=2", *extra), quiet=True)
    resumed = run_experiment(_cfg(tmp_path / "b", "run.rounds=4", *extra), quiet=True)
    _same(straight.arrays, resumed.arrays)
    assert [r["round"] for r in resumed.history.rounds] == [1, 2, 3, 4]
    history = json.loads((tmp_path / "b/run/history.json").read_text())
    assert [r["round"] for r in history["rounds"]] == [1, 2, 3, 4]


def test_another_config_is_refused_naming_the_difference(tmp_path: Path) -> None:
    run_experiment(_cfg(tmp_path, "run.rounds=1"), quiet=True)
    with pytest.raises(ConfigError, match=r"train\.lr: 0\.05 -> 0\.1.*--fresh"):
        run_experiment(_cfg(tmp_path, "run.rounds=1", "train.lr=0.1"), quiet=True)


def test_fresh_moves_the_old_run_aside(tmp_path: Path) -> None:
    run_experiment(_cfg(tmp_path, "run.rounds=1"), quiet=True)
    run_experiment(_cfg(tmp_path, "run.rounds=1", "train.lr=0.1"), quiet=True, fresh=True)
    moved = [p for p in tmp_path.iterdir() if p.name.startswith("run.")]
    assert len(moved) == 1 and (moved[0] / "history.json").is_file()
    new = json.loads((tmp_path / "run/history.json").read_text())
    assert new["config"]["train"]["lr"] == 0.1


def test_a_finished_run_is_not_run_again(tmp_path: Path, caplog) -> None:
    first = run_experiment(_cfg(tmp_path, "run.rounds=1"), quiet=True)
    with caplog.at_level("WARNING", logger="pollinate"):
        again = run_experiment(_cfg(tmp_path, "run.rounds=1"), quiet=True)
    assert len(again.history.rounds) == 1
    _same(first.arrays, again.arrays)
    assert "the run already finished its 1 round; nothing to do" in caplog.text


def test_client_state_commits_at_round_end_and_keeps_the_previous_version(tmp_path: Path) -> None:
    store = RoundStateStore(tmp_path)
    store.put(3, {"c": [np.arange(3.0)], "n": 1})
    assert store.get(3)["n"] == 1  # the client's next task in this round sees it …
    assert list(tmp_path.iterdir()) == []  # … but nothing is saved before the round ends
    store.on_round_end({"round": 1}, [])
    store.put(3, {"c": [np.arange(3.0) + 1], "n": 2})
    store.on_round_end({"round": 2}, [])
    assert FileStateStore(tmp_path).get(3)["n"] == 2
    older = RoundStateStore(tmp_path, upto=1).get(3)  # a checkpoint of round 1
    assert older["n"] == 1
    np.testing.assert_array_equal(older["c"][0], np.arange(3.0))
    assert RoundStateStore(tmp_path, upto=0).get(3) == {}
    store.put(3, {})  # a client that drops its state in round 3 …
    store.on_round_end({"round": 3}, [])
    assert RoundStateStore(tmp_path).get(3) == {}
    assert RoundStateStore(tmp_path, upto=2).get(3)["n"] == 2  # … still resumes from round 2


def test_client_state_in_the_older_layout_is_refused_not_dropped(tmp_path: Path) -> None:
    np.savez(tmp_path / "3.npz", x=np.zeros(2))
    with pytest.raises(ConfigError, match=r"older layout \(3\.npz …\).*--fresh"):
        RoundStateStore(tmp_path, upto=2)


@pytest.mark.slow
def test_sigkill_after_round_3_of_6_then_resume_equals_an_uninterrupted_run(tmp_path: Path) -> None:
    args = ["data.num_clients=20", "train.epochs=3", "run.rounds=6", "run.deterministic=true"]
    args += ["simulation.backend=process", "strategy.name=fedadam"]
    sets = [x for a in args for x in ("--set", a)]
    straight = run_experiment(
        config.load(None, [*args, f"run.output={tmp_path / 'straight'}"]), quiet=True
    )
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "pollinate.cli", "run", *sets, "--set", f"run.output={out}", "-q"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def rounds_done() -> int:  # what a resume goes by: the last checkpoint's round
        try:
            return int(load_checkpoint(out / "checkpoints/last.npz")[1]["round"])
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
            return 0

    try:
        wait_until(lambda: rounds_done() >= 3, "round 3", timeout=240, poll_s=0.05, alive=(proc,))
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=patience(60))
    done = rounds_done()
    assert 3 <= done < 6, f"the kill landed after round {done}"
    resumed = subprocess.run(cmd[:-1], capture_output=True, text=True, timeout=patience(600))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming after round {done}" in resumed.stderr
    final, meta = load_checkpoint(out / "checkpoints/last.npz")
    assert meta["round"] == 6
    _same(straight.arrays, final)


@pytest.mark.slow
def test_sigterm_leaves_plots_and_report(tmp_path: Path) -> None:
    out = tmp_path / "run"
    sets = ["--set", "run.rounds=200", "--set", "simulation.backend=sequential"]
    cmd = [sys.executable, "-m", "pollinate.cli", "run", *sets, "--set", f"run.output={out}"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        history = out / "history.json"
        wait_until(history.is_file, "round 1", timeout=120, poll_s=0.05, alive=(proc,))
    finally:
        proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=patience(120))
    assert proc.returncode == 130, err[-2000:]
    assert (out / "report.html").is_file() and (out / "accuracy.png").is_file()
