"""Experiment trackers against the real MLflow, TensorBoard and W&B libraries, offline: what a
run logs is read back with each library's own reader and compared with the run's history."""

from __future__ import annotations

import json
import logging
import shutil
import struct
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from pollinate.callbacks import RunFolderWriter
from pollinate.cli import main
from pollinate.config import load
from pollinate.errors import ConfigError, MissingDependencyError, RoundFailedError
from pollinate.server import Callback, History, RunResult
from pollinate.simulation import simulate
from pollinate.strategy.fedavg import FedAvg
from pollinate.tracking import (
    ClientPanel,
    MLflowTracker,
    TensorBoardTracker,
    Tracker,
    WandbTracker,
    build_trackers,
    flatten_config,
    round_metrics,
)
from pollinate.tracking.base import require
from pollinate.types import Arrays
from tests.fakes import MeanClientFn, initial

CONFIG = {"run": {"name": "tracked", "rounds": 3}, "model": {"hidden": [64, 32]}}
PLOTS = {"accuracy.png", "loss.png", "client_accuracy.png"}


@pytest.fixture(autouse=True)
def offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No network and nothing written outside tmp_path, whatever the trackers do."""
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    monkeypatch.setenv("DO_NOT_TRACK", "true")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    for name in ("WANDB_DIR", "WANDB_DATA_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR"):
        monkeypatch.setenv(name, str(tmp_path / "wandb-home" / name.lower()))


@pytest.fixture(scope="session")
def empty_mlflow_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An empty MLflow database, made once: building its tables takes MLflow seconds."""
    from mlflow.tracking import MlflowClient

    path = tmp_path_factory.mktemp("mlflow") / "mlflow.db"
    MlflowClient(tracking_uri=f"sqlite:///{path}").search_experiments()
    return path


def mlflow_tracker(out: Path, template: Path, **kwargs: Any) -> MLflowTracker:
    """An MLflow tracker into ``out``, whose empty database is a copy of ``template``."""
    out.mkdir(parents=True, exist_ok=True)
    shutil.copy(template, out / "mlflow.db")
    return MLflowTracker(run_folder=out, **kwargs)


def _evaluate(arrays: Arrays) -> tuple[float, dict[str, float]]:
    """Centralized evaluation: the model's mean plus its round counter as the loss (a value
    that changes every round), and a made-up accuracy from it."""
    loss = float(arrays[0].mean()) + float(arrays[1].mean())
    return loss, {"accuracy": 1.0 / (1.0 + loss)}


def real_run(
    out: Path, tracker: Callback, rounds: int = 3, behaviour: dict[int, str] | None = None
) -> RunResult:
    """A short real run of 5 NumPy clients (sequential) with a run folder and ``tracker``."""
    history = History(config=CONFIG)
    strategy = FedAvg(
        min_train_clients=1, min_available_clients=1, min_evaluate_clients=1, evaluate_fn=_evaluate
    )
    return simulate(
        MeanClientFn(behaviour),
        num_clients=5,
        strategy=strategy,
        initial_arrays=initial(),
        rounds=rounds,
        backend="sequential",
        seed=3,
        history=history,
        callbacks=[RunFolderWriter(out, history), tracker],
    )


def expected_metrics(record: dict[str, Any]) -> dict[str, float]:
    """What a MeanClient round must log, spelled out from the record by hand."""
    expected = {"wall_s": record["wall_s"]}
    for section in ("centralized", "federated"):
        for key, value in record[section].items():
            expected[f"{section}/{key}"] = value
    for key in ("clients", "failures", "timeouts", "rejected"):
        expected[f"train/{key}"] = record["train"][key]
    for key, value in record["train"]["metrics"].items():
        expected[f"train/{key}"] = value
    for cid, entry in record["clients"].items():
        expected[f"client/{cid}/num_examples"] = entry["num_examples"]
        for task in ("train", "evaluate"):
            for key, value in entry.get(task, {}).items():
                expected[f"client/{cid}/{task}/{key}"] = value
    return {k: float(v) for k, v in expected.items()}


# -- reading back what each library stored ----------------------------------------------------


@dataclass
class Logged:
    """What a tracker left behind: metric → {step: value}, parameters, artifact paths."""

    metrics: dict[str, dict[int, float]] = field(default_factory=dict)
    params: dict[str, str] = field(default_factory=dict)
    artifacts: set[str] = field(default_factory=set)
    status: str = ""


