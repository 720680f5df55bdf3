"""Strategies (who takes part, how results combine) and their pure aggregators."""

from pollinate.strategy.aggregate import MetricsMean, WeightedMean, check_update, weighted_mean
from pollinate.strategy.base import (
    EvaluateSummary,
    Failure,
    Strategy,
    StrategyWrapper,
    TrainSummary,
)
from pollinate.strategy.fedavg import FedAvg

__all__ = [
    "EvaluateSummary",
    "Failure",
    "FedAvg",
    "MetricsMean",
    "Strategy",
    "StrategyWrapper",
    "TrainSummary",
    "WeightedMean",
    "check_update",
    "weighted_mean",
]
