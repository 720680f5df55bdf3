"""The client side of the gRPC transport: dial out, register, serve tasks, reconnect.

``run_client`` is what ``pollinate client`` runs. It opens one stream to the server (the
client dials out, so it may sit behind NAT), registers with a signed ``Register``, then runs
each task it is given with the same ``execute_task`` as the simulation backends. The model is
built once: one worker cache lives as long as the process, and the client's state between
rounds lives here too. When the connection breaks it reconnects with exponential backoff and
full jitter; when the server rejects it, it stops with :class:`ClientRejected`.

A payload damaged in transit costs one task, not the connection: a model whose bytes fail
their SHA-256 is not run, and the client reports the task failed (``corrupted: …``); an upload
the server refuses for the same reason comes back as a ``Cancel`` of a task already answered,
which the client logs as a warning, and it carries on with the next round.
"""

from __future__ import annotations

import json
import logging
import queue
import random
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pollinate.client import ClientFn
from pollinate.client_state import ClientStateError, FileStateStore
from pollinate.errors import ConfigError, PollinateError, SerializationError, missing_dependency
from pollinate.limits import check_metrics
from pollinate.simulation.backends.base import execute_task
from pollinate.transport.grpc import pollinate_pb2 as pb
from pollinate.transport.grpc import pollinate_pb2_grpc as pb_grpc
from pollinate.transport.grpc.auth import public_key_b64, sign
from pollinate.transport.grpc.codec import (
    DEFAULT_MAX_MESSAGE_BYTES,
    DEFAULT_MAX_PAYLOAD_BYTES,
    MESSAGE_OVERHEAD,
    PROTOCOL,
    Assembler,
    CorruptPayload,
    Payload,
    ProtocolError,
    decode,
    dumps_scalars,
    encode,
    loads_scalars,
    register_digest,
    result_digest,
    status_digest,
    to_signed,
)
from pollinate.types import (
    RESULT_TYPES,
    TASK_KINDS,
    Arrays,
    Config,
    EvaluateRes,
    Outcome,
    QueryRes,
    Task,
    TaskKind,
    TrainRes,
)

try:
    import grpc
except ImportError as e:  # pragma: no cover - depends on the environment
    raise missing_dependency("grpcio", "deploy") from e

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

log = logging.getLogger("pollinate")

_CLOSE = object()
UPLOADS_KEPT = 64  # ids of the last results sent with Arrays, to recognise a refused upload


class ClientRejected(PollinateError):
    """The server refused this client (unknown key, bad signature, bad message): do not retry."""


class ServerUnreachable(PollinateError):
    """The client gave up after ``max_retries`` failed attempts to reach the server."""


@dataclass(frozen=True)
class Backoff:
    """Reconnect delays: ``initial_s × factor^attempt`` capped at ``max_s``, with full jitter."""

    initial_s: float = 0.5
    factor: float = 2.0
    max_s: float = 30.0

    def delay(self, attempt: int, rng: random.Random | None = None) -> float:
        """Seconds to wait before retry number ``attempt`` (0-based): uniform in [0, cap]."""
        cap = min(self.max_s, self.initial_s * self.factor ** min(attempt, 64))
        return (rng or random).uniform(0.0, cap)


