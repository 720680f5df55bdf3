"""Strategies (who takes part, how results combine), composed of parts passed in as values:
selection policies, local algorithms, update bounds, aggregators and server optimizers."""

from pollinate.strategy.aggregate import MetricsMean, WeightedMean, check_update, weighted_mean
from pollinate.strategy.base import (
    EvaluateSummary,
    Failure,
    SecureSum,
    SecureTerms,
    Strategy,
    StrategyWrapper,
    TrainSummary,
)
from pollinate.strategy.check import UpdateBounds, check_outcome
from pollinate.strategy.fedavg import FedAvg

__all__ = [
    "EvaluateSummary",
    "Failure",
    "FedAvg",
    "MetricsMean",
    "SecureSum",
    "SecureTerms",
    "Strategy",
    "StrategyWrapper",
    "TrainSummary",
    "UpdateBounds",
    "WeightedMean",
    "check_outcome",
    "check_update",
    "weighted_mean",
]
