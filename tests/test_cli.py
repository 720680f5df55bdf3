"""The command line, run as a user runs it: a real process, real data, real files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pollinate.callbacks import load_checkpoint
from pollinate.cli import main

ROOT = Path(__file__).resolve().parents[1]


def pollinate(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run(
        [sys.executable, "-m", "pollinate.cli", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.mark.slow
def test_default_run_reaches_90_percent_and_writes_its_outputs(tmp_path):
    proc = pollinate("run", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    out = tmp_path / "runs" / "digits"
    history = json.loads((out / "history.json").read_text())
    assert len(history["rounds"]) == 10
    assert history["rounds"][-1]["centralized"]["accuracy"] >= 0.90
    assert history["config"]["data"]["dataset"] == "digits"
    for name in (
        "metrics.csv",
        "config.json",
        "report.html",
        "accuracy.png",
        "loss.png",
        "client_accuracy.png",
        "partitions.png",
    ):
        assert (out / name).is_file(), name
    # the printed summary says where the plots and report are
    assert "report.html" in proc.stdout and "accuracy.png" in proc.stdout
    # progress lines (not a terminal) name each round
    assert "round 10/10" in proc.stderr
    last, meta = load_checkpoint(out / "checkpoints" / "last.npz")
    best, best_meta = load_checkpoint(out / "checkpoints" / "best.npz")
    assert meta["round"] == 10 and best_meta["round"] <= 10
    assert [a.shape for a in last] == [a.shape for a in best]
    assert all(np.isfinite(a).all() for a in last)


def test_run_with_overrides_quiet(tmp_path, capsys):
    out = tmp_path / "r"
    code = main(
        [
            "run",
            "--quiet",
            "--set",
            "run.rounds=2",
            "--set",
            "simulation.backend=sequential",
            "--set",
            f"run.output={out}",
            "--set",
            "data.num_clients=3",
            "--set",
            "train.epochs=1",
        ]
    )
    assert code == 0
    captured = capsys.readouterr()
    assert captured.out == "" and "round" not in captured.err
    history = json.loads((out / "history.json").read_text())
    assert [r["round"] for r in history["rounds"]] == [1, 2]
    assert history["rounds"][0]["train"]["clients"] == 3
    lines = (out / "metrics.csv").read_text().splitlines()
    assert len(lines) == 3 and lines[0].startswith("round,")


def test_bad_config_exits_2_with_the_key(tmp_path, capsys):
    assert main(["run", "--set", "simulation.backend=gpu"]) == 2
    assert "simulation.backend" in capsys.readouterr().err
    bad = tmp_path / "bad.toml"
    bad.write_text("[train]\noptimiser = 'sgd'\n")
    assert main(["run", str(bad)]) == 2
    assert "did you mean 'optimizer'" in capsys.readouterr().err


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--grpc-option", "bdp_probe=0"], "--grpc-option 'bdp_probe=0'"),
        (["--grpc-option", "grpc.http2.bdp_probe"], "KEY=VALUE"),
        (["--heartbeat-s", "0"], "--heartbeat-s must be > 0"),
        (["--result-memory-mib", "0"], "--result-memory-mib must be >= 1"),
    ],
)
def test_bad_server_transport_flags_exit_2_before_listening(tmp_path, capsys, flags, message):
    args = ["server", "--insecure", "--address", "127.0.0.1:0", *flags]
    assert main(args) == 2
    assert message in capsys.readouterr().err


def test_missing_dataset_exits_1_with_a_hint(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("POLLINATE_DATA", str(tmp_path))
    code = main(["run", "--set", "data.dataset=npz:" + str(tmp_path / "none.npz")])
    assert code in (1, 2)
    assert "none.npz" in capsys.readouterr().err


def test_partition_command_prints_sizes_and_plots(tmp_path, capsys):
    code = main(
        [
            "partition",
            str(ROOT / "examples" / "digits-noniid.toml"),
            "--set",
            f"run.output={tmp_path}",
        ]
    )
    assert code == 0
    out = capsys.readouterr().out
    assert "20 clients" in out and "dirichlet" in out
    assert (tmp_path / "partitions.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_command(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert "history.json" in capsys.readouterr().err
    out = tmp_path / "r"
    main(
        [
            "run",
            "-q",
            "--set",
            "run.rounds=1",
            "--set",
            "simulation.backend=sequential",
            "--set",
            f"run.output={out}",
            "--set",
            "train.epochs=1",
        ]
    )
    (out / "report.html").unlink()
    assert main(["report", str(out)]) == 0
    html = (out / "report.html").read_text()
    assert "data:image/png;base64," in html and "digits" in html
