"""Secure aggregation in the round loop: SecAgg+ between the clients and any sum-based strategy.

``SecureAggregation`` runs steps 2 and 3 of a round (``pollinate.server.run_round``) as four
exchanges of the same task kind with the sampled clients, each a normal executor ``submit``
(so it works on every simulation backend and over gRPC unchanged):

1. ``keys``: each client makes its key pairs and returns its public keys;
2. ``shares``: each client receives its neighbours' public keys and returns its secrets'
   Shamir shares, encrypted for each neighbour (the server only routes them);
3. ``masked``: each client receives the shares addressed to it and the global model, trains,
   and returns its update quantized and masked (``pollinate.privacy.secagg``);
4. ``unmask``: the clients that sent a masked update are told who survived and who dropped,
   and reveal the shares the server needs to remove the masks from the *sum*.

A client's contribution is the float part of its update, ``Δ_k = w_k − w``, times a weight:
``min(n_k, max_weight) / max_weight`` (example-weighted, FedAvg's mean) or 1 (uniform, for
DP). Each coordinate is clipped to ``±clip_range`` before quantization: choose the range
to cover the updates (and any DP noise). The server computes ``w + Σ_k c_k Δ_k / Σ_k c_k``
from the unmasked sum and the clients' example counts, which travel in the clear with their
training metrics; non-float arrays (integer counters) keep the global model's value.

The strategy is then handed that sum (``Strategy.aggregate_sum``) and turns it into the next
model with its own server optimizer; it says beforehand how clients weight and noise their
updates (``Strategy.secure_terms``). Any sum-based strategy works (FedAvg, FedAvgM, FedAdam …),
wrapped or not; one that needs individual updates (a median, Krum) refuses, with an error
naming both parts.

With ``CentralDP(clip_on="client")`` the round's clipped updates are summed securely instead
of in the clear: the clients clip (``ClientClipping``), each adds its share
``N(0, σ²/m)`` of the noise (distributed DP, ``m`` the clients sampled), and the server adds
only what dropouts took away, so the released model carries the configured ``σ = z·C``
while the server sees a sum that already holds ``|survivors|/m`` of that variance. With
adaptive clipping the clients' clipping bits are summed securely too.

What it does not protect: the server learns who took part, their example counts and
training metrics, and the sum. A malicious client can still send any update within
``±clip_range`` per coordinate (the server cannot check a masked update's norm).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import secrets
from collections.abc import Callable, Iterable, Iterator, Sequence
from functools import partial
from typing import Any

import numpy as np

from pollinate.errors import ConfigError
from pollinate.privacy.dp import is_private
from pollinate.privacy.secagg import (
    SecAggConfig,
    SecAggError,
    SecAggServer,
    client_keys,
    client_mask,
    client_shares,
    client_unmask,
)
from pollinate.strategy.base import Failure, SecureSum, Strategy, TrainSummary
from pollinate.strategy.check import failure_kind
from pollinate.types import (
    Arrays,
    ClientId,
    Config,
    EvaluateRes,
    Instructions,
    Metrics,
    Outcome,
    QueryIns,
    QueryRes,
    TaskKind,
    TrainIns,
    TrainRes,
)

log = logging.getLogger("pollinate")

STAGE = "secagg_stage"  # keys | shares | masked | unmask
TAG = "secagg_tag"  # run and round: binds every key and share to one round
MESSAGE = "secagg_message"  # a stage's JSON payload, both ways
WEIGHTING = "secagg_max_weight"  # 0: uniform weights
NOISE = "secagg_noise_stddev"  # distributed DP: each client's share of the noise
SUMMED = "secagg_summed_metrics"  # comma-separated metrics summed securely, not sent
SEEDED = "secagg_seeded_noise"  # draw the noise from the task's seed (reproducible runs)
CONFIG = "secagg_config"  # the SecAggConfig, JSON
THRESHOLD = "secagg_threshold"  # t: shares needed to rebuild a secret
_KEYS = (STAGE, TAG, MESSAGE, WEIGHTING, NOISE, SUMMED, CONFIG, THRESHOLD, SEEDED)


def _config_json(config: SecAggConfig) -> str:
    return json.dumps(dataclasses.asdict(config), sort_keys=True)


def _parse(text: Any, what: str) -> Any:
    if not isinstance(text, str):
        raise SecAggError(f"the {what} message is missing")
    try:
        return json.loads(text)
    except ValueError as exc:
        raise SecAggError(f"the {what} message is not valid JSON ({exc})") from exc


def _ids(mapping: Any, what: str) -> dict[int, str]:
    if not isinstance(mapping, dict) or not all(isinstance(v, str) for v in mapping.values()):
        raise SecAggError(f"the {what} message must map client ids to strings")
    try:
        return {int(k): v for k, v in mapping.items()}
    except ValueError as exc:
        raise SecAggError(f"the {what} message has a key that is not a client id") from exc


class SecureAggregation:
    """SecAgg+ for steps 2 and 3 of every round (pass it to ``simulate`` or ``serve`` as
    ``secure``; wrap the clients in ``SecureClient``).

    ``max_weight``: example counts are capped at this for the FedAvg weights (0: uniform
    weights; always uniform under ``CentralDP``). ``run_tag`` binds keys to one run (a
    random one by default). ``seed`` makes the neighbour graph and, under ``CentralDP``, the
    clients' noise reproducible (from each task's seed): for experiments only, since anyone
    who knows the seed can remove the noise.
    """

    def __init__(
        self,
        config: SecAggConfig | None = None,
        *,
        max_weight: int = 1000,
        run_tag: str | None = None,
        seed: int | None = None,
    ) -> None:
        if max_weight < 0:
            raise ConfigError(f"max_weight must be >= 0 (0: uniform weights), got {max_weight}")
        self.config = config or SecAggConfig()
        self.max_weight = int(max_weight)
        self.run_tag = run_tag or secrets.token_hex(8)
        self.seed = seed

    # --- the round --------------------------------------------------------------------

    def train(
        self,
        round_number: int,
        arrays: Arrays,
        strategy: Strategy,
        executor: Any,
        plan: Sequence[tuple[ClientId, TrainIns]],
        observe: Callable[[Iterable[Outcome], int], Iterator[Outcome]],
    ) -> TrainSummary:
        """One round's training through SecAgg+; the strategy sees only the sum.

        The strategy says how the clients weight and noise their updates
        (``strategy.secure_terms``: example weights for FedAvg, uniform weights and a share
        of the noise under central DP) and takes the unmasked sum (``aggregate_sum``); a
        strategy that needs individual updates refuses both.
        """
        terms = strategy.secure_terms(round_number, len(plan), self.max_weight)
        config: Config = {WEIGHTING: terms.weight_cap}
        if terms.noise_stddev > 0:
            config[NOISE] = terms.noise_stddev
            if self.seed is not None:  # experiments only: the noise becomes reproducible
                config[SEEDED] = True
        if terms.summed_metrics:
            config[SUMMED] = ",".join(terms.summed_metrics)
        total, outcomes, failures = self.aggregate(
            round_number, "train", plan, executor, strategy.round_timeout_s, observe, config
        )
        survivors = [o for o in outcomes if isinstance(o.result, TrainRes)]
        size = sum(a.size for a in arrays if is_private(a))
        summed = dict(zip(terms.summed_metrics, (float(v) for v in total[size:])))
        weight = 0.0
        for o in survivors:
            assert isinstance(o.result, TrainRes)
            weight += _weight(o.result.num_examples, terms.weight_cap)
        if weight <= 0:
            raise SecAggError("no surviving client had a positive weight: the round has no update")
        noise = terms.noise_stddev * math.sqrt(len(survivors))
        return strategy.aggregate_sum(
            round_number,
            arrays,
            SecureSum(total[:size], summed, survivors, weight, noise, failures),
        )

    def aggregate(
        self,
        round_number: int,
        kind: TaskKind,
        plan: Sequence[tuple[ClientId, Instructions]],
        executor: Any,
        timeout_s: float,
        observe: Callable[[Iterable[Outcome], int], Iterator[Outcome]],
        extra_config: Config | None = None,
    ) -> tuple[np.ndarray, list[Outcome], list[Failure]]:
        """Run the four stages for ``plan`` (tasks of ``kind``): the unmasked float64 sum of
        the survivors' vectors, the survivors' outcomes (results with their arrays emptied:
        the server never keeps a masked vector either) and the failures, stage by stage.
        ``observe`` sees the masked stage's outcomes (the progress display)."""
        ids = [cid for cid, _ in plan]
        self.config.check(len(ids))
        tag = f"{self.run_tag}:{round_number}"
        rng = np.random.default_rng(None if self.seed is None else [self.seed, round_number, 0x5EC])
        server = SecAggServer(self.config, ids, tag.encode(), rng)
        failures: list[Failure] = []
        empty: Arrays = []

        def stage(name: str, todo: Sequence[tuple[ClientId, Instructions]]) -> Iterator[Outcome]:
            outcomes = executor.submit(round_number, kind, todo, timeout_s)
            for o in outcomes:
                if o.error is not None:
                    why = f"secure aggregation, {name} stage: {o.error}"
                    failures.append(Failure(o.client_id, kind, why, failure_kind(o.error)))
                    continue
                yield o

        def ins(cid: ClientId, config: Config, payload: Arrays = empty) -> Instructions:
            base = {STAGE: name, TAG: tag, CONFIG: cfg_json, **config}
            return QueryIns(payload, base) if kind == "query" else TrainIns(payload, base)

        cfg_json = _config_json(self.config)
        # 1. keys
        name = "keys"
        keyed = [
            o.client_id
            for o in stage(name, [(cid, ins(cid, {})) for cid in ids])
            if _guard(failures, o, name, partial(_add_keys, server))
        ]
        # 2. shares, routed by the server
        name = "shares"
        todo = []
        for cid in sorted(keyed):
            public = {str(k): v for k, v in server.neighbours_public(cid).items()}
            todo.append((cid, ins(cid, {MESSAGE: json.dumps(public), THRESHOLD: server.t})))
        shared = [
            o.client_id
            for o in stage(name, todo)
            if _guard(failures, o, name, partial(_add_shares, server))
        ]
        # 3. masked inputs: the task itself, with the shares addressed to each client
        name = "masked"
        given = dict(plan)
        todo = []
        for cid in sorted(shared):
            message = json.dumps({str(k): v for k, v in server.shares_for(cid).items()})
            task = given[cid]
            extra = {**task.config, **(extra_config or {}), MESSAGE: message}
            todo.append((cid, ins(cid, extra, task.arrays)))
        survivors: list[Outcome] = []
        for o in observe(stage(name, todo), len(todo)):
            res = o.result
            if not isinstance(res, (TrainRes, QueryRes)) or len(res.arrays) != 1:
                failures.append(
                    Failure(
                        o.client_id, kind, "secure aggregation: not a masked update", "rejected"
                    )
                )
                continue
            if _guard(failures, o, name, partial(_add_masked, server)):
                kept = dataclasses.replace(res, arrays=[])
                survivors.append(dataclasses.replace(o, result=kept))
        # 4. unmask the sum
        name = "unmask"
        alive, dropped = server.unmask_request()
        message = json.dumps({"survivors": alive, "dropped": dropped})
        for o in stage(name, [(cid, ins(cid, {MESSAGE: message})) for cid in alive]):
            _guard(failures, o, name, partial(_add_reveal, server))
        total = server.result()  # SecAggError when too many dropped to unmask
        return total, [o for o in survivors if o.client_id in set(alive)], failures