def read_mlflow(run_folder: Path) -> Logged:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{(run_folder / 'mlflow.db').resolve()}")
    (experiment,) = [e for e in client.search_experiments() if e.name != "Default"]
    (run,) = client.search_runs([experiment.experiment_id])
    run_id = run.info.run_id
    logged = Logged(params=dict(run.data.params), status=run.info.status)
    for name in run.data.metrics:
        history = client.get_metric_history(run_id, name)
        logged.metrics[name] = {m.step: m.value for m in history}
    pending = [None]
    while pending:
        for item in client.list_artifacts(run_id, pending.pop()):
            (pending if item.is_dir else []).append(item.path)
            if not item.is_dir:
                logged.artifacts.add(item.path)
    return logged


def read_tensorboard(log_dir: Path) -> Logged:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    accumulator = EventAccumulator(str(log_dir), size_guidance={"images": 0, "scalars": 0})
    accumulator.Reload()
    tags = accumulator.Tags()
    logged = Logged()
    for tag in tags["scalars"]:
        logged.metrics[tag] = {e.step: e.value for e in accumulator.Scalars(tag)}
    for tag in tags["images"]:
        (image,) = accumulator.Images(tag)
        assert image.encoded_image_string.startswith(b"\x89PNG")
        logged.artifacts.add(tag)
    content = accumulator.SummaryMetadata("_hparams_/session_start_info").plugin_data.content
    hparams = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info.hparams
    for name, value in hparams.items():
        kind = value.WhichOneof("kind")  # numbers are stored as doubles
        number = value.number_value if kind == "number_value" else None
        text = str(int(number)) if number is not None and number.is_integer() else None
        logged.params[name] = text or str(getattr(value, kind))
    return logged


def _wandb_records(path: Path) -> list[bytes]:
    """The records of a W&B ``.wandb`` file: a 7-byte header (``:W&B``, magic, version), then
    LevelDB's log format, 32 KiB blocks of chunks (CRC32, length, type: 1 full, 2 first,
    3 middle, 4 last)."""
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    block, pos, parts, records = 32768, 7, b"", []
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # a block's tail too short for a chunk header is padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind == 1:
            records.append(chunk)
        elif kind == 2:
            parts = chunk
        elif kind == 3:
            parts += chunk
        elif kind == 4:
            records.append(parts + chunk)
    return records


def read_wandb(wandb_dir: Path) -> Logged:
    import wandb
    from wandb.proto import wandb_internal_pb2

    # run.finish() returns before W&B's service has written the whole file: wait for it
    wandb.teardown()
    (path,) = wandb_dir.glob("wandb/offline-run-*/run-*.wandb")
    logged = Logged()
    for raw in _wandb_records(path):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(raw)
        kind = record.WhichOneof("record_type")
        if kind == "history":
            step = record.history.step.num
            for item in record.history.item:
                key = item.key or "/".join(item.nested_key)
                if not key.startswith("_"):
                    logged.metrics.setdefault(key, {})[step] = json.loads(item.value_json)
        elif kind in ("run", "config"):
            updates = record.run.config.update if kind == "run" else record.config.update
            for update in updates:
                key = update.key or "/".join(update.nested_key)
                if not key.startswith("_"):
                    logged.params[key] = str(json.loads(update.value_json))
        elif kind == "artifact":
            logged.artifacts |= {entry.path for entry in record.artifact.manifest.contents}
        elif kind == "exit":
            logged.status = f"exit {record.exit.exit_code}"
    return logged


@dataclass
class Kind:
    make: Callable[..., Tracker]
    read: Callable[[Path], Logged]
    rel: float  # TensorBoard stores scalars as float32


KINDS = {
    "mlflow": Kind(mlflow_tracker, read_mlflow, 1e-12),
    "tensorboard": Kind(
        lambda out, _, **kw: TensorBoardTracker(run_folder=out, **kw),
        lambda out: read_tensorboard(out / "tensorboard"),
        1e-6,
    ),
    "wandb": Kind(lambda out, _, **kw: WandbTracker(run_folder=out, **kw), read_wandb, 1e-12),
}


# -- one contract, every tracker --------------------------------------------------------------