def run_client(
    address: str,
    client_fn: ClientFn,
    client_id: int,
    *,
    private_key: Ed25519PrivateKey | None = None,
    ca_cert_pem: bytes | None = None,
    tls_server_name: str | None = None,
    stop_event: threading.Event | None = None,
    max_retries: int | None = None,
    backoff: Backoff = Backoff(),
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES,
    connect_timeout_s: float = 20.0,
    state_dir: str | Path | None = None,
) -> None:
    """Serve tasks from the server at ``address`` as client ``client_id`` until stopped.

    ``ca_cert_pem`` is the CA that signed the server's certificate (None: plaintext, with a
    warning); ``tls_server_name`` overrides the name checked against the certificate.
    ``private_key`` signs the registration and every result (needed when the server has an
    allow-list). Returns when ``stop_event`` is set; raises :class:`ClientRejected` when the
    server refuses the client and :class:`ServerUnreachable` after ``max_retries`` failed
    attempts in a row (None: retry forever). ``state_dir`` keeps the client's state between
    rounds in files (``pollinate.client_state``), loaded at start and saved after every task
    (None: in memory only, lost with the process).
    """
    if client_id < 0:
        raise ConfigError(f"client id must be >= 0, got {client_id}")
    if max_message_bytes <= MESSAGE_OVERHEAD:
        raise ConfigError(f"max_message_bytes must exceed {MESSAGE_OVERHEAD}")
    if ca_cert_pem is None:
        log.warning(
            "connecting to %s WITHOUT TLS (insecure): give the server's CA certificate to "
            "encrypt the connection and check the server's identity",
            address,
        )
    stop = stop_event if stop_event is not None else threading.Event()
    store = FileStateStore(state_dir) if state_dir is not None else None
    worker = _Worker(client_fn, client_id, store)
    failures = 0
    try:
        while not stop.is_set():
            session = _Session(
                address,
                worker,
                private_key=private_key,
                ca_cert_pem=ca_cert_pem,
                tls_server_name=tls_server_name,
                stop=stop,
                max_message_bytes=max_message_bytes,
                max_payload_bytes=max_payload_bytes,
                connect_timeout_s=connect_timeout_s,
            )
            session.run()  # ClientRejected propagates: retrying cannot help
            if stop.is_set():
                break
            failures = 1 if session.welcomed else failures + 1
            if max_retries is not None and failures > max_retries:
                raise ServerUnreachable(
                    f"client {client_id} gave up on {address} after {failures} failed "
                    f"attempts in a row; last: {session.error}"
                )
            wait = backoff.delay(failures - 1)
            log.warning(
                "client %d: connection to %s %s; retrying in %.1f s",
                client_id,
                address,
                session.error,
                wait,
            )
            stop.wait(wait)
    finally:
        worker.close()


def fetch_status(
    address: str,
    *,
    ca_cert_pem: bytes | None = None,
    tls_server_name: str | None = None,
    timeout_s: float = 10.0,
    private_key: Ed25519PrivateKey | None = None,
    client_id: int | None = None,
) -> dict[str, Any]:
    """The server's ``Fleet.Status`` (run id, round, connected clients, tasks in flight).

    A server with an allow-list answers in full only a request signed with a listed client's
    ``private_key`` (as ``client_id``); anyone else gets counts and ``details`` saying why."""
    request = pb.StatusRequest()
    if private_key is not None:
        if client_id is None:
            raise ConfigError("a signed status request needs the client id of its key")
        request.client_id = client_id
        sig = sign(private_key, "status", client_id, status_digest())
        request.signed.CopyFrom(to_signed(sig))
    options: list[tuple[str, Any]] = [("grpc.enable_retries", 0)]
    if ca_cert_pem is None:
        channel = grpc.insecure_channel(address, options=options)
    else:
        if tls_server_name:
            options.append(("grpc.ssl_target_name_override", tls_server_name))
        creds = grpc.ssl_channel_credentials(root_certificates=ca_cert_pem)
        channel = grpc.secure_channel(address, creds, options=options)
    with channel:
        try:
            reply = pb_grpc.FleetStub(channel).Status(request, timeout=timeout_s)
        except grpc.RpcError as e:
            raise ServerUnreachable(
                f"no status from {address}: {e.code().name}: {e.details()}"
            ) from None
    status = json.loads(reply.json)
    if not isinstance(status, dict):
        raise ProtocolError(f"the status from {address} is not a JSON object")
    return status


def _log_task(client_id: int, round_number: object, kind: TaskKind, outcome: Outcome) -> None:
    """One line per task the client ran: its round, kind and seconds (and why it failed)."""
    where = f"round {round_number} " if round_number is not None else ""
    if outcome.ok:
        log.info("client %d: %s%s done in %.2f s", client_id, where, kind, outcome.seconds)
    else:  # with the client's traceback when it raised
        why = (outcome.traceback or "").rstrip() or outcome.error
        log.error(
            "client %d: %s%s failed after %.2f s: %s", client_id, where, kind, outcome.seconds, why
        )


