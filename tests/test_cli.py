"""The command line, run as a user runs it: a real process, real data, real files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from pollinate.callbacks import load_checkpoint
from pollinate.cli import main
from tests.waiting import patience

ROOT = Path(__file__).resolve().parents[1]


def pollinate(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run(
        [sys.executable, "-m", "pollinate.cli", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=patience(600),
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
        (["--max-corrupt-uploads", "0"], "--max-corrupt-uploads must be >= 1"),
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


# --- the first hour: what a new user meets -------------------------------------------------

# What the ``pollinate`` console script does: its folder, not the current one, is sys.path[0]
AS_CONSOLE_SCRIPT = (
    "import sys; sys.path[:] = [p for p in sys.path if p not in ('', '.')]; "
    "from pollinate.cli import main; sys.exit(main())"
)


def without(package: str) -> str:
    """Code that runs the console script as if ``package`` were not installed."""
    return (
        textwrap.dedent(
            f"""
        import sys

        class NotInstalled:
            def find_spec(self, name, path=None, target=None):
                if name == {package!r} or name.startswith({package + "."!r}):
                    raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)

        sys.meta_path.insert(0, NotInstalled())
        """
        )
        + AS_CONSOLE_SCRIPT
    )


WITHOUT_TORCH = without("torch")
INSTALL_TORCH = (
    "pip install 'pollinate[torch]' (or, in a clone of the repository: pip install -e '.[torch]')"
)


def python_c(code: str, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        cwd=cwd,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        capture_output=True,
        text=True,
        timeout=patience(600),
    )


def test_version_prints_the_package_version(tmp_path):
    from pollinate import __version__

    proc = pollinate("--version", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"pollinate {__version__}"


def test_missing_torch_ends_with_both_install_lines_and_no_traceback(tmp_path):
    proc = python_c(WITHOUT_TORCH, "run", "--set", "run.rounds=1", cwd=tmp_path)
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip() == f"error: torch is not installed; install it with: {INSTALL_TORCH}"
    # commands that need no torch still work without it
    proc = python_c(WITHOUT_TORCH, "partition", "--set", "data.num_clients=3", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "3 clients" in proc.stdout


USER_CODE = {
    "h12models.py": (
        "from torch import nn\n\n"
        "def small(input_shape, num_classes):\n"
        "    return nn.Sequential(nn.Flatten(), nn.Linear(64, num_classes))\n"
    ),
    "h12split.py": (
        "import numpy as np\n\n"
        "def by_parity(labels, num_clients, rng):\n"
        "    return [np.flatnonzero(np.arange(len(labels)) % num_clients == i)\n"
        "            for i in range(num_clients)]\n"
    ),
    "h12strategy.py": (
        "import pollinate\n\n"
        "def plain(**kw):\n"
        "    return pollinate.FedAvg(**kw)\n\n"
        "def needs_ray(**kw):\n"
        "    import ray\n"
        "    return pollinate.FedAvg(**kw)\n"
    ),
}


@pytest.mark.slow
def test_user_code_in_the_current_folder_is_found_by_the_console_script(tmp_path):
    for name, text in USER_CODE.items():
        (tmp_path / name).write_text(text)
    common = ["--set", "data.num_clients=2", "--set", "run.rounds=1", "--set", "train.epochs=1"]
    proc = python_c(
        AS_CONSOLE_SCRIPT,
        "run",
        "-q",
        *common,
        "--set",
        "model.name=h12models:small",
        "--set",
        "data.partition=h12split:by_parity",
        "--set",
        "strategy.name=h12strategy:plain",
        "--set",
        "simulation.workers=1",  # the model is built in a worker process: it finds it too
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    history = json.loads((tmp_path / "runs" / "digits" / "history.json").read_text())
    assert history["rounds"][0]["train"]["clients"] == 2
    last, _ = load_checkpoint(tmp_path / "runs" / "digits" / "checkpoints" / "last.npz")
    assert [a.shape for a in last] == [(10, 64), (10,)]  # h12models.small, not the default mlp
    # an optional package the user's code needs gets its install line, not a traceback
    proc = python_c(
        without("ray"),
        "run",
        *common,
        "--set",
        "strategy.name=h12strategy:needs_ray",
        "--set",
        "run.output=other",
        cwd=tmp_path,
    )
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "ray is not installed" in proc.stderr and "pip install -e '.[ray]'" in proc.stderr


ONE_QUERY = """
[run]
output = "answers"
[data]
dataset = "diabetes"
num_clients = 2
[simulation]
backend = "sequential"
[[query]]
name = "patients"
statistic = "count"
"""


@pytest.mark.slow  # two processes that import pandas and scikit-learn
def test_progress_is_shown_as_info_and_quiet_shows_errors_only(tmp_path):
    (tmp_path / "q.toml").write_text(ONE_QUERY)
    runs = [
        subprocess.Popen(
            [sys.executable, "-m", "pollinate.cli", "analyze", "q.toml", *flags],
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for flags in ([], ["-q"])
    ]
    (out, err), (quiet_out, quiet_err) = (p.communicate(timeout=patience(600)) for p in runs)
    assert [p.returncode for p in runs] == [0, 0], err + quiet_err
    assert "pollinate: query 1/1 patients: 442" in err.splitlines()  # INFO, without a level
    assert "WARNING" not in err
    assert quiet_err == "" and "442" in quiet_out


def test_keys_advice_names_the_flag_the_server_reads(tmp_path):
    proc = pollinate("keys", "certs", "0", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "pollinate server --certs certs reads it" in proc.stdout
    assert "--allow-list" not in proc.stdout
    assert (tmp_path / "certs" / "allow-list.txt").read_text().startswith("0 ")
    proc = pollinate("keys", "certs", "1", "--allow-list", "clients.txt", cwd=tmp_path)
    assert "pass it to pollinate server with --allow-list clients.txt" in proc.stdout
