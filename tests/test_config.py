"""The run config: defaults, TOML files, --set overrides, and errors that name the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from pollinate import config
from pollinate.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def test_defaults_are_the_offline_digits_experiment():
    cfg = config.load()
    assert cfg.data.dataset == "digits"
    assert cfg.simulation.backend == "process"
    assert cfg.output_dir == Path("runs/digits")


def test_file_and_overrides(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('[run]\nname = "x"\nrounds = 4\n[model]\nhidden = [8, 4]\n')
    cfg = config.load(path, ["run.rounds=2", "train.optimizer=adam", "train.lr=0.5"])
    assert (cfg.run.name, cfg.run.rounds) == ("x", 2)
    assert cfg.model.hidden == [8, 4]
    assert cfg.train.optimizer == "adam" and cfg.train.lr == 0.5


@pytest.mark.parametrize(
    "name",
    [
        "fashion-mnist-blog.toml",
        "digits-noniid.toml",
        "digits.toml",
        "digits-fedadam.toml",
        "digits-scaffold.toml",
        "digits-qfedavg.toml",
        "digits-robust.toml",
    ],
)
def test_examples_are_valid(name):
    cfg = config.load(ROOT / "examples" / name)
    assert cfg.run.rounds > 0


def test_blog_example_matches_the_seed_experiment():
    cfg = config.load(ROOT / "examples" / "fashion-mnist-blog.toml")
    assert (cfg.data.num_clients, cfg.run.rounds, cfg.train.epochs) == (5, 7, 5)
    assert (cfg.train.batch_size, cfg.train.optimizer, cfg.train.lr) == (32, "sgd", 0.01)
    assert cfg.model.name == "cnn" and cfg.strategy.fraction_train == 1.0


def test_int_where_float_expected_is_accepted():
    assert config.load(overrides=["train.lr=1"]).train.lr == 1.0


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("run.round=3", "did you mean 'rounds'"),
        ("runs.rounds=3", "unknown config section"),
        ("simulation.backend=gpu", "choose one of: sequential, process, ray"),
        ("data.partition=random", "choose one of: iid, dirichlet, shards, quantity"),
        ("train.lr=-1", "train.lr must be > 0"),
        ("run.rounds=2.5", "run.rounds must be an integer"),
        ("run.rounds=true", "run.rounds must be an integer"),
        ("train.local_evaluation=1", "true or false"),
        ("strategy.fraction_train=1.5", "between 0 and 1"),
        ("strategy.fraction_train=0", "no client would train"),
        ("data.client_test_fraction=1.0", "clients need training data"),
        ("strategy.min_available_clients=50", "exceeds data.num_clients"),
        ("model.hidden=[0]", "list of positive integers"),
        ("model.hidden=64", "list of positive integers"),
        ("train.lr=nan", "train.lr must be a finite number, got nan"),
        ("train.momentum=inf", "train.momentum must be a finite number, got inf"),
        ("strategy.round_timeout_s=-inf", "round_timeout_s must be a finite number"),
        ("privacy.clip=nan", "privacy.clip must be a finite number"),
    ],
)
def test_bad_values_are_named(override, message):
    with pytest.raises(ConfigError, match=message):
        config.load(overrides=[override])


def test_bad_override_syntax():
    with pytest.raises(ConfigError, match="section.key=value"):
        config.load(overrides=["rounds=3"])


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        config.load(tmp_path / "missing.toml")
    broken = tmp_path / "broken.toml"
    broken.write_text("[run\nname=")
    with pytest.raises(ConfigError, match="not valid TOML"):
        config.load(broken)
    not_table = tmp_path / "t.toml"
    not_table.write_text("run = 3\n")
    with pytest.raises(ConfigError, match="must be a table"):
        config.load(not_table)


def test_string_override_without_quotes():
    assert config.load(overrides=["run.name=my run"]).run.name == "my run"