# MLflow builds a new database's tables in seconds (tens on a busy machine), once a session
@pytest.mark.parametrize(
    "name", [pytest.param("mlflow", marks=pytest.mark.slow), "tensorboard", "wandb"]
)
def test_a_real_run_is_logged_round_by_round(
    name: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    kind = KINDS[name]
    out = tmp_path / "run"
    template = request.getfixturevalue("empty_mlflow_db") if name == "mlflow" else None
    result = real_run(out, kind.make(out, template, config=CONFIG, max_clients_logged=3))
    history = result.history
    logged = kind.read(out)

    for record in history.rounds:
        expected = expected_metrics(record)
        expected = {
            k: v for k, v in expected.items() if not k.startswith(("client/3/", "client/4/"))
        }
        got = {k: v[record["round"]] for k, v in logged.metrics.items() if record["round"] in v}
        assert got == pytest.approx(expected, rel=kind.rel), name
    # step = round; the values equal the history's, round by round
    for section in ("centralized", "federated"):
        for key in ("loss", "accuracy"):
            values = history.metric(section, key)
            assert logged.metrics[f"{section}/{key}"] == pytest.approx(
                dict(enumerate(values, start=1)), rel=kind.rel
            )
    assert logged.metrics["train/clients"] == {1: 5, 2: 5, 3: 5}
    # at most 3 clients: the lowest ids, as every client took part in every round
    assert {k.split("/")[1] for k in logged.metrics if k.startswith("client/")} == {"0", "1", "2"}
    assert {"run.name": "tracked", "run.rounds": "3", "model.hidden": "[64, 32]"} == {
        k: logged.params[k] for k in ("run.name", "run.rounds", "model.hidden")
    }
    if name == "tensorboard":  # the plots, as images at the last round
        assert logged.artifacts == {f"plots/{Path(p).stem}" for p in PLOTS}
    else:
        files = PLOTS | {"report.html", "history.json", "checkpoints/last.npz"}
        assert logged.artifacts == files
    if name == "mlflow":
        assert logged.status == "FINISHED"
    if name == "wandb":
        assert logged.status == "exit 0"


def test_tensorboard_logs_privacy_failures_and_a_bounded_client_panel(tmp_path: Path) -> None:
    """Records fed by hand: 3 clients logged at most; the panel is the first 3 to take part."""

    def record(rnd: int, clients: list[int], epsilon: float) -> dict[str, Any]:
        return {
            "round": rnd,
            "wall_s": 1.5 * rnd,
            "federated": {"loss": 0.5 / rnd, "accuracy": 0.25 * rnd, "clients": len(clients)},
            "train": {
                "clients": len(clients),
                "failures": 1,
                "timeouts": 1,
                "rejected": 0,
                "metrics": {"loss": 2.0 / rnd, "optimizer": "sgd"},
            },
            "clients": {str(c): {"num_examples": c, "train": {"loss": c / rnd}} for c in clients},
            "privacy": {"epsilon": epsilon, "delta": 1e-5, "accountant": "pld"},
            "failures": [{"client_id": 99, "task": "train", "kind": "timeout", "reason": "slow"}],
        }

    tracker = TensorBoardTracker(tmp_path / "tb", max_clients_logged=3)
    rounds = [record(1, [10, 2, 33, 7, 5], 0.5), record(2, [1, 7, 40], 0.8), record(3, [5, 2], 1.1)]
    history = History(config={"privacy": {"mode": "central"}})
    tracker.on_run_start(3, 1)
    for r in rounds:
        history.rounds.append(r)
        tracker.on_round_end(r, initial())
    tracker.on_run_end(history, None)

    logged = read_tensorboard(tmp_path / "tb")
    assert logged.metrics["privacy/epsilon"] == pytest.approx({1: 0.5, 2: 0.8, 3: 1.1})
    assert logged.metrics["privacy/delta"] == pytest.approx({1: 1e-5, 2: 1e-5, 3: 1e-5})
    assert "privacy/accountant" not in logged.metrics and "train/optimizer" not in logged.metrics
    assert logged.metrics["train/timeouts"] == {1: 1, 2: 1, 3: 1}
    assert logged.metrics["train/failures"] == {1: 1, 2: 1, 3: 1}
    assert logged.metrics["train/loss"] == pytest.approx({1: 2.0, 2: 1.0, 3: 2.0 / 3})
    assert logged.metrics["wall_s"] == pytest.approx({1: 1.5, 2: 3.0, 3: 4.5})
    # round 1 fills the panel with 2, 5, 7; round 2 logs 7 alone; round 3 logs 2 and 5
    clients = {k: v for k, v in logged.metrics.items() if k.startswith("client/")}
    names = ("num_examples", "train/loss")
    assert set(clients) == {f"client/{c}/{m}" for c in (2, 5, 7) for m in names}
    assert logged.metrics["client/7/train/loss"] == pytest.approx({1: 7.0, 2: 3.5})
    assert logged.metrics["client/2/train/loss"] == pytest.approx({1: 2.0, 3: 2.0 / 3})
    assert logged.params == {"privacy.mode": "central"}  # from the history, at the end


# -- the pieces, by hand ----------------------------------------------------------------------


def test_round_metrics_flattens_like_metrics_csv() -> None:
    record = {
        "round": 4,
        "wall_s": 12.0,
        "centralized": {"loss": 0.5, "accuracy": 0.9, "top5": 1, "note": "x", "flag": True},
        "train": {"clients": 3, "failures": 0, "metrics": {"loss": 0.7, "clients": 8.0}},
        "privacy": {"epsilon": float("inf"), "delta": 1e-5},
        "clients": {"0": {"num_examples": 3}},
        "failures": [],
    }
    assert round_metrics(record) == {
        "wall_s": 12.0,
        "centralized/loss": 0.5,
        "centralized/accuracy": 0.9,
        "centralized/top5": 1.0,
        "train/clients": 3.0,
        "train/failures": 0.0,
        "train/loss": 0.7,
        "train/metrics/clients": 8.0,  # train/clients is taken by the count of clients
        "privacy/delta": 1e-5,  # a non-finite ε is left out, as in metrics.csv
    }


def test_client_panel_keeps_the_first_clients_for_the_whole_run() -> None:
    panel = ClientPanel(2)
    assert panel.select(["10", "9", "c", "3"]) == ["3", "9"]  # numeric ids in number order
    assert panel.select(["10", "3", "1"]) == ["3"]
    assert panel.select(["9", "3"]) == ["3", "9"]
    assert ClientPanel(0).select(["1", "2"]) == []
    with pytest.raises(ConfigError, match="max_clients_logged"):
        ClientPanel(-1)


def test_flatten_config() -> None:
    config = {"run": {"name": "a", "rounds": 2}, "model": {"hidden": [8]}, "x": {"y": {"z": 1.5}}}
    assert flatten_config(config) == {
        "run.name": "a",
        "run.rounds": 2,
        "model.hidden": "[8]",
        "x.y.z": 1.5,
    }


def test_a_missing_library_names_the_extra() -> None:
    with pytest.raises(MissingDependencyError, match=r"pollinate\[tracking\]"):
        require("no_such_tracking_library_xyz")


@pytest.mark.parametrize(
    ("module", "package", "key"),
    [
        ("mlflow", "mlflow-skinny", "mlflow"),
        ("tensorboard", "tensorboard", "tensorboard"),
        ("wandb", "wandb", "wandb"),
    ],
)
def test_a_tracker_turned_on_without_its_library_fails_before_the_run(
    module: str, package: str, key: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, module, None)  # as if it were not installed
    cfg = load(overrides=[f"run.output={tmp_path}", f"tracking.{key}=true"])
    with pytest.raises(MissingDependencyError, match=rf"{package} is not installed.*tracking"):
        build_trackers(cfg)


# -- failures never stop the run --------------------------------------------------------------


def test_a_tracker_that_cannot_write_warns_once_and_the_run_completes(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the event folder should be")
    with caplog.at_level(logging.WARNING, logger="pollinate"):
        result = real_run(tmp_path / "run", TensorBoardTracker(blocker / "tb"))
    assert [r["round"] for r in result.history.rounds] == [1, 2, 3]
    warnings = [r for r in caplog.records if "TensorBoard stopped logging" in r.getMessage()]
    assert len(warnings) == 1
    assert (tmp_path / "run" / "history.json").is_file()


def test_mlflow_that_cannot_open_its_store_warns_and_the_run_completes(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the database's folder should be")
    tracker = MLflowTracker(f"sqlite:///{blocker}/mlflow.db", run_folder=tmp_path / "run")
    with caplog.at_level(logging.WARNING, logger="pollinate"):
        result = real_run(tmp_path / "run", tracker)
    assert len(result.history.rounds) == 3
    assert sum("MLflow stopped logging" in r.getMessage() for r in caplog.records) == 1


class _BreaksAtRound2(TensorBoardTracker):
    """A real TensorBoard tracker whose store goes away at round 2."""

    def _log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if step == 2:
            raise OSError("disk full")
        super()._log_metrics(metrics, step)


def test_a_tracker_failing_mid_run_stops_logging_and_keeps_what_it_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="pollinate"):
        result = real_run(tmp_path / "run", _BreaksAtRound2(tmp_path / "tb"))
    assert len(result.history.rounds) == 3
    messages = [r.getMessage() for r in caplog.records if "stopped logging" in r.getMessage()]
    assert len(messages) == 1 and "OSError: disk full" in messages[0]
    logged = read_tensorboard_scalars(tmp_path / "tb")
    assert set(logged["centralized/accuracy"]) == {1}  # round 1 is kept, nothing after


def read_tensorboard_scalars(log_dir: Path) -> dict[str, dict[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(log_dir))
    accumulator.Reload()
    return {
        tag: {e.step: e.value for e in accumulator.Scalars(tag)}
        for tag in accumulator.Tags()["scalars"]
    }


def test_a_failed_run_is_marked_failed(tmp_path: Path) -> None:
    out = tmp_path / "run"
    with pytest.raises(RoundFailedError):  # every client fails: round 1 cannot count
        real_run(out, WandbTracker(run_folder=out), behaviour={c: "raise" for c in range(5)})
    assert read_wandb(out).status == "exit 1"


# -- the config ---------------------------------------------------------------------------------


def test_tracking_config_builds_the_trackers(tmp_path: Path) -> None:
    assert build_trackers(load()) == []  # all off by default
    cfg = load(
        overrides=[
            f"run.output={tmp_path / 'r'}",
            "tracking.mlflow=true",
            "tracking.tensorboard=true",
            "tracking.wandb=true",
            "tracking.max_clients_logged=5",
        ]
    )
    mlflow, tensorboard, wandb = build_trackers(cfg)
    assert isinstance(mlflow, MLflowTracker) and mlflow.experiment == "digits"
    assert mlflow.tracking_uri == f"sqlite:///{(tmp_path / 'r' / 'mlflow.db').resolve()}"
    assert isinstance(tensorboard, TensorBoardTracker)
    assert tensorboard.log_dir == tmp_path / "r" / "tensorboard"
    assert isinstance(wandb, WandbTracker)
    assert (wandb.mode, wandb.project, wandb.dir) == ("offline", "pollinate", tmp_path / "r")
    assert mlflow.clients.limit == tensorboard.clients.limit == wandb.clients.limit == 5
    assert mlflow.config["tracking"]["mlflow"] is True


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("tracking.wandb_mode=cloud", "tracking.wandb_mode"),
        ("tracking.max_clients_logged=-1", "tracking.max_clients_logged"),
        ("tracking.mlfow=true", "did you mean 'mlflow'"),
    ],
)
def test_bad_tracking_values_are_named(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load(overrides=[override])


@pytest.mark.slow
def test_pollinate_run_with_mlflow_on_writes_a_readable_store(tmp_path: Path) -> None:
    out = tmp_path / "r"
    config = tmp_path / "tiny.toml"
    config.write_text(
        f"""
[run]
name = "tiny"
rounds = 2
output = "{out}"

[data]
num_clients = 3

[train]
epochs = 1

[simulation]
backend = "sequential"

[tracking]
mlflow = true
"""
    )
    assert main(["run", str(config), "--quiet"]) == 0
    history = json.loads((out / "history.json").read_text())
    logged = read_mlflow(out)
    accuracy = [r["centralized"]["accuracy"] for r in history["rounds"]]
    assert logged.metrics["centralized/accuracy"] == {1: accuracy[0], 2: accuracy[1]}
    assert logged.params["data.dataset"] == "digits" and logged.params["tracking.mlflow"] == "True"
    assert {"report.html", "accuracy.png", "checkpoints/last.npz"} <= logged.artifacts
    assert logged.status == "FINISHED"