class _Worker:
    """Runs tasks one at a time for the life of the process (one model, one state).

    With a ``store`` the state is loaded from it at start and saved to it after every task;
    state kept for another run (the server's run id changed) is dropped.
    """

    def __init__(
        self, client_fn: ClientFn, client_id: int, store: FileStateStore | None = None
    ) -> None:
        self.client_fn = client_fn
        self.client_id = client_id
        self.cache: dict[str, Any] = {}  # ClientContext.worker: the model is built once
        self.store = store
        # ClientContext.state, kept between rounds, and the run it belongs to
        self.state: dict[str, Any] = store.get(client_id) if store is not None else {}
        self.run_id = store.saved_run_id(client_id) if store is not None else None
        if self.state and store is not None:
            log.info("client %d: state loaded from %s", client_id, store.path(client_id))
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="pollinate-task")
        # the state at the start of each recent round, so that a round the server runs
        # again after a restart starts from the same state (SCAFFOLD's variate …)
        self._round_start: dict[int, dict[str, Any]] = {}
        self._last_round = 0
        self._rejoined = False

    def _enter_round(self, config: Config) -> None:
        """Before a task: note the state at the start of a new round, or go back to it
        when a restarted server runs a round again (caller holds the lock)."""
        r = config.get("round")
        if isinstance(r, bool) or not isinstance(r, int):
            return
        if r > self._last_round:
            self._round_start[r] = dict(self.state)
            self._last_round = r
            for old in [k for k in self._round_start if k < r - 2]:
                del self._round_start[old]
        elif self._rejoined and r in self._round_start:
            log.info("client %d: round %d runs again; its state starts over", self.client_id, r)
            self.state = dict(self._round_start[r])
            self._last_round = r
        self._rejoined = False

    def joined(self, run_id: str) -> None:
        """The server runs ``run_id``: drop state kept for another run."""
        with self._lock:
            self._rejoined = True
        if not run_id:
            return
        with self._lock:
            if self.run_id is not None and self.run_id != run_id and self.state:
                log.warning(
                    "client %d: dropping its state from run %s: the server now runs %s",
                    self.client_id,
                    self.run_id,
                    run_id,
                )
                self.state = {}
                self._save()
            self.run_id = run_id
            if self.store is not None:
                self.store.run_id = run_id

    def _save(self) -> None:
        if self.store is None:
            return
        try:
            self.store.put(self.client_id, self.state)
        except (ClientStateError, OSError) as exc:
            log.error("client %d: its state was not saved: %s", self.client_id, exc)

    def submit(
        self, session: _Session, task_id: str, kind: TaskKind, config: Config, arrays: Arrays
    ) -> None:
        self._pool.submit(self._run, session, task_id, kind, config, arrays)

    def _run(
        self, session: _Session, task_id: str, kind: TaskKind, config: Config, arrays: Arrays
    ) -> None:
        if not session.wants(task_id):
            return
        with self._lock:
            self._enter_round(config)
            task = Task(self.client_id, kind, config, state=dict(self.state))
        try:
            outcome = execute_task(self.client_fn, task, arrays, self.cache)
            _log_task(self.client_id, config.get("round"), kind, outcome)
            if session.send_result(task_id, kind, outcome) and outcome.ok:
                if outcome.state is not None:
                    with self._lock:
                        self.state = dict(outcome.state)
                        self._save()
        except Exception:  # never let a task kill the worker thread silently
            log.exception("client %d: task %s failed", self.client_id, task_id)

    def close(self) -> None:
        # a task still running cannot be interrupted; its result has nowhere to go
        self._pool.shutdown(wait=False, cancel_futures=True)


@dataclass
class _Upload:
    """A result's payload, queued to follow its Result header."""

    task_id: str
    payload: Payload


