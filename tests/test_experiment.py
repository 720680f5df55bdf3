"""Config-driven runs with real PyTorch training on digits, across backends."""

from __future__ import annotations

import numpy as np
import pytest

from pollinate import config
from pollinate.callbacks import load_checkpoint
from pollinate.experiment import run_experiment, train_config


def small(tmp_path, backend: str, *extra: str) -> config.RunConfig:
    return config.load(
        overrides=[
            "run.rounds=2",
            "data.num_clients=4",
            "train.epochs=1",
            "strategy.fraction_train=0.75",
            f"simulation.backend={backend}",
            f"run.output={tmp_path / backend}",
            *extra,
        ]
    )


def comparable(history: dict) -> list[dict]:
    """The history without wall-clock times."""
    return [{k: v for k, v in r.items() if k != "wall_s"} for r in history["rounds"]]


@pytest.mark.slow
def test_process_equals_sequential(tmp_path):
    """Same seed and config: the same history on both backends, bit-identical when deterministic."""
    runs = {}
    for backend in ("sequential", "process"):
        cfg = small(tmp_path, backend, "run.deterministic=true")
        runs[backend] = run_experiment(cfg, quiet=True)
    seq, proc = runs["sequential"], runs["process"]
    assert comparable(seq.history.to_dict()) == comparable(proc.history.to_dict())
    for a, b in zip(seq.arrays, proc.arrays):
        np.testing.assert_array_equal(a, b)
    saved, meta = load_checkpoint(tmp_path / "process" / "checkpoints" / "last.npz")
    assert meta["round"] == 2
    for a, b in zip(saved, proc.arrays):
        np.testing.assert_array_equal(a, b)


@pytest.mark.slow
def test_streaming_aggregation_matches_closely(tmp_path):
    """Without deterministic mode results fold in completion order: equal up to float rounding."""
    seq = run_experiment(small(tmp_path, "sequential"), quiet=True).history
    proc = run_experiment(small(tmp_path, "process"), quiet=True).history
    for a, b in zip(seq.rounds, proc.rounds):
        assert a["train"]["clients"] == b["train"]["clients"] == 3
        assert set(a["clients"]) == set(b["clients"])  # the same clients were sampled
        assert a["centralized"]["accuracy"] == pytest.approx(b["centralized"]["accuracy"], abs=0.01)


def test_sampling_follows_fraction_and_records_per_client(tmp_path):
    result = run_experiment(small(tmp_path, "sequential"), quiet=True)
    for record in result.history.rounds:
        assert record["train"]["clients"] == 3
        trained = [c for c in record["clients"].values() if "train" in c]
        assert len(trained) == 3
        for entry in trained:
            assert 0.0 <= entry["train"]["local_accuracy"] <= 1.0
            assert entry["num_examples"] > 0
        assert record["federated"]["clients"] == 4


def test_user_model_by_import_path(tmp_path, monkeypatch):
    pkg = tmp_path / "mymodels.py"
    pkg.write_text(
        "import torch.nn as nn\n"
        "def tiny(input_shape, num_classes):\n"
        "    return nn.Sequential(nn.Flatten(), nn.Linear(64, num_classes))\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = small(tmp_path, "sequential", "model.name=mymodels:tiny")
    result = run_experiment(cfg, quiet=True)
    assert [a.shape for a in result.arrays] == [(10, 64), (10,)]


def test_adam_ignores_sgd_momentum():
    cfg = config.load(overrides=["train.optimizer=adam"])
    assert "momentum" not in train_config(cfg)
    assert train_config(config.load())["momentum"] == 0.9


@pytest.mark.slow
def test_cnn_process_equals_sequential(tmp_path):
    """Image batches get one memory layout on every backend, so CNN runs match bit for bit."""
    rng = np.random.default_rng(0)
    path = tmp_path / "tiny.npz"
    np.savez(
        path,
        x_train=rng.integers(0, 255, (160, 28, 28), dtype=np.uint8),
        y_train=rng.integers(0, 10, 160),
        x_test=rng.integers(0, 255, (40, 28, 28), dtype=np.uint8),
        y_test=rng.integers(0, 10, 40),
    )
    models = {}
    for backend in ("sequential", "process"):
        cfg = small(
            tmp_path,
            backend,
            f"data.dataset=npz:{path}",
            "model.name=cnn",
            "run.deterministic=true",
            "data.num_clients=2",
            "strategy.fraction_train=1.0",
        )
        models[backend] = run_experiment(cfg, quiet=True).arrays
    for a, b in zip(models["sequential"], models["process"]):
        np.testing.assert_array_equal(a, b)


def test_sequential_backend_restores_torch_threads(tmp_path):
    import torch

    before = torch.get_num_threads()
    run_experiment(small(tmp_path, "sequential", "simulation.threads_per_worker=1"), quiet=True)
    assert torch.get_num_threads() == before
