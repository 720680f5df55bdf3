"""[privacy] in a run config: DP runs end to end on digits, the budget stops a run cleanly."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pollinate import config
from pollinate.callbacks import headline, load_checkpoint, short_headline
from pollinate.errors import ConfigError
from pollinate.experiment import build_strategy, run_experiment
from pollinate.privacy import (
    CentralDP,
    LocalDPLedger,
    PrivacyAccountant,
    PrivacyError,
    local_epsilon,
)
from tests.waiting import patience


def small(tmp_path, *extra: str) -> config.RunConfig:
    return config.load(
        overrides=[
            "run.rounds=3",
            "data.num_clients=4",
            "train.epochs=1",
            "simulation.backend=sequential",
            f"run.output={tmp_path / 'run'}",
            *extra,
        ]
    )


def _history(tmp_path) -> dict:
    return json.loads((tmp_path / "run" / "history.json").read_text())


def test_central_dp_run_writes_privacy_to_history(tmp_path):
    cfg = small(tmp_path, "privacy.mode=central", "privacy.noise_multiplier=0.8")
    result = run_experiment(cfg, quiet=True)
    rounds = _history(tmp_path)["rounds"]
    assert len(rounds) == 3
    accountant = PrivacyAccountant(0.8, delta=1e-5, sampling_probability=1.0)
    for r, record in enumerate(rounds, start=1):
        privacy = record["privacy"]
        assert privacy["epsilon"] == pytest.approx(accountant.epsilon_after(r))
        assert privacy["delta"] == 1e-5 and privacy["accountant"] == "pld"
        assert privacy["noise_multiplier"] == 0.8 and privacy["clip"] == 1.0
        assert record["train"]["clients"] == 4  # q = fraction_train = 1
    assert result.history.rounds[-1]["privacy"] == rounds[-1]["privacy"]
    header = (tmp_path / "run" / "metrics.csv").read_text().splitlines()[0]
    assert "privacy_epsilon" in header


def test_central_dp_clipping_on_clients_with_adaptive_clip(tmp_path):
    cfg = small(
        tmp_path,
        "privacy.mode=central",
        "privacy.clip_on=client",
        "privacy.adaptive=true",
        "privacy.noise_multiplier=0.2",
        "privacy.sampling=fixed",
        "privacy.accountant=rdp",
        "strategy.fraction_train=0.75",
        "simulation.backend=process",  # the client wrapper travels to worker processes
    )
    run_experiment(cfg, quiet=True)
    rounds = _history(tmp_path)["rounds"]
    assert [r["train"]["clients"] for r in rounds] == [3, 3, 3]
    assert [r["train"]["rejected"] for r in rounds] == [0, 0, 0]  # every update was clipped
    clips = [r["privacy"]["clip"] for r in rounds]
    assert clips[0] == 0.1  # Andrew et al.'s initial clip, the default when adaptive
    assert clips[1] == rounds[0]["privacy"]["next_clip"] and len(set(clips)) == 3
    accountant = PrivacyAccountant(0.2, delta=1e-5, sample=(3, 4), accountant="rdp")
    assert rounds[-1]["privacy"]["epsilon"] == pytest.approx(accountant.epsilon_after(3))
    assert rounds[-1]["privacy"]["sampling"] == "fixed"


def test_target_epsilon_is_met(tmp_path):
    cfg = small(tmp_path, "privacy.mode=central", "privacy.target_epsilon=30")
    run_experiment(cfg, quiet=True)
    final = _history(tmp_path)["rounds"][-1]["privacy"]
    assert final["epsilon"] <= 30 and final["epsilon"] == pytest.approx(30, rel=0.02)


def test_budget_stops_the_run_cleanly(tmp_path, caplog):
    accountant = PrivacyAccountant(0.8, delta=1e-5, sampling_probability=1.0)
    budget = (accountant.epsilon_after(2) + accountant.epsilon_after(3)) / 2
    cfg = small(
        tmp_path,
        "run.rounds=4",
        "privacy.mode=central",
        "privacy.noise_multiplier=0.8",
        f"privacy.max_epsilon={budget}",
    )
    with caplog.at_level(logging.WARNING, logger="pollinate"):
        result = run_experiment(cfg, quiet=True)
    assert len(result.history.rounds) == 2
    assert len(_history(tmp_path)["rounds"]) == 2
    saved, meta = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.npz")
    assert meta["round"] == 2
    assert all((a == b).all() for a, b in zip(saved, result.arrays))
    messages = " ".join(r.getMessage() for r in caplog.records)
    assert "allows 2 of the 4 rounds" in messages  # said up front
    assert "round 3 would raise ε" in messages and "stopped after round 2" in messages


def test_local_dp_run(tmp_path):
    cfg = small(
        tmp_path,
        "privacy.mode=local",
        "privacy.noise_multiplier=0.02",
        "privacy.clip=5.0",
        "run.deterministic=true",  # seeded noise: 0.54-0.73 after 3 rounds over seeds 0-5
    )
    run_experiment(cfg, quiet=True)
    rounds = _history(tmp_path)["rounds"]
    for r, record in enumerate(rounds, start=1):
        privacy = record["privacy"]
        assert privacy["mode"] == "local"
        assert privacy["epsilon"] == pytest.approx(local_epsilon(0.02, 1e-5, r))
        assert privacy["epsilon_round"] == pytest.approx(local_epsilon(0.02, 1e-5, 1))
        assert record["train"]["rejected"] == 0
        for client in record["clients"].values():
            train = client["train"]
            assert train["dp_noise_multiplier"] == 0.02 and train["dp_releases"] == r
            assert "loss" not in train  # local DP sends nothing else in the clear
    assert rounds[-1]["centralized"]["accuracy"] > 0.4  # little noise: it still learns


def test_progress_shows_epsilon():
    record = {
        "round": 1,
        "centralized": {"accuracy": 0.9},
        "train": {"clients": 3},
        "privacy": {"epsilon": 1.2345, "delta": 1e-5},
    }
    assert short_headline(record) == "acc 0.900 ε 1.23"
    assert headline(record).endswith("3 trained, ε 1.23")
    assert short_headline({**record, "privacy": {"epsilon": float("inf")}}) == "acc 0.900 ε inf"
    plain = {k: v for k, v in record.items() if k != "privacy"}
    assert "ε" not in headline(plain) and short_headline(plain) == "acc 0.900"


def test_privacy_none_changes_nothing(tmp_path):
    cfg = small(tmp_path)
    assert cfg.privacy.mode == "none"
    assert type(build_strategy(cfg, None)).__name__ == "FedAvg"
    assert isinstance(build_strategy(small(tmp_path, "privacy.mode=central"), None), CentralDP)
    assert isinstance(build_strategy(small(tmp_path, "privacy.mode=local"), None), LocalDPLedger)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["privacy.mode=federated"], "privacy.mode = 'federated' is not allowed"),
        (["privacy.mode=central", "privacy.clip=0"], "privacy.clip must be > 0"),
        (["privacy.mode=central", "privacy.delta=1.5"], "privacy.delta must be < 1"),
        (["privacy.mode=central", "privacy.noise_multiplier=0"], "adds no noise"),
        (["privacy.mode=central", "privacy.noise_multiplier=-1"], "must be >= 0"),
        (["privacy.mode=central", "privacy.sampling=fixed"], "needs privacy.accountant = 'rdp'"),
        (["privacy.mode=local", "privacy.adaptive=true"], "mode = 'central' only"),
        (
            ["privacy.mode=central", "privacy.noise_multiplier=1", "privacy.target_epsilon=3"],
            "not both",
        ),
        (["privacy.target_quantile=1.0", "privacy.mode=central"], "strictly between 0 and 1"),
        (["privacy.clip_on=edge"], "choose one of: server, client"),
        (["privacy.accountant=moments"], "choose one of: pld, rdp"),
        (["privacy.noise_multplier=1"], "did you mean 'noise_multiplier'"),
        (
            ["privacy.mode=central", "privacy.target_epsilon=5", "privacy.max_epsilon=2"],
            "exceeds privacy.max_epsilon",
        ),
    ],
)
def test_bad_privacy_configs(tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        small(tmp_path, *overrides)


def test_infeasible_adaptive_clipping_is_explained(tmp_path):
    cfg = small(tmp_path, "privacy.mode=central", "privacy.adaptive=true")
    with pytest.raises(ConfigError, match="needs count noise"):
        build_strategy(cfg, None)  # z = 1 with 4 clients a round: σ_b = 0.2 is too little


@pytest.mark.slow
def test_dp_fedavg_through_the_cli(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pollinate.cli",
            "run",
            "--set",
            "run.rounds=3",
            "--set",
            "data.num_clients=4",
            "--set",
            "train.epochs=1",
            "--set",
            "simulation.backend=sequential",
            "--set",
            "privacy.mode=central",
            "--set",
            "privacy.noise_multiplier=0.8",
            "--set",
            "privacy.max_epsilon=10",
            "--set",
            f"run.output={tmp_path / 'run'}",
        ],
        cwd=tmp_path,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        capture_output=True,
        text=True,
        timeout=patience(300),
    )
    assert proc.returncode == 0, proc.stderr
    assert "round 1/3:" in proc.stderr and "ε " in proc.stderr  # progress shows ε
    assert "privacy budget: round 3 would raise ε" in proc.stderr
    assert "finished 2 rounds" in proc.stdout
    assert len(_history(tmp_path)["rounds"]) == 2


def test_secure_aggregation_run_matches_the_plain_run(tmp_path):
    plain = run_experiment(small(tmp_path / "plain", "run.deterministic=true"), quiet=True)
    secure = run_experiment(
        small(tmp_path, "run.deterministic=true", "secure_aggregation.enabled=true"), quiet=True
    )
    for a, b in zip(plain.arrays, secure.arrays):  # only quantization tells them apart
        assert a.shape == b.shape
        assert abs(a.astype(float) - b.astype(float)).max() < 1e-3
    rounds = _history(tmp_path)["rounds"]
    assert [r["train"]["clients"] for r in rounds] == [4, 4, 4]
    assert rounds[-1]["centralized"]["accuracy"] == pytest.approx(
        plain.history.rounds[-1]["centralized"]["accuracy"], abs=0.02
    )


@pytest.mark.slow
def test_secure_dp_fedavg_through_the_cli(tmp_path):
    sets = [
        "run.rounds=2",
        "data.num_clients=6",
        "train.epochs=1",
        "simulation.backend=process",
        "privacy.mode=central",
        "privacy.clip_on=client",
        "privacy.noise_multiplier=0.3",
        "secure_aggregation.enabled=true",
        "secure_aggregation.neighbours=4",
        "secure_aggregation.threshold=3",
        "run.deterministic=true",  # the clients' noise too: the same figures every time
        f"run.output={tmp_path / 'run'}",
    ]
    args = [a for s in sets for a in ("--set", s)]
    proc = subprocess.run(
        [sys.executable, "-m", "pollinate.cli", "run", *args],
        cwd=tmp_path,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        capture_output=True,
        text=True,
        timeout=patience(300),
    )
    assert proc.returncode == 0, proc.stderr
    rounds = _history(tmp_path)["rounds"]
    assert [r["train"]["clients"] for r in rounds] == [6, 6]
    assert rounds[-1]["privacy"]["noise_multiplier"] == 0.3
    assert rounds[-1]["centralized"]["accuracy"] > 0.15  # noised, but learning


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["privacy.mode=central", "privacy.clip_on=server"], "clip_on = 'client'"),
        (["secure_aggregation.quantization_bits=31"], "modulus"),
        (["secure_aggregation.threshold=0"], "threshold"),
    ],
)
def test_bad_secure_aggregation_configs(tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message):
        small(tmp_path, "secure_aggregation.enabled=true", *overrides)


def test_the_private_example_config_runs(tmp_path):
    cfg = config.load(
        Path(__file__).resolve().parents[1] / "examples" / "digits-private.toml",
        ["run.rounds=2", "simulation.backend=sequential", f"run.output={tmp_path / 'run'}"],
    )
    result = run_experiment(cfg, quiet=True)
    rounds = result.history.rounds
    assert all(5 <= r["train"]["clients"] <= 35 for r in rounds)  # Poisson, 20 expected
    assert rounds[-1]["privacy"]["epsilon"] > rounds[0]["privacy"]["epsilon"] > 0


def test_adaptive_clipping_resumes_from_the_last_recorded_clip(tmp_path):
    overrides = [
        "privacy.mode=central",
        "privacy.adaptive=true",
        "privacy.noise_multiplier=0.2",
        "privacy.sampling=fixed",
        "privacy.accountant=rdp",
        "strategy.fraction_train=0.75",
    ]
    result = run_experiment(small(tmp_path, *overrides), quiet=True)
    records = json.loads(json.dumps(result.history.rounds))
    resumed = build_strategy(small(tmp_path, *overrides), None)
    assert isinstance(resumed, CentralDP) and resumed.clip == 0.1
    resumed.restore(records)
    assert resumed.clip == records[-1]["privacy"]["next_clip"] != 0.1
    with pytest.raises(PrivacyError, match="next_clip"):
        resumed.restore([{"round": 1, "privacy": {}}])


def test_poisson_sampling_checks_the_modulus_against_likely_rounds_not_every_client(tmp_path):
    common = [
        "privacy.mode=central",
        "privacy.clip_on=client",
        "secure_aggregation.enabled=true",
        "data.num_clients=2000",
    ]
    small(tmp_path, *common, "strategy.fraction_train=0.01")  # ~20 per round: fine
    with pytest.raises(ConfigError, match="at most 1024 clients"):
        small(tmp_path, *common, "strategy.fraction_train=0.9")
