"""[attack] from a run config: who attacked is recorded, FedAvg is hurt, a robust aggregator
holds, and deployments refuse it."""

from __future__ import annotations

from pathlib import Path

import pytest

from pollinate import config
from pollinate.deploy import config_client_fn
from pollinate.errors import ConfigError
from pollinate.experiment import run_experiment

BASE = [
    "simulation.backend=sequential",
    "data.num_clients=10",
    "train.epochs=1",
    "run.rounds=4",
    "run.deterministic=true",
    "strategy.norm_factor=0",  # the bounds would reject the attack: the aggregator must hold
]


def _run(tmp_path: Path, name: str, *extra: str):
    cfg = config.load(None, [*BASE, f"run.output={tmp_path / name}", *extra])
    return run_experiment(cfg, quiet=True)


def _accuracy(result) -> float:
    return float(result.history.rounds[-1]["centralized"]["accuracy"])


def test_sign_flip_breaks_fedavg_and_multikrum_holds(tmp_path: Path) -> None:
    attack = ["attack.kind=sign_flip", "attack.fraction=0.2", "attack.scale=4.0"]
    clean = _accuracy(_run(tmp_path, "clean"))
    fedavg = _run(tmp_path, "fedavg", *attack)
    krum = ["strategy.name=multikrum", "strategy.num_malicious=2", "strategy.min_train_clients=7"]
    robust = _accuracy(_run(tmp_path, "krum", *attack, *krum))
    record = fedavg.history.rounds[0]
    attacked = {c for c, e in record["clients"].items() if e["train"].get("attack")}
    assert len(attacked) == 2  # 20% of 10, recorded per client
    assert _accuracy(fedavg) < 0.5 * clean
    assert robust >= 0.9 * clean


def test_label_flip_marks_the_attackers(tmp_path: Path) -> None:
    result = _run(tmp_path, "flip", "attack.kind=label_flip", "attack.clients=[0, 3]")
    marks = {c: e["train"].get("attack") for c, e in result.history.rounds[0]["clients"].items()}
    assert {c for c, m in marks.items() if m} == {"0", "3"}
    assert marks["0"] == "label_flip"


def test_deployments_and_secure_aggregation_refuse_an_attack(tmp_path: Path) -> None:
    cfg = config.load(None, ["attack.kind=scale"])
    with pytest.raises(ConfigError, match="pollinate run only"):
        config_client_fn(cfg, 0)
    with pytest.raises(ConfigError, match="secure_aggregation"):
        config.load(None, ["attack.kind=scale", "secure_aggregation.enabled=true"])
    with pytest.raises(ConfigError, match="kind"):
        config.load(None, ["attack.kind=bogus"])
