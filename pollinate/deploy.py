"""Deployment: ``pollinate server`` and ``pollinate client`` over gRPC.

The server runs the same round loop, strategy and run folder as ``pollinate run``; only the
executor differs (connected clients instead of simulated ones). Its state lives in
``<run.output>/server.sqlite``: restarted with the same command after a crash, it resumes
after the last completed round with the saved global model.
"""

from __future__ import annotations

import importlib
import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pollinate.callbacks import ProgressDisplay, RunFolderWriter
from pollinate.client import ClientFn
from pollinate.config import RunConfig
from pollinate.errors import ConfigError
from pollinate.server import Callback, History, RunResult, run
from pollinate.transport import DEFAULT_RESULT_MEMORY_BYTES
from pollinate.types import Arrays, ClientId

if TYPE_CHECKING:
    from pollinate.analytics.config import AnalyticsConfig

log = logging.getLogger("pollinate")


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
    """Commits each finished round, with its global model, to the server's SQLite state."""

    def __init__(self, state: Any) -> None:
        self.state = state

    def on_round_end(self, record: dict[str, Any], arrays: Arrays) -> None:
        self.state.record_round(record["round"], record, arrays)


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
                log.warning(
                    "waiting for clients: %d/%d connected",
                    len(self.fleet.connected()),
                    self.minimum,
                )
        return sorted(self.fleet.connected())