def _guard(
    failures: list[Failure], o: Outcome, stage: str, step: Callable[[Outcome], None]
) -> bool:
    """Hand ``o`` to the protocol; a message it refuses becomes the client's failure."""
    try:
        step(o)
    except SecAggError as exc:
        log.warning("client %s: secure aggregation, %s stage: %s", o.client_id, stage, exc)
        why = f"secure aggregation, {stage} stage: {exc}"
        failures.append(Failure(o.client_id, o.kind, why, "rejected"))
        return False
    return True


def _add_keys(server: SecAggServer, o: Outcome) -> None:
    server.add_keys(o.client_id, _msg(o))


def _add_shares(server: SecAggServer, o: Outcome) -> None:
    server.add_shares(o.client_id, _ids(_parse(_msg(o), "shares"), "shares"))


def _add_masked(server: SecAggServer, o: Outcome) -> None:
    vector = o.result.arrays[0]  # type: ignore[union-attr]
    if vector.dtype == np.uint32:  # sent packed (modulus_bits <= 32)
        vector = vector.astype(np.uint64)
    server.add_masked(o.client_id, vector)


def _packed(masked: np.ndarray, config: SecAggConfig) -> np.ndarray:
    """The masked vector as it is sent: uint32 when the modulus fits (half the bytes)."""
    return masked.astype(np.uint32) if config.modulus_bits <= 32 else masked


