"""Deployment: ``pollinate server`` and ``pollinate client`` over gRPC.

The server runs the same round loop, strategy and run folder as ``pollinate run``; only the
executor differs (connected clients instead of simulated ones). Its state lives in
``<run.output>/server.sqlite``: restarted with the same command after a crash, it resumes
after the last completed round with the saved global model.
"""

from __future__ import annotations

import logging
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pollinate.callbacks import ProgressDisplay, RunFolderWriter
from pollinate.client import ClientFn
from pollinate.config import RunConfig
from pollinate.errors import ConfigError
from pollinate.server import Callback, RunResult, run
from pollinate.types import Arrays, ClientId

if TYPE_CHECKING:
    from pollinate.analytics.config import AnalyticsConfig

log = logging.getLogger("pollinate")

MAX_STATUS_CHARS = 2000  # a failed run's status keeps this much of the reason


@dataclass(frozen=True)
class Security:
    """Where a process finds its TLS and identity files (None: not used)."""

    cert: Path | None = None  # server: its certificate
    key: Path | None = None  # server: TLS key; client: its Ed25519 signing key
    ca: Path | None = None  # client: the CA that signed the server's certificate
    allow_list: Path | None = None  # server: client ids and public keys allowed in
    insecure: bool = False  # no TLS (explicit, warns)

    def read(self, path: Path | None, what: str) -> bytes | None:
        if path is None:
            return None
        if not path.is_file():
            raise ConfigError(f"{what} file {path} does not exist (make one with pollinate certs)")
        return path.read_bytes()

    def server_tls(self) -> tuple[bytes, bytes] | None:
        """The server's (certificate, key) PEM bytes; None with ``insecure``."""
        if self.insecure:
            return None
        if self.cert is None or self.key is None:
            raise ConfigError(
                "the server needs a TLS certificate and key (--cert/--key or --certs DIR, made "
                "by pollinate certs), or --insecure to run without TLS"
            )
        cert = self.read(self.cert, "certificate")
        key = self.read(self.key, "TLS key")
        assert cert is not None and key is not None
        return cert, key

    def verifier(self, seen_nonce: Any = None) -> Any:
        """The allow-list's request verifier (None without an allow-list)."""
        if self.allow_list is None:
            return None
        from pollinate.transport.grpc.auth import AllowList, Verifier

        return Verifier(AllowList.load(self.allow_list), seen_nonce=seen_nonce)


class StateRecorder(Callback):
    """Commits each finished round, with its global model and the strategy's state, to the
    server's SQLite state."""

    def __init__(self, state: Any, strategy: Any = None) -> None:
        self.state = state
        self.strategy = strategy

    def on_round_end(self, record: dict[str, Any], arrays: Arrays) -> None:
        saved = self.strategy.state() if self.strategy is not None else {}
        self.state.record_round(record["round"], record, arrays, strategy_state=saved)


class ConnectedClients:
    """The population a deployed round samples from: the clients connected now.

    Blocks until ``minimum`` clients are connected, saying so every few seconds.
    """

    def __init__(self, fleet: Any, minimum: int, quiet: bool = False) -> None:
        self.fleet = fleet
        self.minimum = max(1, minimum)
        self.quiet = quiet

    def __call__(self) -> list[ClientId]:
        while not self.fleet.wait_for(self.minimum, timeout=5.0):
            if not self.quiet:
                log.info(
                    "waiting for clients: %d/%d connected",
                    len(self.fleet.connected()),
                    self.minimum,
                )
        return sorted(self.fleet.connected())


def _refuse_attack(cfg: RunConfig) -> None:
    """[attack] is for simulation: a deployment never honours it."""
    if cfg.attack.kind != "none":
        raise ConfigError(
            "[attack] simulates malicious clients for pollinate run only; remove it from the "
            "config to deploy real servers and clients"
        )


