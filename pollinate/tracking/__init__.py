"""Experiment tracking: callbacks that log a run to MLflow, TensorBoard or Weights & Biases.

Each tracker is a ``Callback``: pass it to ``simulate(..., callbacks=[...])`` (after any
``RunFolderWriter``, whose files it logs at the end), or turn it on in the run config's
``[tracking]`` section (``build_trackers``). What is logged, under which names, is described
in ``pollinate.tracking.base``. The libraries are imported on first use
(``pip install 'pollinate[tracking]'``); a tracker that fails during a run logs one warning
and stops logging, and the run goes on.
"""

from __future__ import annotations

from typing import Any

from pollinate.config import RunConfig
from pollinate.server import Callback
from pollinate.tracking.base import ClientPanel, Tracker, flatten_config, round_metrics
from pollinate.tracking.mlflow_tracker import MLflowTracker
from pollinate.tracking.tensorboard_tracker import TensorBoardTracker
from pollinate.tracking.wandb_tracker import WandbTracker

__all__ = [
    "ClientPanel",
    "MLflowTracker",
    "TensorBoardTracker",
    "Tracker",
    "WandbTracker",
    "build_trackers",
    "flatten_config",
    "round_metrics",
]


def build_trackers(cfg: RunConfig) -> list[Callback]:
    """The trackers ``cfg``'s ``[tracking]`` section turns on, logging into its run folder.

    Put them after the ``RunFolderWriter`` in a run's callbacks: they log its files at the
    end. Raises ``MissingDependencyError`` when a library that is turned on is not installed.
    """
    t = cfg.tracking
    folder = cfg.output_dir
    common: dict[str, Any] = {
        "config": cfg.to_dict(),
        "run_folder": folder,
        "max_clients_logged": t.max_clients_logged,
    }
    trackers: list[Callback] = []
    if t.mlflow:
        experiment = t.mlflow_experiment or cfg.run.name
        trackers.append(MLflowTracker(t.mlflow_uri, experiment, cfg.run.name, **common))
    if t.tensorboard:
        trackers.append(TensorBoardTracker(t.tensorboard_dir or folder / "tensorboard", **common))
    if t.wandb:
        trackers.append(
            WandbTracker(
                t.wandb_project,
                mode=t.wandb_mode,
                dir=t.wandb_dir or folder,
                run_name=cfg.run.name,
                **common,
            )
        )
    return trackers
