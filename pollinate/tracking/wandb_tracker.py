"""Weights & Biases: one W&B run per pollinate run; offline by default (no network)."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from pollinate.errors import ConfigError
from pollinate.tracking.base import Status, Tracker, require

MODES = ("offline", "online", "disabled")


class WandbTracker(Tracker):
    """Logs a run to Weights & Biases: metrics at step = round number (see
    ``pollinate.tracking.base`` for the names), the config as the run's config, and the run
    folder's plots, report, history and last checkpoint as one artifact of type
    ``run-folder``.

    ``mode = "offline"`` (the default) writes ``<dir>/wandb/offline-run-*`` and nothing goes
    over the network; ``wandb sync <that folder>`` uploads it later. ``dir`` defaults to the
    run folder. W&B's console capture is off, so the run's own output is left alone. W&B's
    service writes the files in the background: they are complete when the process exits, or
    after ``wandb.teardown()``.
    """

    library = "Weights & Biases"

    def __init__(
        self,
        project: str = "pollinate",
        *,
        mode: str = "offline",
        dir: str | Path | None = None,
        run_name: str | None = None,
        entity: str | None = None,
        tags: Sequence[str] = (),
        config: Mapping[str, Any] | None = None,
        run_folder: str | Path | None = None,
        max_clients_logged: int = 20,
    ) -> None:
        super().__init__(
            config=config, run_folder=run_folder, max_clients_logged=max_clients_logged
        )
        if mode not in MODES:
            raise ConfigError(f"W&B mode {mode!r} is not allowed; choose one of: {MODES}")
        self.project = project or "pollinate"
        self.mode = mode
        self.dir = Path(dir) if dir is not None else self.run_folder
        self.run_name = run_name
        self.entity = entity
        self.tags = list(tags)
        require("wandb")
        self.run: Any = None

    def _start(self) -> None:
        import wandb

        if self.dir is not None:
            self.dir.mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(
            project=self.project,
            entity=self.entity,
            name=self.run_name,
            tags=self.tags or None,
            mode=self.mode,  # type: ignore[arg-type]
            dir=str(self.dir) if self.dir is not None else None,
            reinit="create_new",  # a run of its own, beside any the caller has open
            settings=wandb.Settings(console="off"),
        )

    def _log_params(self, params: dict[str, Any]) -> None:
        self.run.config.update(params, allow_val_change=True)

    def _log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self.run.log(metrics, step=step)

    def _log_artifacts(self, files: list[tuple[Path, str]], step: int) -> None:
        import wandb

        name = re.sub(r"[^\w\-.]", "_", f"{self.run_name or self.run.id}-run-folder")
        artifact = wandb.Artifact(name, type="run-folder")
        for path, folder in files:
            artifact.add_file(str(path), name=f"{folder}/{path.name}" if folder else path.name)
        self.run.log_artifact(artifact)

    def _finish(self, status: Status) -> None:
        self.run.finish(exit_code=0 if status == "finished" else 1)
