"""Differential privacy as wrappers: central DP around a strategy, local DP around a client.

- ``CentralDP(strategy, ...)``: DP-FedAvg (clip each update, noise the sum, fixed
  denominator), with fixed or ``AdaptiveClipping``, clipping on the server or on the client
  (``ClientClipping``), ε accounted after every round and an optional budget.
- ``LocalDP(client, ...)``: each client clips and noises its own update;
  ``LocalDPLedger(strategy, ...)`` records the clients' ε on the server.
- ``PrivacyAccountant`` and ``find_noise_multiplier``: ε through ``dp_accounting`` (the
  ``privacy`` extra: ``pip install 'pollinate[privacy]'``).
- ``SecureAggregation`` and ``SecureClient``: SecAgg+ for the round loop, so the server sees
  only the sum of the updates (``pollinate.privacy.secagg`` holds the protocol; it needs
  ``cryptography``, in the ``privacy`` extra, and is imported on first use).

Nothing here imports an ML framework, a backend or a transport.
"""

from typing import Any

from pollinate.privacy.accounting import (
    PrivacyAccountant,
    PrivacyBudgetExceeded,
    PrivacyError,
    find_noise_multiplier,
)
from pollinate.privacy.dp import (
    AdaptiveClipping,
    CentralDP,
    ClientClipping,
    ClippedSum,
    RoundSums,
    clip_update,
    update_norm,
)
from pollinate.privacy.local import (
    LocalDP,
    LocalDPLedger,
    local_epsilon,
    local_noise_multiplier,
)

__all__ = [
    "AdaptiveClipping",
    "CentralDP",
    "ClientClipping",
    "ClippedSum",
    "LocalDP",
    "LocalDPLedger",
    "PrivacyAccountant",
    "PrivacyBudgetExceeded",
    "PrivacyError",
    "RoundSums",
    "SecAggConfig",
    "SecureAggregation",
    "SecureClient",
    "clip_update",
    "find_noise_multiplier",
    "local_epsilon",
    "local_noise_multiplier",
    "update_norm",
]


_LAZY = {
    "SecAggConfig": "pollinate.privacy.secagg",
    "SecureAggregation": "pollinate.privacy.secure",
    "SecureClient": "pollinate.privacy.secure",
}


def __getattr__(name: str) -> Any:
    """The secure aggregation names, imported on first use (they need ``cryptography``)."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'pollinate.privacy' has no attribute {name!r}")
