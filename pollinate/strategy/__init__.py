"""Strategies: who takes part in a round and how results become the next model.

A strategy is composed of values (``FedAvg(selection=..., algorithm=..., bounds=...,
aggregator=..., optimizer=...)``); the named algorithms are presets of those parts:
``FedAvg``, ``FedAvgM``, ``FedProx``, ``FedAdam``, ``FedYogi``, ``FedAdagrad``,
``Scaffold``, ``FedNova``, ``QFedAvg``, ``FedMedian``, ``FedTrimmedAvg``, ``Krum``,
``MultiKrum``, ``Bulyan``. The parts live in ``pollinate.strategy.selection``,
``.algorithms``, ``.check``, ``.aggregators`` and ``.optimizers``. ``FedBuff`` is
asynchronous (no rounds: ``pollinate.asynchronous`` drives it).
"""

from pollinate.strategy.base import (
    EvaluateSummary,
    Failure,
    SecureSum,
    SecureTerms,
    Strategy,
    StrategyWrapper,
    TrainSummary,
)
from pollinate.strategy.check import UpdateBounds, check_outcome, check_update
from pollinate.strategy.fedavg import FedAvg
from pollinate.strategy.fedbuff import FedBuff, Staleness
from pollinate.strategy.metrics import MetricsMean
from pollinate.strategy.presets import (
    PRESETS,
    Bulyan,
    FedAdagrad,
    FedAdam,
    FedAvgM,
    FedMedian,
    FedNova,
    FedProx,
    FedTrimmedAvg,
    FedYogi,
    Krum,
    MultiKrum,
    QFedAvg,
    Scaffold,
    make_strategy,
)

__all__ = [
    "PRESETS",
    "Bulyan",
    "EvaluateSummary",
    "Failure",
    "FedAdagrad",
    "FedAdam",
    "FedAvg",
    "FedAvgM",
    "FedBuff",
    "FedMedian",
    "FedNova",
    "FedProx",
    "FedTrimmedAvg",
    "FedYogi",
    "Krum",
    "MetricsMean",
    "MultiKrum",
    "QFedAvg",
    "Scaffold",
    "SecureSum",
    "SecureTerms",
    "Staleness",
    "Strategy",
    "StrategyWrapper",
    "TrainSummary",
    "UpdateBounds",
    "check_outcome",
    "check_update",
    "make_strategy",
]
