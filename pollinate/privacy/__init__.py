"""Differential privacy as wrappers: central DP around a strategy, local DP around a client.

- ``CentralDP(strategy, ...)``: DP-FedAvg (clip each update, noise the sum, fixed
  denominator), with fixed or ``AdaptiveClipping``, clipping on the server or on the client
  (``ClientClipping``), ε accounted after every round and an optional budget.
- ``LocalDP(client, ...)``: each client clips and noises its own update;
  ``LocalDPLedger(strategy, ...)`` records the clients' ε on the server.
- ``PrivacyAccountant`` and ``find_noise_multiplier``: ε through ``dp_accounting`` (the
  ``privacy`` extra: ``pip install 'pollinate[privacy]'``).

Nothing here imports an ML framework, a backend or a transport.
"""

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
    "clip_update",
    "find_noise_multiplier",
    "local_epsilon",
    "local_noise_multiplier",
    "update_norm",
]