class _Session:
    """One connection: register, take tasks, send results and heartbeats until it breaks."""

    def __init__(
        self,
        address: str,
        worker: _Worker,
        *,
        private_key: Ed25519PrivateKey | None,
        ca_cert_pem: bytes | None,
        tls_server_name: str | None,
        stop: threading.Event,
        max_message_bytes: int,
        max_payload_bytes: int,
        connect_timeout_s: float,
    ) -> None:
        self.address = address
        self.worker = worker
        self.client_id = worker.client_id
        self.private_key = private_key
        self.ca_cert_pem = ca_cert_pem
        self.tls_server_name = tls_server_name
        self.stop = stop
        self.max_message_bytes = max_message_bytes
        self.max_payload_bytes = max_payload_bytes
        self.connect_timeout_s = connect_timeout_s
        self.chunk_bytes = max_message_bytes - MESSAGE_OVERHEAD
        self.server_max_payload = 0  # from Welcome (0: unknown)
        self.max_metrics_keys = 0  # from Welcome (0: unknown)
        self.max_metrics_bytes = 0
        self.result_limits: dict[str, int] = {}  # task id -> its Task.max_result_bytes
        self.heartbeat_s = 0.0
        self.welcomed = False
        self.finished = False  # the server said the run is over
        self.closed = False
        self.error = "ended"
        self.why: str | None = None  # set when this side ends the session
        self.last_recv = self.last_beat = time.monotonic()
        self.outbox: queue.Queue[Any] = queue.Queue()
        self.incoming: dict[str, tuple[pb.Task, Config, Assembler]] = {}
        self.current = ""  # the task whose chunks come next (the server's chunks carry no id)
        self.cancelled: set[str] = set()
        self.uploaded: OrderedDict[str, None] = OrderedDict()  # recent results sent with Arrays
        self._lock = threading.Lock()
        self._call: Any = None

    # --- the stream -------------------------------------------------------------------

    def run(self) -> None:
        """Hold the connection until it ends; set ``error``; raise ``ClientRejected``."""
        channel = self._channel()
        watchdog = threading.Thread(target=self._watch, name="pollinate-heartbeat", daemon=True)
        try:
            self.outbox.put(self._register())
            self._call = pb_grpc.FleetStub(channel).Join(self._requests())
            watchdog.start()
            for msg in self._call:
                self.last_recv = time.monotonic()
                self._handle(msg)
                if self.finished:
                    break  # hang up: the server waits for that before it exits
            self.error = "finished" if self.finished else "was closed by the server"
        except grpc.RpcError as e:
            code = e.code() if hasattr(e, "code") else None
            if self.why is not None:  # the watchdog cancelled the call
                self.error = self.why
            else:
                details = e.details() if hasattr(e, "details") else str(e)
                self.error = f"failed ({code.name if code else 'error'}: {details})"
                if self.ca_cert_pem is not None and re.search(r"(?i)ssl|tls|certificate", details):
                    self.error += (
                        "; check that the CA file is the one that signed the server's "
                        "certificate and that the address is a name the certificate lists"
                    )
        except ProtocolError as e:
            log.error("client %d: the server broke the protocol: %s", self.client_id, e)
            self.error = f"broke: the server sent a bad message ({e})"
        finally:
            self.closed = True
            self.outbox.put(_CLOSE)
            if self._call is not None:
                self._call.cancel()
            channel.close()
            if watchdog.is_alive():
                watchdog.join()

    def _channel(self) -> grpc.Channel:
        options: list[tuple[str, Any]] = [
            ("grpc.max_receive_message_length", self.max_message_bytes),
            ("grpc.max_send_message_length", self.max_message_bytes),
            ("grpc.enable_retries", 0),
            ("grpc.use_local_subchannel_pool", 1),  # a connection of its own, even in threads
        ]
        if self.ca_cert_pem is None:
            return grpc.insecure_channel(self.address, options=options)
        if self.tls_server_name:
            options.append(("grpc.ssl_target_name_override", self.tls_server_name))
        creds = grpc.ssl_channel_credentials(root_certificates=self.ca_cert_pem)
        return grpc.secure_channel(self.address, creds, options=options)

    def _register(self) -> pb.ClientMessage:
        from pollinate import __version__

        key = public_key_b64(self.private_key) if self.private_key is not None else ""
        reg = pb.Register(
            client_id=self.client_id, public_key=key, version=__version__, protocol=PROTOCOL
        )
        if self.private_key is not None:
            digest = register_digest(self.client_id, key, __version__, PROTOCOL)
            sig = sign(self.private_key, "register", self.client_id, digest)
            reg.signed.CopyFrom(to_signed(sig))
        return pb.ClientMessage(register=reg)

    def _requests(self) -> Iterator[pb.ClientMessage]:
        """The client's half of the stream: the outbox, payloads cut into chunks."""
        while True:
            item = self.outbox.get()
            if item is _CLOSE or self.closed:
                return
            if isinstance(item, _Upload):
                for offset, data, last in item.payload.pieces():
                    if self.closed:
                        return
                    msg = pb.ClientMessage()
                    chunk = msg.chunk
                    chunk.task_id, chunk.offset, chunk.data, chunk.last = (
                        item.task_id,
                        offset,
                        data,
                        last,
                    )
                    yield msg
            else:
                yield item

    def _watch(self) -> None:
        """Send heartbeats; end the session if the server goes silent or we are stopped."""
        while not self.closed:
            period = self.heartbeat_s if self.welcomed else 0.25
            if self.stop.wait(min(period, 0.5)):
                self._cancel("stopped")
                return
            if self.closed:
                return
            now = time.monotonic()
            if self.welcomed:
                if now - self.last_beat >= self.heartbeat_s:
                    self.last_beat = now
                    self.outbox.put(pb.ClientMessage(heartbeat=pb.Heartbeat(sent_at=time.time())))
                silent = now - self.last_recv
                if silent > 3 * self.heartbeat_s:
                    self._cancel(f"went silent ({silent:.1f} s without a message)")
                    return
            elif now - self.last_recv > self.connect_timeout_s:
                self._cancel(f"gave no answer to Register within {self.connect_timeout_s:g} s")
                return

    def _cancel(self, why: str) -> None:
        self.why = why
        if self._call is not None:
            self._call.cancel()

    # --- what the server sends --------------------------------------------------------

    def _handle(self, msg: pb.ServerMessage) -> None:
        which = msg.WhichOneof("body")
        if which == "finished":
            log.info("client %d: %s; stopping", self.client_id, msg.finished.reason)
            self.finished = True
            self.stop.set()
            return
        if which == "reject":
            reason = msg.reject.reason or "no reason given"
            log.error("client %d: rejected by %s: %s", self.client_id, self.address, reason)
            raise ClientRejected(
                f"the server at {self.address} rejected client {self.client_id}: {reason}"
            )
        if not self.welcomed:
            if which != "welcome":
                raise ProtocolError(f"expected Welcome after Register, got {which}")
            self._welcome(msg.welcome)
        elif which == "heartbeat":
            return
        elif which == "task":
            self._on_task(msg.task)
        elif which == "chunk":
            self._on_chunk(msg.chunk)
        elif which == "cancel":
            tid = msg.cancel.task_id
            with self._lock:
                self.cancelled.add(tid)
                self.incoming.pop(tid, None)
                self.result_limits.pop(tid, None)
                answered = tid in self.uploaded  # its result was sent: the server refused it
                self.uploaded.pop(tid, None)
            if answered:
                log.warning(
                    "client %d: its upload for task %s was rejected by the server: %s",
                    self.client_id,
                    tid,
                    msg.cancel.reason,
                )
            else:
                log.warning(
                    "client %d: task %s cancelled by the server: %s",
                    self.client_id,
                    tid,
                    msg.cancel.reason,
                )
        else:
            raise ProtocolError(f"unexpected message {which}")

    def _welcome(self, welcome: pb.Welcome) -> None:
        if not welcome.heartbeat_s > 0:
            raise ProtocolError(f"Welcome with heartbeat_s={welcome.heartbeat_s}")
        self.heartbeat_s = welcome.heartbeat_s
        if welcome.chunk_bytes:
            self.chunk_bytes = min(self.chunk_bytes, welcome.chunk_bytes)
        self.server_max_payload = welcome.max_payload_bytes
        self.max_metrics_keys = welcome.max_metrics_keys
        self.max_metrics_bytes = welcome.max_metrics_bytes
        self.welcomed = True
        self.worker.joined(welcome.run_id)
        log.info(
            "client %d: connected to %s (run %s)",
            self.client_id,
            self.address,
            welcome.run_id or "-",
        )

    def _on_task(self, task: pb.Task) -> None:
        if not task.task_id:
            raise ProtocolError("a Task without a task_id")
        if task.task_id in self.incoming:
            raise ProtocolError(f"task {task.task_id!r} sent twice")
        self.current = task.task_id
        if task.kind not in TASK_KINDS:
            self._refuse(task, f"unknown task kind {task.kind!r}")
            return
        try:
            config = loads_scalars(task.config_json, "config")
        except ProtocolError as e:
            self._refuse(task, str(e))
            return
        assembler = Assembler(
            f"task {task.task_id!r}",
            task.payload_size,
            task.payload_sha256,
            max_bytes=self.max_payload_bytes,
        )
        self.incoming[task.task_id] = (task, config, assembler)
        if task.max_result_bytes:
            self.result_limits[task.task_id] = task.max_result_bytes

    def _on_chunk(self, chunk: pb.Chunk) -> None:
        task_id = chunk.task_id or self.current  # no id: a chunk of the last Task header
        entry = self.incoming.get(task_id)
        if entry is None:
            if task_id in self.cancelled:
                return
            raise ProtocolError(f"a Chunk for unknown task {task_id!r}")
        task, config, assembler = entry
        try:
            if not assembler.add(chunk.offset, chunk.data, chunk.last):
                return
        except CorruptPayload as e:  # damaged in transit: do not train on it; say so, stay
            del self.incoming[task_id]
            self.result_limits.pop(task_id, None)
            why = f"corrupted: the model download failed its SHA-256 check; not run ({e})"
            log.warning("client %d: task %s failed: %s", self.client_id, task_id, why)
            self._send(pb.Result(task_id=task_id, ok=False, error=why[:2000]), None)
            return
        del self.incoming[task_id]
        arrays = decode(assembler.result(), self.max_payload_bytes, writeable=True)
        kind = next(k for k in TASK_KINDS if k == task.kind)
        self.worker.submit(self, task.task_id, kind, config, arrays)

    def _refuse(self, task: pb.Task, reason: str) -> None:
        log.error("client %d: cannot run task %s: %s", self.client_id, task.task_id, reason)
        self.cancelled.add(task.task_id)  # its chunks are skipped
        self._send(pb.Result(task_id=task.task_id, ok=False, error=reason), None)

    # --- results ----------------------------------------------------------------------

    def wants(self, task_id: str) -> bool:
        """Whether the task is still worth running (session open, not cancelled)."""
        with self._lock:
            return not self.closed and task_id not in self.cancelled

    def send_result(self, task_id: str, kind: TaskKind, outcome: Outcome) -> bool:
        """Queue the task's Result (and its Arrays); False if nobody will receive it."""
        limit = self.result_limits.pop(task_id, 0)
        if not self.wants(task_id):
            log.warning(
                "client %d: result of %s dropped (cancelled or disconnected)",
                self.client_id,
                task_id,
            )
            return False
        res = pb.Result(task_id=task_id)
        payload = None
        if outcome.ok:
            try:
                payload = self._fill(res, kind, outcome.result, limit)
                res.ok = True
            except (TypeError, ValueError, SerializationError) as e:
                log.error("client %d: cannot send the result of %s: %s", self.client_id, kind, e)
                res = pb.Result(task_id=task_id, ok=False, error=f"{type(e).__name__}: {e}")
                payload = None
        else:
            res.ok = False
            res.error = (outcome.error or "failed")[:2000]
        self._send(res, payload)
        return True

    def _fill(
        self, res: pb.Result, kind: TaskKind, result: object, max_result_bytes: int = 0
    ) -> Payload | None:
        expected = RESULT_TYPES[kind]
        if not isinstance(result, expected) or not isinstance(
            result, (TrainRes, EvaluateRes, QueryRes)
        ):
            raise TypeError(
                f"{kind} returned {type(result).__name__}, expected {expected.__name__}"
            )
        n = result.num_examples
        if isinstance(n, bool) or int(n) != n or n < 0:
            raise ValueError(f"num_examples must be an int >= 0, got {n!r}")
        res.num_examples = int(n)
        if self.max_metrics_keys and self.max_metrics_bytes:  # the server's bounds: say why here
            problem = check_metrics(result.metrics, self.max_metrics_keys, self.max_metrics_bytes)
            if problem is not None:
                raise ValueError(problem)
        res.metrics_json = dumps_scalars(result.metrics, "metrics")
        if isinstance(result, EvaluateRes):
            res.loss = float(result.loss)
            return None
        payload = encode(list(result.arrays), self.chunk_bytes)  # TrainRes | QueryRes
        if self.server_max_payload and payload.size > self.server_max_payload:
            raise ValueError(
                f"the trained Arrays take {payload.size} bytes, more than the server accepts "
                f"(max_payload_bytes={self.server_max_payload})"
            )
        if max_result_bytes and payload.size > max_result_bytes:
            raise ValueError(
                f"the result's Arrays take {payload.size} bytes, more than the {max_result_bytes} "
                "the server accepts for this task (a multiple of the model it sent; the server's "
                "--result-size-factor raises it)"
            )
        res.payload_size, res.payload_sha256 = payload.size, payload.sha256
        return payload

    def _send(self, res: pb.Result, payload: Payload | None) -> None:
        if self.private_key is not None:
            sig = sign(self.private_key, "result", self.client_id, result_digest(res))
            res.signed.CopyFrom(to_signed(sig))
        self.outbox.put(pb.ClientMessage(result=res))
        if payload is not None:
            with self._lock:
                self.uploaded[res.task_id] = None
                while len(self.uploaded) > UPLOADS_KEPT:
                    self.uploaded.popitem(last=False)
            self.outbox.put(_Upload(res.task_id, payload))
