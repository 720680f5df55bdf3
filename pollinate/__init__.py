"""pollinate: federated learning that moves the computation to the data.

The public API is listed in ``__all__``; framework adapters live in ``pollinate.frameworks``
(imported on demand, so ``import pollinate`` needs neither torch nor ray).
"""

from pollinate.callbacks import ProgressDisplay, RunFolderWriter, load_checkpoint
from pollinate.client import (
    AnalyticsClient,
    Client,
    ClientContext,
    ClientFn,
    MemoryStateStore,
    StateStore,
)
from pollinate.config import RunConfig
from pollinate.config import load as load_config
from pollinate.data import FederatedDataset, load_dataset, make_partitioner
from pollinate.errors import (
    BackendError,
    ClientFailure,
    ConfigError,
    DataError,
    MissingDependencyError,
    PollinateError,
    RoundFailedError,
    SerializationError,
    UpdateRejected,
)
from pollinate.server import Callback, History, RunResult
from pollinate.simulation import make_backend, simulate
from pollinate.strategy import FedAvg, Strategy
from pollinate.types import (
    Arrays,
    Config,
    EvaluateIns,
    EvaluateRes,
    Metrics,
    QueryIns,
    QueryRes,
    TrainIns,
    TrainRes,
)

__version__ = "0.1.0"

__all__ = [
    "AnalyticsClient",
    "Arrays",
    "BackendError",
    "Callback",
    "Client",
    "ClientContext",
    "ClientFailure",
    "ClientFn",
    "Config",
    "ConfigError",
    "DataError",
    "EvaluateIns",
    "EvaluateRes",
    "FedAvg",
    "FederatedDataset",
    "History",
    "MemoryStateStore",
    "Metrics",
    "MissingDependencyError",
    "PollinateError",
    "ProgressDisplay",
    "QueryIns",
    "QueryRes",
    "RoundFailedError",
    "RunConfig",
    "RunFolderWriter",
    "RunResult",
    "SerializationError",
    "StateStore",
    "Strategy",
    "TrainIns",
    "TrainRes",
    "UpdateRejected",
    "load_checkpoint",
    "load_config",
    "load_dataset",
    "make_backend",
    "make_partitioner",
    "simulate",
]
