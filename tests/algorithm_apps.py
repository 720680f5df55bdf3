"""A framework-free client that honours every strategy's client half, for strategy tests.

Client ``i`` holds ``20 + 5·(i mod 4)`` examples of a linear regression ``y = x·(w* + s_i)``
(a client-specific shift ``s_i``, so the clients' optima differ: non-IID) and trains the
model ``[w (D,), b (1,), rounds (1,) int64]`` by full-batch gradient descent on the mean
squared error. It reads the train-config keys of ``pollinate.strategy.algorithms``:
``proximal_mu`` (FedProx), ``scaffold`` (SCAFFOLD option II, its variate in
``context.state``), ``report_initial_loss`` (q-FedAvg) and reports ``num_steps``
(FedNova). Real arithmetic, seconds for hundreds of rounds; picklable for every backend and
loadable by ``pollinate client --app tests.algorithm_apps:linear_app``.
"""

from __future__ import annotations

import numpy as np

from pollinate.client import ClientContext
from pollinate.types import Arrays, Config, EvaluateRes, TrainRes

D = 5


def initial() -> Arrays:
    return [np.zeros(D, np.float32), np.zeros(1, np.float32), np.zeros(1, np.int64)]


def client_data(cid: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(1000 + cid)
    n = 20 + 5 * (cid % 4)
    x = rng.normal(size=(n, D))
    target = np.linspace(-1, 1, D) + 0.5 * np.sin(cid + np.arange(D))
    y = x @ target + 0.3 + 0.05 * rng.normal(size=n)
    return x, y


class LinearClient:
    def __init__(self, ctx: ClientContext) -> None:
        self.ctx = ctx
        self.x, self.y = client_data(ctx.client_id)

    def _loss_grad(self, w: np.ndarray, b: float) -> tuple[float, np.ndarray, float]:
        err = self.x @ w + b - self.y
        n = len(self.y)
        return float(err @ err / n), 2 * self.x.T @ err / n, float(2 * err.sum() / n)

    def train(self, arrays: Arrays, config: Config) -> TrainRes:
        n_model = 3
        scaffold = bool(config.get("scaffold", False))
        model = arrays[:n_model]
        w = model[0].astype(np.float64)
        b = float(model[1][0])
        w0, b0 = w.copy(), b
        lr = float(config.get("lr", 0.05))
        steps = int(config.get("epochs", 5))
        mu = float(config.get("proximal_mu", 0.0))
        metrics: dict[str, float | int] = {}
        if config.get("report_initial_loss"):
            metrics["initial_loss"] = self._loss_grad(w, b)[0]
        if scaffold:
            c = [a.astype(np.float64) for a in arrays[n_model : 2 * n_model]]
            saved = self.ctx.state.get("scaffold_c")
            ci = (
                [np.asarray(a, np.float64) for a in saved]
                if saved
                else [np.zeros_like(a) for a in c]
            )
        for _ in range(steps):
            _, gw, gb = self._loss_grad(w, b)
            gw = gw + mu * (w - w0)
            gb = gb + mu * (b - b0)
            if scaffold:
                gw = gw + c[0] - ci[0]
                gb = gb + float(c[1][0] - ci[1][0])
            w = w - lr * gw
            b = b - lr * gb
        out = [w.astype(np.float32), np.array([b], np.float32), model[2] + 1]
        loss = self._loss_grad(w, b)[0]
        metrics.update(loss=loss, num_steps=steps)
        if scaffold:
            k_lr = steps * lr
            new_c = [
                ci[0] - c[0] + (w0 - w) / k_lr,
                ci[1] - c[1] + (b0 - b) / k_lr,
                np.zeros(1),
            ]
            self.ctx.state["scaffold_c"] = [a.copy() for a in new_c]
            delta_c = [
                (new_c[0] - ci[0]).astype(np.float32),
                (new_c[1] - ci[1]).astype(np.float32),
                np.zeros(1, np.int64),
            ]
            out = out + delta_c
        return TrainRes(out, len(self.y), metrics)

    def evaluate(self, arrays: Arrays, config: Config) -> EvaluateRes:
        loss = self._loss_grad(arrays[0].astype(np.float64), float(arrays[1][0]))[0]
        return EvaluateRes(loss, len(self.y), {"accuracy": 1.0 / (1.0 + loss)})


def linear_app(ctx: ClientContext) -> LinearClient:
    return LinearClient(ctx)