def serve(
    cfg: RunConfig,
    address: str,
    security: Security,
    *,
    fresh: bool = False,
    quiet: bool = False,
    ready: threading.Event | None = None,
    **transport: Any,
) -> RunResult:
    """Run ``cfg``'s rounds over the clients that connect to ``address``.

    ``transport``: ``FleetServer``'s settings (``heartbeat_s``, ``result_memory_bytes``,
    ``stall_s``, ``max_streams``, ``max_metrics_keys`` ...) and ``GrpcExecutor``'s
    (``result_size_factor``, ``min_result_bytes``). The run folder is locked
    (:class:`~pollinate.runlock.RunLock`) while the server runs: a second server on it is
    refused. A round that fails (too few clients answered, an error) leaves the completed
    rounds saved, the status ``failed: <reason>`` in the state, and the same command resumes.
    """
    from pollinate.runlock import RunLock

    _refuse_attack(cfg)
    tls = security.server_tls()
    with RunLock(cfg.output_dir):
        return _serve(cfg, address, security, tls, fresh, quiet, ready, transport)


def _serve(
    cfg: RunConfig,
    address: str,
    security: Security,
    tls: tuple[bytes, bytes] | None,
    fresh: bool,
    quiet: bool,
    ready: threading.Event | None,
    transport: dict[str, Any],
) -> RunResult:
    from pollinate.asynchronous import run_async
    from pollinate.experiment import build_run
    from pollinate.privacy.accounting import PrivacyBudgetExceeded
    from pollinate.state import ServerState
    from pollinate.strategy.fedbuff import FedBuff
    from pollinate.tracking import build_trackers
    from pollinate.transport.grpc.asynchronous import AsyncGrpcTasks
    from pollinate.transport.grpc.server import FleetServer, GrpcExecutor

    fleet_kw, executor_kw = _split_transport(transport)
    state = ServerState.open(cfg.output_dir / "server.sqlite", cfg.to_dict(), fresh=fresh)
    try:
        last, saved, records = state.load_latest()
        if last and cfg.strategy.name == "fedbuff":
            raise ConfigError(
                f"{cfg.output_dir} holds a fedbuff run stopped after server step {last}, and "
                "strategy fedbuff cannot resume: the clients in flight when it stopped cannot "
                "be restored; start afresh with --fresh"
            )
        # the server uses only the test split; clients may bring their own data (--app)
        built = build_run(cfg, run_tag=state.run_id, own_client_data=True)
        strategy, data = built.strategy, built.data
        arrays = saved if saved is not None else built.initial_arrays
        history = built.history(records)
        strategy.restore(history.rounds)  # e.g. the adaptive clip, clients' local DP releases
        if last:
            strategy.load_state(state.strategy_state(last))  # momentum, moments, variates …
        if last >= cfg.run.rounds:
            print(  # not a log line: -q must not hide why the server exits at once
                f"pollinate server {state.run_id[:8]}: the run already finished "
                f"{'its 1 round' if last == 1 else f'all {last} rounds'}; nothing to do "
                "(--fresh starts a new run)",
                flush=True,
            )
            writer = RunFolderWriter(cfg.output_dir, history)
            writer.catch_up(arrays)  # in case it was stopped before writing the last round
            writer.on_run_end(history, None)
            return RunResult(history, arrays)
        previous = state.status
        if previous != "running":  # resuming after a failure or a stop: say so, then run
            log.warning("run %s was %s; resuming after round %d", state.run_id[:8], previous, last)
            state.set_status("running")
        fleet = FleetServer(
            address,
            tls=tls,
            verifier=security.verifier(seen_nonce=state.seen_nonce),
            run_id=state.run_id,
            on_register=lambda cid, key: state.upsert_client(cid, key, replace_key=True),
            **fleet_kw,
        )
        fleet.start()
        try:
            print(
                f"pollinate server {state.run_id[:8]} listening on {fleet.address}"
                + (f", resuming after round {last}" if last else "")
                + f"; waiting for {cfg.strategy.min_available_clients} clients",
                flush=True,
            )
            if ready is not None:
                ready.set()
            writer = RunFolderWriter(
                cfg.output_dir, history, label_counts=data.label_counts(), strategy=strategy
            )
            writer.catch_up(arrays)  # a resumed run: the last round's files may be missing
            callbacks = [
                StateRecorder(state, strategy),
                ProgressDisplay(quiet=quiet),
                writer,
                *build_trackers(cfg),  # after the RunFolderWriter: they log its files
            ]
            executor = GrpcExecutor(
                fleet, seed=cfg.run.seed, deterministic=cfg.run.deterministic, **executor_kw
            )
            connected = ConnectedClients(fleet, cfg.strategy.min_available_clients, quiet)
            try:
                if isinstance(strategy, FedBuff):  # asynchronous: server steps, not rounds
                    tasks = AsyncGrpcTasks(
                        fleet, seed=cfg.run.seed, timeout_s=strategy.round_timeout_s, **executor_kw
                    )
                    result = run_async(
                        strategy,
                        tasks,
                        connected,
                        arrays,
                        cfg.run.rounds,
                        callbacks=callbacks,
                        history=history,
                    )
                else:
                    result = run(
                        strategy,
                        executor,
                        connected,
                        arrays,
                        cfg.run.rounds,
                        callbacks=callbacks,
                        history=history,
                        start_round=last + 1,
                        secure=built.secure,
                    )
            except PrivacyBudgetExceeded as exc:  # a clean stop: completed rounds are saved
                log.warning("%s; the completed rounds are in %s", exc, cfg.output_dir)
                state.set_status("budget exhausted")
                fleet.stop(finished=f"the run stopped: {exc}")
                _, saved, _ = state.load_latest()
                return RunResult(history, saved if saved is not None else arrays)
            except BaseException as exc:
                _record_failure(state, cfg, exc)
                raise
            state.set_status("finished")
            n = cfg.run.rounds
            unit = "server step" if isinstance(strategy, FedBuff) else "round"
            fleet.stop(
                finished=f"the run finished {f'its 1 {unit}' if n == 1 else f'all {n} {unit}s'}"
            )
            return result
        finally:
            fleet.stop()
    finally:
        state.close()


