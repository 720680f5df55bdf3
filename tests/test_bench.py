"""The benchmark scripts run as bench/README.md and bench/DEPLOY.md show, at the smallest sizes.

Only that they run and print their comparison: their figures are measurements, never checked.
The Fashion-MNIST workloads read random images of the real shapes (POLLINATE_DATA points at
them), so the test needs neither ../shared/data nor the network.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.test_datasets import fake_arrays
from tests.waiting import patience

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow

SCRIPTS = {  # script and arguments -> text its report must contain
    "w2_many_clients.py --rounds 1 --repeats 1": "W2 100 clients",
    "w3_population.py --rounds 1 --repeats 1 --no-memory": "W3 10000 clients",
    "deploy_throughput.py --mb 2 --repeats 1 --warmup 0": "all payloads came back with the SHA-256",
    "deploy_overhead.py --clients 3 --rounds 2 --params 1000": "network/simulation",
    "deploy_memory.py --clients 5 --rounds 1 --params 1000": "peak during the rounds",
    "deploy_latency.py --mb 1 --rtt-ms 0,20 --repeats 1": "BDP probing on (default)",
    "deploy_soak.py --rounds 20 --clients 4": "server RSS",
    "secagg_cost.py --clients 5 --length 100": "client SecAgg+ ms",
    "privacy_tradeoff.py --rounds 1": "|",
    "strategies_noniid.py --smoke": "| shards2 | fednova |",
    "strategies_robustness.py --smoke": "target",
    "aggregation_cost.py --smoke": "| 40 × 500 | bulyan (f=4) |",
    "conditions.py --smoke": "| fedbuff | ",
    "frameworks.py --smoke": "| jax-w2 (100 clients, mlp, 1 round(s)) | sequential |",
}


@pytest.fixture(scope="module")
def data_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder holding a fashion-mnist.npz of random images in the real shapes."""
    folder = tmp_path_factory.mktemp("data")
    np.savez(folder / "fashion-mnist.npz", **fake_arrays(0, n_train=60_000, n_test=10_000))
    return folder


@pytest.mark.parametrize("command", SCRIPTS)
def test_benchmark_script_runs(command: str, data_folder: Path) -> None:
    script, *args = command.split()
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / script), *args],
        cwd=REPO,
        env={**os.environ, "POLLINATE_DATA": str(data_folder)},
        capture_output=True,
        text=True,
        timeout=patience(300),
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert SCRIPTS[command] in proc.stdout, proc.stdout[-3000:]


def test_noniid_cnn_runs_and_merge_prints_the_saved_table(
    data_folder: Path, tmp_path: Path
) -> None:
    """``--model cnn`` trains the seed CNN; ``--merge`` rebuilds the table from ``--json`` files."""
    script = str(REPO / "bench" / "strategies_noniid.py")
    env = {**os.environ, "POLLINATE_DATA": str(data_folder)}
    saved = tmp_path / "cnn.json"
    run = subprocess.run(
        [sys.executable, script, "--smoke", "--model", "cnn", "--strategies", "fedavg,fedadam"]
        + ["--json", str(saved)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=patience(300),
    )
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    assert "per round, cnn, E = 1" in run.stdout, run.stdout[-3000:]
    merged = subprocess.run(
        [sys.executable, script, "--merge", str(saved)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=patience(60),
    )
    assert merged.returncode == 0, merged.stdout[-2000:] + merged.stderr[-3000:]
    assert f"{saved}: 4 runs, cnn, E = 1, 2 rounds, seeds run [0]" in merged.stdout
    assert "shards2: seeds [0]\n" in merged.stdout, merged.stdout
    rows = [line for line in run.stdout.splitlines() if line.startswith("| shards2 | fedadam |")]
    assert len(rows) == 1 and rows[0] in merged.stdout, (run.stdout, merged.stdout)
