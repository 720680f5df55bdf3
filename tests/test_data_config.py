"""[data] to clients' data: every partition by config, `pollinate partition` for each, and the
build-time checks (natural partitions, client test sets too small to evaluate)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest

from pollinate import config
from pollinate.cli import main
from pollinate.data import (
    Exponential,
    InnerDirichlet,
    Linear,
    Natural,
    Pathological,
    Square,
    dataset_from_config,
    federated_from_config,
    partitioner_from_config,
)
from pollinate.errors import ConfigError, DataError
from pollinate.experiment import build_data, run_experiment

NEW_PARTITIONS = ["pathological", "inner_dirichlet", "linear", "square", "exponential"]


def data_section(*overrides: str) -> config.DataSection:
    return config.load(overrides=list(overrides)).data


def test_each_partition_key_builds_its_partitioner() -> None:
    assert partitioner_from_config(
        data_section("data.partition=pathological", "data.classes_per_client=3")
    ) == Pathological(3)
    assert partitioner_from_config(
        data_section("data.partition=inner_dirichlet", "data.alpha=0.3")
    ) == InnerDirichlet(0.3)
    assert partitioner_from_config(data_section("data.partition=linear")) == Linear()
    assert partitioner_from_config(data_section("data.partition=square")) == Square()
    assert partitioner_from_config(data_section("data.partition=exponential")) == Exponential()


@pytest.mark.parametrize("partition", NEW_PARTITIONS)
def test_partition_command_shows_every_new_partitioner(partition, tmp_path, capsys) -> None:
    clients = 6 if partition == "exponential" else 10
    args = [f"data.partition={partition}", f"data.num_clients={clients}", f"run.output={tmp_path}"]
    assert main(["partition", *sum((["--set", a] for a in args), [])]) == 0
    out = capsys.readouterr().out
    assert f"digits: {clients} clients, partition {partition}" in out
    rows = [line.split() for line in out.splitlines() if line.split()[:1] == ["0"]]
    assert len(rows[0]) == 2 + 10  # client, examples, 10 label counts
    assert (tmp_path / "partitions.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    fed = build_data(config.load(overrides=args))
    sizes = fed.partition.sizes()
    assert fed.num_clients == clients and sizes.sum() <= 1438 and sizes.min() >= 1
    if partition == "pathological":
        assert (fed.label_counts() > 0).sum(axis=1).tolist() == [2] * clients
    if partition in ("linear", "square", "exponential"):
        assert np.all(np.diff(sizes) >= 0) and sizes.sum() == 1438


def writers_npz(path: Path, writers: int = 6, per_writer: int = 20) -> Path:
    rng = np.random.default_rng(0)
    n = writers * per_writer
    np.savez(
        path,
        x_train=rng.integers(0, 256, (n, 8, 8), dtype=np.uint8),
        y_train=np.arange(n) % 10,
        x_test=rng.integers(0, 256, (10, 8, 8), dtype=np.uint8),
        y_test=np.arange(10),
        writer_id_train=np.repeat(np.arange(100, 100 + writers), per_writer),
    )
    return path


def test_natural_partition_of_an_npz_column_by_command(tmp_path, capsys) -> None:
    npz = writers_npz(tmp_path / "w.npz")
    sets = [
        f"data.dataset=npz:{npz}",
        "data.partition=natural",
        "data.partition_by=writer_id",
        "data.num_clients=6",
        f"run.output={tmp_path / 'out'}",
    ]
    assert main(["partition", *sum((["--set", s] for s in sets), [])]) == 0
    assert "npz" in capsys.readouterr().out
    fed = build_data(config.load(overrides=sets))
    assert fed.partition.sizes().tolist() == [20] * 6
    data = config.load(overrides=sets).data
    assert isinstance(partitioner_from_config(data, dataset_from_config(data)), Natural)
    wrong = [*sets[:-2], "data.num_clients=4"]
    with pytest.raises(DataError, match="the data hold 6 of them .* set data.num_clients = 6"):
        build_data(config.load(overrides=wrong))


@pytest.mark.parametrize(
    ("sets", "message"),
    [
        (["data.partition=natural"], "needs data.partition_by"),
        (
            ["data.partition=natural", "data.partition_by=writer"],
            "'writer' is not a column of 'digits'.*hf:, hf-disk:.*'writer_train'",
        ),
        (["data.partition_by=writer"], "is for partition = 'natural'"),
    ],
)
def test_natural_partition_errors_name_the_fix(sets, message) -> None:
    with pytest.raises(ConfigError, match=message):
        build_data(config.load(overrides=sets))


def test_config_accepts_the_new_keys_and_a_partition_function() -> None:
    cfg = config.load(
        overrides=[
            "data.partition=mymod:split",
            'data.feature_columns=["a", "b"]',
            "data.label_column=y",
            "data.test_fraction=0.3",
        ]
    )
    assert cfg.data.partition == "mymod:split" and cfg.data.feature_columns == ["a", "b"]
    with pytest.raises(ConfigError, match="choose one of: iid, .*, natural or 'package.module"):
        config.load(overrides=["data.partition=bogus"])
    with pytest.raises(ConfigError, match="data.feature_columns must be a list of names"):
        config.load(overrides=["data.feature_columns=[1]"])
    with pytest.raises(ConfigError, match="data.classes_per_client must be > 0"):
        config.load(overrides=["data.classes_per_client=0"])
    with pytest.raises(ConfigError, match="data.test_fraction must be between 0 and 1"):
        config.load(overrides=["data.test_fraction=1.5"])


def test_a_users_partition_function_runs_from_the_config(tmp_path, monkeypatch) -> None:
    (tmp_path / "h4_splits.py").write_text(
        "import numpy as np\n"
        "def halves(labels, num_clients, rng):\n"
        "    order = rng.permutation(len(labels))\n"
        "    return np.array_split(order, num_clients)\n"
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = config.load(overrides=["data.partition=h4_splits:halves", "data.num_clients=2"])
    fed = build_data(cfg)
    assert fed.partition.sizes().tolist() == [719, 719]


# --- client test sets too small for federated evaluation -----------------------------------


def test_thousand_clients_on_digits_warn_that_federated_evaluation_is_off(caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="pollinate"):
        fed = federated_from_config(data_section("data.num_clients=1000"), seed=0)
    assert fed.num_clients == 1000
    # 1,438 examples: clients of 1 or 2; round(n x 0.1) >= 1 needs n >= 6, so 1438 // 6 = 239
    assert "federated evaluation is off: 1000 of 1000 clients hold no test examples" in caplog.text
    assert "0 for n < 6, and these clients hold 1 to 2 examples" in caplog.text
    assert "an even split of 1438 examples allows at most 239)" in caplog.text


def test_some_clients_without_test_examples_are_named_with_both_fixes(caplog) -> None:
    # linear sizes over 30 clients: client 0 gets floor(1438 / 465) = 3 examples, client 1 gets 6
    with caplog.at_level(logging.WARNING, logger="pollinate"):
        fed = federated_from_config(
            data_section("data.partition=linear", "data.num_clients=30"), seed=0
        )
    assert fed.partition.sizes()[:2].tolist() == [3, 6]
    assert "fails on some clients: 1 of 30 clients hold no test examples" in caplog.text
    assert "these clients hold 3 examples" in caplog.text
    assert "or raise data.client_test_fraction above 0.17" in caplog.text


def test_no_warning_when_every_client_can_evaluate_or_none_should(caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="pollinate"):
        federated_from_config(data_section("data.num_clients=200"), seed=0)
        federated_from_config(
            data_section("data.num_clients=1000", "data.client_test_fraction=0"), seed=0
        )
    assert "test examples" not in caplog.text


def test_federated_evaluation_is_really_off_when_no_client_holds_test_data(tmp_path, caplog):
    """The warning says it is off: no client is asked to evaluate, none fails doing so."""
    sets = ["data.num_clients=1000", "strategy.fraction_train=0.01", "run.rounds=1"]
    sets += ["train.epochs=1", "simulation.backend=sequential", f"run.output={tmp_path}"]
    with caplog.at_level(logging.WARNING, logger="pollinate"):
        result = run_experiment(config.load(overrides=sets), quiet=True)
    assert "federated evaluation is off" in caplog.text
    assert "failed in evaluate" not in caplog.text
    [record] = result.history.rounds
    assert "federated" not in record and "centralized" in record
    assert not record.get("failures")