def _record_failure(state: Any, cfg: RunConfig, exc: BaseException) -> None:
    """Record why the run stopped (status ``failed: ...`` or ``stopped: ...``) and say how to
    resume it; the rounds completed so far stay saved."""
    done = state.last_round()
    failed = isinstance(exc, Exception)
    why = (f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__).strip()
    why = why if len(why) <= MAX_STATUS_CHARS else why[: MAX_STATUS_CHARS - 3] + "..."
    status = f"{'failed' if failed else 'stopped'} in round {done + 1}: {why}"
    try:
        state.set_status(status)
    except Exception:  # the state itself may be what failed; the message still goes out
        log.exception("could not record the run's status in %s", state.path)
    print(
        f"pollinate server {state.run_id[:8]}: {status}. Rounds 1-{done} are saved in "
        f"{cfg.output_dir}; run the same command again to resume after round {done}.",
        file=sys.stderr,
        flush=True,
    )


_EXECUTOR_SETTINGS = ("result_size_factor", "min_result_bytes")


def _split_transport(transport: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``serve``'s transport keywords: (FleetServer's, GrpcExecutor's)."""
    executor = {k: v for k, v in transport.items() if k in _EXECUTOR_SETTINGS}
    fleet = {k: v for k, v in transport.items() if k not in _EXECUTOR_SETTINGS}
    return fleet, executor


def serve_analytics(
    cfg: AnalyticsConfig,
    address: str,
    security: Security,
    *,
    quiet: bool = False,
    **transport: Any,
) -> list[dict[str, Any]]:
    """Answer an analytics config's queries over the clients that connect to ``address``
    (once ``data.num_clients`` of them are connected); writes the same outputs as
    ``pollinate analyze``. ``transport``: as in :func:`serve`."""
    import secrets

    from pollinate.analytics.session import make_runner, run_queries, write_outputs
    from pollinate.runlock import RunLock
    from pollinate.transport.grpc.server import FleetServer, GrpcExecutor

    fleet_kw, executor_kw = _split_transport(transport)
    run_id = secrets.token_hex(8)
    tls = security.server_tls()
    with RunLock(cfg.output_dir):
        fleet = FleetServer(
            address, tls=tls, verifier=security.verifier(), run_id=run_id, **fleet_kw
        )
        fleet.start()
        try:
            print(
                f"pollinate analytics server {run_id[:8]} listening on {fleet.address}; "
                f"waiting for {cfg.data.num_clients} clients",
                flush=True,
            )
            clients = ConnectedClients(fleet, cfg.data.num_clients, quiet)()
            executor = GrpcExecutor(fleet, seed=cfg.run.seed, deterministic=True, **executor_kw)
            runner = make_runner(cfg, executor, run_tag=run_id)
            answers = run_queries(cfg, runner, clients, quiet)
            write_outputs(cfg, answers)
            fleet.stop(finished=f"the analytics session answered its {len(answers)} queries")
            return answers
        finally:
            fleet.stop()


def analytics_client_fn(cfg: AnalyticsConfig, partition: int, client_id: int) -> ClientFn:
    """A data holder's client (id ``client_id``) for partition ``partition`` of an analytics
    config's tables, under the config's [policy]."""
    from pollinate.analytics.session import client_fn, client_tables

    tables = client_tables(cfg)
    if not 0 <= partition < len(tables):
        raise ConfigError(
            f"--partition {partition} is out of range: the config has {len(tables)} client "
            f"tables (0..{len(tables) - 1})"
        )
    only = {client_id: tables[partition]}  # keep just ours
    fn: ClientFn = client_fn(cfg, only)
    return fn


def load_app(spec: str) -> ClientFn:
    """Import ``package.module:function``: a ``client_fn(context) -> Client`` (the current
    folder is importable)."""
    from pollinate.imports import load_object

    fn: ClientFn = load_object(spec, "--app")
    return fn


def config_client_fn(cfg: RunConfig, partition: int) -> ClientFn:
    """The built-in classification client for partition ``partition`` of ``cfg``'s data."""
    from pollinate.experiment import build_run

    _refuse_attack(cfg)
    built = build_run(cfg)
    if not 0 <= partition < built.data.num_clients:
        raise ConfigError(
            f"--partition {partition} is out of range: the config splits its data into "
            f"{built.data.num_clients} partitions (0..{built.data.num_clients - 1})"
        )
    return built.client_fn()


def connect(
    address: str,
    client_fn: ClientFn,
    client_id: int,
    security: Security,
    *,
    stop: threading.Event | None = None,
    max_retries: int | None = None,
    state_dir: str | Path | None = None,
) -> None:
    """Serve tasks from the server at ``address`` until stopped (reconnecting as needed).

    ``state_dir`` keeps the client's state between rounds in files there (None: in memory).
    """
    from pollinate.transport.grpc.auth import load_private_key
    from pollinate.transport.grpc.client import run_client

    ca = None
    if not security.insecure:
        if security.ca is None:
            raise ConfigError(
                "the client needs the CA certificate that signed the server's certificate "
                "(--ca or --certs DIR), or --insecure to connect without TLS"
            )
        ca = security.read(security.ca, "CA certificate")
    key = load_private_key(security.key) if security.key is not None else None
    run_client(
        address,
        client_fn,
        client_id,
        private_key=key,
        ca_cert_pem=ca,
        stop_event=stop,
        max_retries=max_retries,
        state_dir=state_dir,
    )


def fetch_status(
    address: str, security: Security, timeout_s: float = 10.0, client_id: int | None = None
) -> dict[str, Any]:
    """Ask a running server for its status (connected clients, round, tasks in flight).

    A server with an allow-list gives the full status only to a request signed with a listed
    client's key (``security.key``, as ``client_id``); otherwise counts."""
    from pollinate.transport.grpc.auth import load_private_key
    from pollinate.transport.grpc.client import fetch_status as fetch

    ca = None
    if not security.insecure:
        ca = security.read(security.ca, "CA certificate")
        if ca is None:
            raise ConfigError("pass --ca (or --certs DIR) to check the server, or --insecure")
    key = load_private_key(security.key) if security.key is not None else None
    return fetch(address, ca_cert_pem=ca, timeout_s=timeout_s, private_key=key, client_id=client_id)