def serve(
    cfg: RunConfig,
    address: str,
    security: Security,
    *,
    fresh: bool = False,
    quiet: bool = False,
    heartbeat_s: float = 2.0,
    result_memory_bytes: int = DEFAULT_RESULT_MEMORY_BYTES,
    grpc_options: Sequence[tuple[str, Any]] = (),
    ready: threading.Event | None = None,
) -> RunResult:
    """Run ``cfg``'s rounds over the clients that connect to ``address`` (the transport
    settings are ``FleetServer``'s)."""
    from pollinate.experiment import build_data, build_secure, build_strategy
    from pollinate.frameworks.base import framework_parts
    from pollinate.privacy.accounting import PrivacyBudgetExceeded
    from pollinate.state import ServerState
    from pollinate.transport.grpc.server import FleetServer, GrpcExecutor

    tls = security.server_tls()
    state = ServerState.open(cfg.output_dir / "server.sqlite", cfg.to_dict(), fresh=fresh)
    try:
        last, saved, records = state.load_latest()
        data = build_data(cfg)  # the server uses only the data set's own test split
        parts = framework_parts(cfg, data)
        strategy = build_strategy(cfg, parts.evaluator)
        arrays = saved if saved is not None else parts.initial_arrays
        history = History(config=cfg.to_dict(), rounds=list(records))
        strategy.restore(history.rounds)  # e.g. the adaptive clip, clients' local DP releases
        if last >= cfg.run.rounds:
            print(  # not a log line: -q must not hide why the server exits at once
                f"pollinate server {state.run_id[:8]}: the run already finished all {last} "
                f"rounds; nothing to do (--fresh starts a new run)",
                flush=True,
            )
            RunFolderWriter(cfg.output_dir, history).on_run_end(history, None)
            return RunResult(history, arrays)
        fleet = FleetServer(
            address,
            tls=tls,
            verifier=security.verifier(seen_nonce=state.seen_nonce),
            run_id=state.run_id,
            heartbeat_s=heartbeat_s,
            result_memory_bytes=result_memory_bytes,
            grpc_options=grpc_options,
            on_register=lambda cid, key: state.upsert_client(cid, key, replace_key=True),
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
            callbacks = [
                StateRecorder(state),
                ProgressDisplay(quiet=quiet),
                RunFolderWriter(cfg.output_dir, history, label_counts=data.label_counts()),
            ]
            try:
                result = run(
                    strategy,
                    GrpcExecutor(fleet, seed=cfg.run.seed, deterministic=cfg.run.deterministic),
                    ConnectedClients(fleet, cfg.strategy.min_available_clients, quiet),
                    arrays,
                    cfg.run.rounds,
                    callbacks=callbacks,
                    history=history,
                    start_round=last + 1,
                    secure=build_secure(cfg, run_tag=state.run_id),
                )
            except PrivacyBudgetExceeded as exc:  # a clean stop: completed rounds are saved
                log.warning("%s; the completed rounds are in %s", exc, cfg.output_dir)
                state.set_status("budget exhausted")
                fleet.stop(finished=f"the run stopped: {exc}")
                _, saved, _ = state.load_latest()
                return RunResult(history, saved if saved is not None else arrays)
            state.set_status("finished")
            fleet.stop(finished=f"the run finished all {cfg.run.rounds} rounds")
            return result
        finally:
            fleet.stop()
    finally:
        state.close()


def serve_analytics(
    cfg: AnalyticsConfig,
    address: str,
    security: Security,
    *,
    quiet: bool = False,
    heartbeat_s: float = 2.0,
    result_memory_bytes: int = DEFAULT_RESULT_MEMORY_BYTES,
    grpc_options: Sequence[tuple[str, Any]] = (),
) -> list[dict[str, Any]]:
    """Answer an analytics config's queries over the clients that connect to ``address``
    (once ``data.num_clients`` of them are connected); writes the same outputs as
    ``pollinate analyze``."""
    import secrets

    from pollinate.analytics.session import make_runner, run_queries, write_outputs
    from pollinate.transport.grpc.server import FleetServer, GrpcExecutor

    run_id = secrets.token_hex(8)
    fleet = FleetServer(
        address,
        tls=security.server_tls(),
        verifier=security.verifier(),
        run_id=run_id,
        heartbeat_s=heartbeat_s,
        result_memory_bytes=result_memory_bytes,
        grpc_options=grpc_options,
    )
    fleet.start()
    try:
        print(
            f"pollinate analytics server {run_id[:8]} listening on {fleet.address}; "
            f"waiting for {cfg.data.num_clients} clients",
            flush=True,
        )
        clients = ConnectedClients(fleet, cfg.data.num_clients, quiet)()
        executor = GrpcExecutor(fleet, seed=cfg.run.seed, deterministic=True)
        answers = run_queries(cfg, make_runner(cfg, executor, run_tag=run_id), clients, quiet)
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
    """Import ``package.module:function``: a ``client_fn(context) -> Client``."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ConfigError(f"--app expects package.module:function, got {spec!r}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"cannot import {module_name!r} for --app: {exc}") from exc
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ConfigError(f"{module_name} has no callable {attr!r} for --app")
    return fn  # type: ignore[no-any-return]


def config_client_fn(cfg: RunConfig, partition: int) -> ClientFn:
    """The built-in classification client for partition ``partition`` of ``cfg``'s data."""
    from pollinate.experiment import build_data, wrap_client_fn
    from pollinate.frameworks.base import framework_parts

    data = build_data(cfg)
    if not 0 <= partition < data.num_clients:
        raise ConfigError(
            f"--partition {partition} is out of range: the config splits its data into "
            f"{data.num_clients} partitions (0..{data.num_clients - 1})"
        )
    return wrap_client_fn(cfg, framework_parts(cfg, data).client_fn)


def connect(
    address: str,
    client_fn: ClientFn,
    client_id: int,
    security: Security,
    *,
    stop: threading.Event | None = None,
    max_retries: int | None = None,
) -> None:
    """Serve tasks from the server at ``address`` until stopped (reconnecting as needed)."""
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
    )


def fetch_status(address: str, security: Security, timeout_s: float = 10.0) -> dict[str, Any]:
    """Ask a running server for its status (connected clients, round, tasks in flight)."""
    from pollinate.transport.grpc.client import fetch_status as fetch

    ca = None
    if not security.insecure:
        ca = security.read(security.ca, "CA certificate")
        if ca is None:
            raise ConfigError("pass --ca (or --certs DIR) to check the server, or --insecure")
    return fetch(address, ca_cert_pem=ca, timeout_s=timeout_s)
