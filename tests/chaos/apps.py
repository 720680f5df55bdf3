"""A client app whose updates make double counting visible, for ``pollinate client --app``.

:class:`LedgerClient` trains by returning the global model with one cell raised by 1: cell
``(round - 1) * STRIDE + client_id`` of the first array, flattened. FedAvg with one example
per client averages the C updates of a round, so that round's cells of the next model rise by
``count / C`` where ``count`` is how many times that client's update was averaged in: exactly
``1 / C`` for each contributor if every update counted once, 0 for a client that did not
contribute, and a larger share for one counted twice. The final model is a ledger of every
round's contributions. It imports only NumPy, so a client process starts in a second.
``POLLINATE_LEDGER_TRAIN_S`` (seconds, default 0) makes training take that long, so that
faults can land inside a round.
"""

from __future__ import annotations

import os
import time

import numpy as np

from pollinate.client import ClientContext
from pollinate.types import Arrays, Config, EvaluateRes, TrainRes

STRIDE = 8
"""Cells per round in the ledger: client ids must be below it."""


class LedgerClient:
    """Client ``cid``: training writes its mark in the round's row of the ledger."""

    def __init__(self, cid: int, train_s: float = 0.0) -> None:
        if not 0 <= cid < STRIDE:
            raise ValueError(f"ledger client ids go from 0 to {STRIDE - 1}, got {cid}")
        self.cid = cid
        self.train_s = train_s

    def train(self, arrays: Arrays, config: Config) -> TrainRes:
        round_number = int(config["round"])
        if self.train_s:
            time.sleep(self.train_s)  # the time a real client would spend training
        out = [np.array(a, copy=True) for a in arrays]
        flat = out[0].reshape(-1)
        cell = (round_number - 1) * STRIDE + self.cid
        if cell >= flat.size:
            raise ValueError(f"round {round_number} is past the ledger's {flat.size} cells")
        flat[cell] += 1.0
        metrics = {"client": self.cid, "round": round_number, "pid": os.getpid()}
        return TrainRes(out, num_examples=1, metrics=metrics)

    def evaluate(self, arrays: Arrays, config: Config) -> EvaluateRes:
        return EvaluateRes(float(self.cid), num_examples=1, metrics={"accuracy": 0.5})


def ledger(ctx: ClientContext) -> LedgerClient:
    """``--app tests.chaos.apps:ledger``."""
    return LedgerClient(ctx.client_id, float(os.environ.get("POLLINATE_LEDGER_TRAIN_S", "0")))