def _add_reveal(server: SecAggServer, o: Outcome) -> None:
    server.add_reveal(o.client_id, _ids(_parse(_msg(o), "unmask"), "unmask"))


def _msg(o: Outcome) -> Any:
    res = o.result
    metrics = getattr(res, "metrics", None)
    if not isinstance(metrics, dict):
        raise SecAggError("the result carries no metrics")
    return metrics.get(MESSAGE)


def _weight(num_examples: int, cap: int) -> float:
    return 1.0 if cap == 0 else min(int(num_examples), cap) / cap


def flatten_update(arrays: Sequence[np.ndarray], reference: Sequence[np.ndarray]) -> np.ndarray:
    """``w_k − w`` over the float arrays, as one float64 vector."""
    parts = [
        np.subtract(a, r, dtype=np.float64).ravel()
        for a, r in zip(arrays, reference)
        if is_private(r)
    ]
    return np.concatenate(parts) if parts else np.zeros(0)


class SecureClient:
    """The client side of ``SecureAggregation``: wraps a client (or a ``client_fn``).

    It answers the four stages itself and calls the wrapped client only in the masked
    stage (``train``, or ``query`` for federated analytics). Secrets live in the client's
    state (``context.state``) between the stages of one round and are deleted after it. A
    task without a stage is refused: this client never sends an unmasked update.
    """

    def __init__(self, inner: Any, context: Any = None) -> None:
        self._inner = inner
        self.context = context

    def __call__(self, context: Any) -> SecureClient:
        return type(self)(self._inner, context)

    @property
    def inner(self) -> Any:
        """The wrapped client, built from the ``client_fn`` only when a stage needs it."""
        if self.context is None:
            return self._inner
        built = self.__dict__.get("_built")
        if built is None:
            built = self.__dict__["_built"] = self._inner(self.context)
        return built

    def _state(self) -> dict[str, Any]:
        if self.context is None:
            raise TypeError("this SecureClient wraps a client_fn: call it with a context")
        state: dict[str, Any] = self.context.state
        return state

    def train(self, arrays: Arrays, config: Config) -> TrainRes:
        out = self._stage("train", arrays, config)
        assert isinstance(out, TrainRes)
        return out

    def query(self, arrays: Arrays, config: Config) -> QueryRes:
        out = self._stage("query", arrays, config)
        assert isinstance(out, QueryRes)
        return out

    def evaluate(self, arrays: Arrays, config: Config) -> EvaluateRes:
        result: EvaluateRes = self.inner.evaluate(arrays, config)
        return result

    def _stage(self, kind: str, arrays: Arrays, config: Config) -> TrainRes | QueryRes:
        stage, tag = config.get(STAGE), config.get(TAG)
        if stage is None and kind == "query":
            # a query answered without sums (e.g. discovering group values) needs no masking;
            # anything with values in it is refused, whatever the server asked for
            q = self.inner.query(arrays, config)
            if all(np.asarray(a).size == 0 for a in q.arrays):
                return QueryRes(list(q.arrays), q.num_examples, q.metrics)
        if stage is None:
            raise SecAggError(
                f"this client sends its {kind} results only through secure aggregation, but "
                "the server did not run it: enable [secure_aggregation] on the server too"
            )
        if not isinstance(tag, str):
            raise SecAggError("the task has no secure aggregation tag")
        state = self._state()
        keep = state.get("secagg")
        if stage == "keys":
            secret, public = client_keys(tag.encode())
            state["secagg"] = {"tag": tag, "secret": secret}
            return _reply(kind, public)
        if not isinstance(keep, dict) or keep.get("tag") != tag:
            raise SecAggError(f"the {stage} stage came without this round's keys stage")
        secret, me = keep["secret"], int(self.context.client_id)
        if stage == "shares":
            neighbours = _ids(_parse(config.get(MESSAGE), stage), stage)
            threshold = config.get(THRESHOLD)
            if not isinstance(threshold, int) or isinstance(threshold, bool) or threshold < 1:
                raise SecAggError(f"the shares stage has no valid threshold ({threshold!r})")
            shares = client_shares(secret, me, neighbours, threshold)
            return _reply(kind, json.dumps({str(k): v for k, v in shares.items()}))
        if stage == "masked":
            return self._masked(kind, arrays, config, secret, me)
        if stage == "unmask":
            message = _parse(config.get(MESSAGE), stage)
            revealed = client_unmask(secret, me, message["survivors"], message["dropped"])
            state.pop("secagg", None)
            return _reply(kind, json.dumps({str(k): v for k, v in revealed.items()}))
        raise SecAggError(f"unknown secure aggregation stage {stage!r}")

    def _masked(
        self, kind: str, arrays: Arrays, config: Config, secret: Any, me: int
    ) -> TrainRes | QueryRes:
        received = _ids(_parse(config.get(MESSAGE), "masked"), "masked")
        sec = SecAggConfig(**_parse(config.get(CONFIG), "config"))
        inner_config = {k: v for k, v in config.items() if k not in _KEYS}
        summed = [k for k in str(config.get(SUMMED, "")).split(",") if k]
        if kind == "query":
            q = self.inner.query(arrays, inner_config)
            vector = np.concatenate([np.asarray(a, np.float64).ravel() for a in q.arrays])
            peak = float(np.abs(vector).max(initial=0.0))
            if peak > sec.clip_range:  # sums must arrive whole, never clipped
                raise SecAggError(
                    f"the local sums reach {peak:.6g}, beyond the secure aggregation "
                    f"clip_range {sec.clip_range:g}: raise secure_aggregation.clip_range"
                )
            masked = _packed(client_mask(secret, me, received, vector, sec), sec)
            return QueryRes([masked], q.num_examples, q.metrics)
        res = self.inner.train(arrays, inner_config)
        vector = flatten_update(res.arrays, arrays)
        stddev = float(config.get(NOISE, 0.0))
        if stddev > 0:  # secret noise, unless the server runs a seeded experiment
            seed = config.get("seed") if config.get(SEEDED) is True else None
            rng = np.random.default_rng([0x5EC, int(seed)] if seed is not None else None)
            vector += rng.normal(0.0, stddev, size=vector.shape)
        vector *= _weight(res.num_examples, int(config.get(WEIGHTING, 0)))
        metrics: Metrics = dict(res.metrics)
        extras = []
        for key in summed:
            value = metrics.pop(key, None)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise SecAggError(f"the metric {key!r} to sum securely is missing or not a number")
            extras.append(float(value))
        vector = np.concatenate([vector, np.asarray(extras, np.float64)])
        masked = _packed(client_mask(secret, me, received, vector, sec), sec)
        return TrainRes([masked], res.num_examples, metrics)


def _reply(kind: str, message: str) -> TrainRes | QueryRes:
    metrics: Metrics = {MESSAGE: message}
    if kind == "query":
        return QueryRes([], 0, metrics)
    return TrainRes([], 0, metrics)
