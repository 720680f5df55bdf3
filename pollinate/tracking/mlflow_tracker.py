"""MLflow: one MLflow run per pollinate run, through ``MlflowClient`` (no global active run)."""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pollinate.tracking.base import Status, Tracker, require

# MlflowClient.log_batch's limits: 1000 metrics, 100 params, 1000 entries in all
_MAX_METRICS, _MAX_PARAMS = 1000, 100
_MAX_PARAM_CHARS = 6000
_STATUS = {"finished": "FINISHED", "failed": "FAILED", "killed": "KILLED"}


def _key(name: str) -> str:
    """An MLflow metric name: letters, digits and ``_-. :/``; anything else becomes ``_``."""
    return re.sub(r"[^\w\-. :/]", "_", name)


@contextmanager
def _quiet(*names: str) -> Iterator[None]:
    """Hold back the INFO lines of the loggers ``names`` (a new database's set-up)."""
    loggers = [logging.getLogger(name) for name in names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(max(logger.getEffectiveLevel(), logging.WARNING))
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def _batches(items: Sequence[Any], size: int) -> list[Sequence[Any]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


class MLflowTracker(Tracker):
    """Logs a run to MLflow: metrics at step = round number, the config as parameters, the
    run folder's plots, report, history and last checkpoint as artifacts (see
    ``pollinate.tracking.base`` for the names).

    ``tracking_uri``: any MLflow tracking URI (a database, ``http://`` server, …). Empty: with
    a ``run_folder``, ``sqlite:///<run folder>/mlflow.db`` with artifacts in
    ``<run folder>/mlartifacts``; without one, MLflow's own default (``MLFLOW_TRACKING_URI``).
    ``experiment`` is created when missing. Look at it with
    ``mlflow ui --backend-store-uri sqlite:///<run folder>/mlflow.db``.
    """

    library = "MLflow"

    def __init__(
        self,
        tracking_uri: str = "",
        experiment: str = "pollinate",
        run_name: str | None = None,
        *,
        tags: Mapping[str, str] | None = None,
        config: Mapping[str, Any] | None = None,
        run_folder: str | Path | None = None,
        max_clients_logged: int = 20,
    ) -> None:
        super().__init__(
            config=config, run_folder=run_folder, max_clients_logged=max_clients_logged
        )
        self.experiment = experiment or "pollinate"
        self.run_name = run_name
        self.tags = dict(tags or {})
        self.artifact_location: str | None = None
        if tracking_uri:
            self.tracking_uri = tracking_uri
        elif self.run_folder is not None:
            db = (self.run_folder / "mlflow.db").resolve()
            self.tracking_uri = f"sqlite:///{db}"
            self.artifact_location = (self.run_folder / "mlartifacts").resolve().as_uri()
        else:
            self.tracking_uri = ""
        require("mlflow", "mlflow-skinny")
        if self.tracking_uri.startswith("sqlite:"):
            require("sqlalchemy")
            require("alembic")
        self.client: Any = None
        self.run_id = ""

    def _start(self) -> None:
        from mlflow.tracking import MlflowClient

        if self.tracking_uri.startswith("sqlite:///"):
            Path(self.tracking_uri[len("sqlite:///") :]).parent.mkdir(parents=True, exist_ok=True)
        with _quiet("mlflow.store.db.utils", "alembic"):  # "Creating initial … tables"
            client = MlflowClient(tracking_uri=self.tracking_uri or None)
        experiment = client.get_experiment_by_name(self.experiment)
        if experiment is not None:
            experiment_id = experiment.experiment_id
        else:
            experiment_id = client.create_experiment(
                self.experiment, artifact_location=self.artifact_location
            )
        run = client.create_run(experiment_id, run_name=self.run_name, tags=self.tags)
        self.client, self.run_id = client, run.info.run_id

    def _log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        entries = [Param(_key(k), str(v)[:_MAX_PARAM_CHARS]) for k, v in params.items()]
        for batch in _batches(entries, _MAX_PARAMS):
            self.client.log_batch(self.run_id, params=list(batch))

    def _log_metrics(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        entries = [Metric(_key(k), v, now, step) for k, v in metrics.items()]
        for batch in _batches(entries, _MAX_METRICS):
            self.client.log_batch(self.run_id, metrics=list(batch))

    def _log_artifacts(self, files: list[tuple[Path, str]], step: int) -> None:
        for path, folder in files:
            self.client.log_artifact(self.run_id, str(path), folder or None)

    def _finish(self, status: Status) -> None:
        self.client.set_terminated(self.run_id, status=_STATUS[status])
