"""The server side of the gRPC transport: the fleet of connected clients and its executor.

:class:`FleetServer` accepts client streams (``Fleet.Join``), authenticates each client's
``Register``, keeps a registry ``client_id -> connection`` and watches heartbeats.
:class:`GrpcExecutor` is the deployment counterpart of the simulation executor: the round
loop hands it a plan and it streams each planned client its task, yielding outcomes as they
arrive. A client that is not connected fails at once; one whose stream breaks or that stops
sending (3 × ``heartbeat_s``) fails right away, not at the deadline; the rest time out at the
deadline. A malformed or out-of-protocol message gets a ``Reject`` that says why and its
stream is closed (see ``connection.py``); the server and its other clients carry on.

What one client (even an allow-listed one) can take is bounded, so that it cannot stop a run:

- a result's Arrays: at most the task's ``max_result_bytes`` (by default the round's model
  payload × ``result_size_factor``), declared in an authenticated header before any memory is
  reserved; a reservation whose bytes stop coming for ``stall_s`` is released and the client's
  stream closed; and one reservation never holds the others back (see ``ResultMemory``);
- a result's metrics: ``max_metrics_keys`` keys and ``max_metrics_bytes`` of JSON;
- streams: at most ``max_streams`` in all and ``max_unregistered`` that have not registered;
  one that sends no Register within ``register_timeout_s`` is closed, and the threads a burst
  of streams needed end once idle (``ElasticThreadPool``);
- a client removed from the allow-list loses its stream at once, not at its next request.

A result whose bytes fail their SHA-256 (damaged in transit: the header, signature and framing
were sound) is refused and its task fails with ``corrupted: …``; the client keeps its stream
and is told (a ``Cancel`` naming the reason). Only ``max_corrupt_uploads`` such uploads in a
row, from one client id across its streams, get it rejected.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import itertools
import json
import logging
import math
import queue
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from pollinate.client import task_seed
from pollinate.errors import ConfigError, PollinateError, missing_dependency
from pollinate.limits import DEFAULT_MAX_METRICS_BYTES, DEFAULT_MAX_METRICS_KEYS
from pollinate.server import in_order
from pollinate.transport import (
    DEFAULT_MAX_CORRUPT_UPLOADS,
    DEFAULT_MAX_STREAMS,
    DEFAULT_MAX_UNREGISTERED,
    DEFAULT_MIN_RESULT_BYTES,
    DEFAULT_REGISTER_TIMEOUT_S,
    DEFAULT_RESULT_MEMORY_BYTES,
    DEFAULT_RESULT_SIZE_FACTOR,
    DEFAULT_STALL_S,
)

try:
    import grpc
except ImportError as e:  # pragma: no cover - depends on the environment
    raise missing_dependency("grpcio", "deploy") from e

from pollinate.transport.grpc import pollinate_pb2 as pb
from pollinate.transport.grpc import pollinate_pb2_grpc as pb_grpc
from pollinate.transport.grpc.auth import AuthError, Verifier
from pollinate.transport.grpc.codec import (
    DEFAULT_CHUNK_BYTES,
    DEFAULT_MAX_MESSAGE_BYTES,
    DEFAULT_MAX_PAYLOAD_BYTES,
    PROTOCOL,
    Broadcast,
    ProtocolError,
    broadcast,
    check_sizes,
    dumps_scalars,
    from_signed,
    register_digest,
    serialize_server_message,
    status_digest,
)
from pollinate.transport.grpc.connection import (
    CLOSE_GRACE_S,
    Connection,
    Malformed,
    Pending,
    ResultMemory,
    parse_client_message,
    release,
)
from pollinate.transport.grpc.threads import ElasticThreadPool
from pollinate.types import (
    ClientId,
    Config,
    Instructions,
    Outcome,
    TaskKind,
)

log = logging.getLogger("pollinate")

OnRegister = Callable[[int, str], None]


def _libc_malloc_trim() -> Callable[[int], int] | None:
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim  # type: ignore[no-any-return]
    except (OSError, AttributeError):  # not glibc (macOS, musl, Windows): nothing to do
        return None


_MALLOC_TRIM = _libc_malloc_trim() if sys.platform.startswith("linux") else None


def give_memory_back() -> None:
    """Return freed heap memory to the OS (glibc only).

    A round's results pass through hundreds of reader threads, whose freed buffers stay in
    glibc's per-thread arenas: with 200 clients and a 4 MB model, 1.2 GB stayed resident after
    two rounds, 0.36 GB after ``malloc_trim`` (0.09 s). Called once per exchange of tasks.
    """
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


def _parse_status_request(data: bytes) -> pb.StatusRequest:
    try:
        return pb.StatusRequest.FromString(data)
    except Exception:
        return pb.StatusRequest()


def _add_servicer(servicer: _Servicer, server: grpc.Server) -> None:
    """``pb_grpc.add_FleetServicer_to_server`` with request parsers that never raise."""
    handlers = {
        "Join": grpc.stream_stream_rpc_method_handler(
            servicer.Join,
            request_deserializer=parse_client_message,
            response_serializer=serialize_server_message,
        ),
        "Status": grpc.unary_unary_rpc_method_handler(
            servicer.Status,
            request_deserializer=_parse_status_request,
            response_serializer=pb.StatusReply.SerializeToString,
        ),
    }
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler("pollinate.v1.Fleet", handlers),)
    )
    server.add_registered_method_handlers("pollinate.v1.Fleet", handlers)


class _Servicer(pb_grpc.FleetServicer):
    def __init__(self, fleet: FleetServer) -> None:
        self.fleet = fleet

    def Join(  # noqa: N802 (the gRPC method name)
        self,
        request_iterator: Iterator[pb.ClientMessage | Malformed],
        context: grpc.ServicerContext,
    ) -> Iterator[pb.ServerMessage | bytes]:
        return self.fleet._join(request_iterator, context)

    def Status(  # noqa: N802
        self, request: pb.StatusRequest, context: grpc.ServicerContext
    ) -> pb.StatusReply:
        return pb.StatusReply(json=json.dumps(self.fleet.status_for(request)))


class FleetServer:
    """A gRPC server that clients dial into; keeps the registry of connected clients.

    ``tls`` is ``(cert_pem, key_pem)`` (None: plaintext, with a warning). ``verifier`` checks
    the signature of every Register and Result (None, or one without an allow-list: anyone
    may register, with a warning). ``on_register(client_id, public_key_b64)`` is called for
    each authenticated registration before it takes effect: raising a ``PollinateError``
    refuses the client with that message; any other exception closes the stream (the client
    retries later). Bind ``"127.0.0.1:0"`` for an ephemeral port (see ``port``).
    ``result_memory_bytes`` bounds the client results held at once, being received or waiting
    for the aggregation (a result always goes through beside at most one other); clients past
    it are held back by flow control until the aggregation catches up. A result whose chunks
    stop for ``stall_s`` gets its stream closed. ``max_streams`` bounds the streams open at
    once, ``max_unregistered`` those not registered yet (more are refused with
    RESOURCE_EXHAUSTED, and clients retry); a stream that sends no Register within
    ``register_timeout_s`` is closed; a stream thread idle for ``thread_idle_s`` ends.
    ``max_metrics_keys`` / ``max_metrics_bytes`` bound each result's metrics (see
    ``pollinate.limits``). A result whose bytes fail their SHA-256 fails its task and the
    client stays; one whose uploads fail it ``max_corrupt_uploads`` times in a row is rejected.
    ``grpc_options``: extra gRPC core channel arguments, e.g.
    ``[("grpc.http2.bdp_probe", 0)]``.
    """

    def __init__(
        self,
        address: str,
        *,
        tls: tuple[bytes, bytes] | None = None,
        verifier: Verifier | None = None,
        run_id: str = "",
        heartbeat_s: float = 2.0,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        max_streams: int = DEFAULT_MAX_STREAMS,
        max_unregistered: int = DEFAULT_MAX_UNREGISTERED,
        register_timeout_s: float = DEFAULT_REGISTER_TIMEOUT_S,
        thread_idle_s: float = 10.0,
        result_memory_bytes: int = DEFAULT_RESULT_MEMORY_BYTES,
        stall_s: float = DEFAULT_STALL_S,
        max_metrics_keys: int = DEFAULT_MAX_METRICS_KEYS,
        max_metrics_bytes: int = DEFAULT_MAX_METRICS_BYTES,
        max_corrupt_uploads: int = DEFAULT_MAX_CORRUPT_UPLOADS,
        grpc_options: Sequence[tuple[str, Any]] = (),
        on_register: OnRegister | None = None,
    ) -> None:
        check_sizes(chunk_bytes, max_message_bytes, max_payload_bytes)
        for name, value in (
            ("heartbeat_s", heartbeat_s),
            ("register_timeout_s", register_timeout_s),
            ("thread_idle_s", thread_idle_s),
            ("stall_s", stall_s),
        ):
            if not (isinstance(value, (int, float)) and 0 < value < float("inf")):
                raise ConfigError(f"{name} must be a positive number of seconds, got {value}")
        for name, count in (
            ("max_streams", max_streams),
            ("max_unregistered", max_unregistered),
            ("max_metrics_keys", max_metrics_keys),
            ("max_metrics_bytes", max_metrics_bytes),
            ("max_corrupt_uploads", max_corrupt_uploads),
        ):
            if count < 1:
                raise ConfigError(f"{name} must be >= 1, got {count}")
        self.requested_address = address
        self.tls = tls
        self.verifier = verifier
        self.run_id = run_id
        self.heartbeat_s = float(heartbeat_s)
        self.max_message_bytes = max_message_bytes
        self.max_payload_bytes = max_payload_bytes
        self.chunk_bytes = chunk_bytes
        self.max_streams = max_streams
        self.max_unregistered = min(max_unregistered, max_streams)
        self.register_timeout_s = float(register_timeout_s)
        self.thread_idle_s = float(thread_idle_s)
        self.result_memory = ResultMemory(result_memory_bytes)
        self.stall_s = float(stall_s)
        self.max_metrics_keys = max_metrics_keys
        self.max_metrics_bytes = max_metrics_bytes
        self.refused_streams = 0  # streams refused at the door (too many unregistered)
        self.max_corrupt_uploads = max_corrupt_uploads
        self.corrupted_uploads = 0  # results refused for a SHA-256 mismatch, all clients
        self._corrupt_streaks: dict[ClientId, int] = {}  # client id -> such uploads in a row
        self._streak_lock = threading.Lock()
        self.grpc_options = list(grpc_options)
        self.on_register = on_register
        self.round = 0  # the round being run, for the status
        self.progress: dict[str, Any] = {}  # extra fields for the status (set by the caller)
        self.port = 0
        self._clients: dict[ClientId, Connection] = {}
        self._all: set[Connection] = set()
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._stop = threading.Event()
        self._stopping = False
        self._server: grpc.Server | None = None
        self._pool: ElasticThreadPool | None = None
        self._watcher: threading.Thread | None = None
        self._allow_list_version = -1
        self._started = 0.0
        self._ids = itertools.count(1)

    @property
    def authenticates(self) -> bool:
        return self.verifier is not None and self.verifier.authenticates

    @property
    def address(self) -> str:
        """``host:port`` the server listens on (the real port once started)."""
        host = self.requested_address.rsplit(":", 1)[0]
        return f"{host}:{self.port}"

    # --- lifecycle --------------------------------------------------------------------

    def start(self) -> FleetServer:
        """Listen and serve in background threads; return self."""
        if self._server is not None:
            raise RuntimeError("the server is already started")
        options = {
            "grpc.max_receive_message_length": self.max_message_bytes,
            "grpc.max_send_message_length": self.max_message_bytes,
            "grpc.so_reuseport": 0,  # a second server on the same port must fail, not share
        }
        options.update(self.grpc_options)  # the caller's settings win
        self._pool = ElasticThreadPool(
            self.max_streams + 16, idle_s=self.thread_idle_s, name="pollinate-grpc"
        )
        server = grpc.server(
            self._pool,
            options=list(options.items()),
            maximum_concurrent_rpcs=self.max_streams + 8,  # each stream holds a thread
        )
        _add_servicer(_Servicer(self), server)
        try:
            if self.tls is None:
                log.warning(
                    "serving on %s WITHOUT TLS (insecure): traffic can be read and altered; "
                    "use a certificate (`pollinate certs`) outside a trusted network",
                    self.requested_address,
                )
                self.port = server.add_insecure_port(self.requested_address)
            else:
                cert_pem, key_pem = self.tls
                creds = grpc.ssl_server_credentials([(key_pem, cert_pem)])
                self.port = server.add_secure_port(self.requested_address, creds)
        except RuntimeError as e:
            raise ConfigError(
                f"cannot listen on {self.requested_address}: {e}; is the address right and "
                "the port free?"
            ) from None
        if not self.authenticates:
            log.warning(
                "no client allow-list: any client may register with any client id; give the "
                "server an allow-list of public keys (`pollinate keys`) to authenticate clients"
            )
        self._started = time.monotonic()
        server.start()
        self._server = server
        self._watcher = threading.Thread(
            target=self._watch, name="pollinate-heartbeats", daemon=True
        )
        self._watcher.start()
        log.debug("listening on %s (run %s)", self.address, self.run_id or "-")
        return self

    def stop(self, grace: float = 1.0, *, finished: str | None = None) -> None:
        """Close every client stream and stop serving. Clients reconnect, unless ``finished``
        says why the run is over: then they are told so and stop."""
        if self._server is None:
            return
        with self._lock:
            self._stopping = True
            conns = list(self._all)
        self._stop.set()
        for conn in conns:
            if finished is not None:
                conn.close(finished, finished=True)
            else:
                conn.close("the server is shutting down")
        if finished is not None:  # each stream ends once its client has read Finished
            deadline = time.monotonic() + CLOSE_GRACE_S + 1.0
            while not all(c.finished for c in conns) and time.monotonic() < deadline:
                time.sleep(0.02)
        if not self._server.stop(grace).wait(grace + 10.0):
            log.warning("the gRPC server did not finish shutting down within %.0f s", grace + 10)
        if self._watcher is not None:
            self._watcher.join()
        if self._pool is not None:
            self._pool.shutdown(wait=False)
        self._server = None

    def __enter__(self) -> FleetServer:
        return self.start() if self._server is None else self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- the registry -----------------------------------------------------------------

    def connected(self) -> list[ClientId]:
        """The ids of the clients registered now, sorted."""
        with self._lock:
            return sorted(self._clients)

    def wait_for(self, n: int, timeout: float | None = None) -> bool:
        """Block until at least ``n`` clients are connected; False if ``timeout`` passed first."""
        with self._changed:
            return self._changed.wait_for(lambda: len(self._clients) >= n, timeout)

    def status(self) -> dict[str, Any]:
        """What ``Fleet.Status`` answers: run id, round, connected clients, tasks in flight,
        the transport's settings and the result memory in use."""
        with self._lock:
            clients = sorted(self._clients)
            in_flight = sum(len(c.tasks) for c in self._clients.values())
        return {
            "run_id": self.run_id,
            "round": self.round,
            "connected": clients,
            "clients": len(clients),
            "tasks_in_flight": in_flight,
            "heartbeat_s": self.heartbeat_s,
            "result_memory_bytes": self.result_memory.limit,
            "results_held_bytes": self.result_memory.held,
            "stall_s": self.stall_s,
            "max_streams": self.max_streams,
            "max_unregistered": self.max_unregistered,
            "max_metrics_keys": self.max_metrics_keys,
            "max_metrics_bytes": self.max_metrics_bytes,
            "refused_streams": self.refused_streams,
            "max_corrupt_uploads": self.max_corrupt_uploads,
            "corrupted_uploads": self.corrupted_uploads,
            "uptime_s": self._uptime(),
            **self.progress,
        }

    def status_for(self, request: pb.StatusRequest) -> dict[str, Any]:
        """What ``Fleet.Status`` answers ``request``: the full :meth:`status` when the request
        is signed by an allow-listed client (or the server authenticates nobody), otherwise
        only counts: run id, round, how many clients are connected, and why no more."""
        if not self.authenticates:
            return self.status()
        why = "send the request signed with an allow-listed client's key for the full status"
        if request.HasField("signed"):
            try:
                self._verify("status", request.client_id, status_digest(), request)
                return self.status()
            except AuthError as e:
                why = str(e)
        with self._lock:
            count = len(self._clients)
        return {
            "run_id": self.run_id,
            "round": self.round,
            "clients": count,
            "uptime_s": self._uptime(),
            "authenticated": False,
            "details": why,
        }

    def _uptime(self) -> float:
        return round(time.monotonic() - self._started, 1) if self._started else 0.0

    def _join(
        self, requests: Iterator[pb.ClientMessage | Malformed], context: grpc.ServicerContext
    ) -> Iterator[pb.ServerMessage | bytes]:
        conn = Connection(self, context)
        with self._lock:
            if self._stopping:
                return iter(())
            waiting = sum(1 for c in self._all if c.client_id is None and not c.closed)
            if waiting < self.max_unregistered:
                self._all.add(conn)
            else:
                self.refused_streams += 1
        if conn not in self._all:  # shed a flood of streams that do not register
            if self.refused_streams in (1, 10, 100) or self.refused_streams % 1000 == 0:
                log.warning(
                    "refused %d streams so far: %d streams have not registered yet "
                    "(max_unregistered)",
                    self.refused_streams,
                    waiting,
                )
            context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"the server has {waiting} streams that have not registered yet (its maximum); "
                "try again later",
            )
        context.add_callback(conn.ended)
        threading.Thread(
            target=conn.read, args=(requests,), name="pollinate-reader", daemon=True
        ).start()
        return conn.outgoing()

    def _register(self, conn: Connection, reg: pb.Register) -> None:
        if reg.protocol != PROTOCOL:
            raise ProtocolError(
                f"the client speaks protocol {reg.protocol}, this server {PROTOCOL}: install "
                "the same pollinate version on both sides"
            )
        cid = reg.client_id
        if cid < 0:
            raise ProtocolError(f"client id must be >= 0, got {cid}")
        digest = register_digest(cid, reg.public_key, reg.version, reg.protocol)
        self._verify("register", cid, digest, reg, public_key=reg.public_key or None)
        if self.on_register is not None:  # may refuse the client by raising a PollinateError
            key = reg.public_key if len(reg.public_key) <= 100 else ""  # verified if authenticating
            try:
                self.on_register(cid, key)
            except PollinateError as e:
                raise ProtocolError(str(e)) from None
        listed = self._listed_keys().get(cid, "") if self.authenticates else ""
        with self._lock:
            if self._stopping or conn.closed:
                return  # the stream is ending anyway; no Reject: the client may come back
            old = self._clients.get(cid)
            conn.public_key = listed
            conn.client_id = cid
            self._clients[cid] = conn
            self._changed.notify_all()
        if old is not None and old is not conn:
            old.close(
                f"client {cid} registered again from {conn.peer}; this older stream is closed",
                reject=True,
            )
        conn.send(
            pb.ServerMessage(
                welcome=pb.Welcome(
                    run_id=self.run_id,
                    heartbeat_s=self.heartbeat_s,
                    chunk_bytes=self.chunk_bytes,
                    max_payload_bytes=self.max_payload_bytes,
                    max_metrics_keys=self.max_metrics_keys,
                    max_metrics_bytes=self.max_metrics_bytes,
                )
            )
        )
        log.info("client %d registered from %s (pollinate %s)", cid, conn.peer, reg.version[:40])

    def _verify(
        self,
        kind: str,
        client_id: int,
        digest: bytes,
        msg: pb.Register | pb.Result | pb.StatusRequest,
        public_key: str | None = None,
    ) -> None:
        if not self.authenticates:
            return
        assert self.verifier is not None
        if not msg.HasField("signed"):
            raise AuthError(
                f"the {kind} request of client {client_id} is not signed: this server "
                "authenticates clients; run the client with its private key"
            )
        self.verifier.verify(
            kind, client_id, digest, from_signed(msg.signed), public_key=public_key
        )

    def _listed_keys(self) -> dict[int, str]:
        """The allow-list now: client id -> base64 public key ({} without one)."""
        if self.verifier is None or self.verifier.allow_list is None:
            return {}
        try:
            return self.verifier.allow_list.listed()
        except ConfigError:  # unreadable right now: every request is refused until fixed
            return {}

    def _revoke(self) -> None:
        """Close the stream of every client whose line left the allow-list (or whose key on it
        changed) since it registered: revocation takes effect at once."""
        allow_list = self.verifier.allow_list if self.verifier is not None else None
        if allow_list is None:
            return
        try:
            listed = allow_list.listed()
        except ConfigError:
            return  # a malformed file refuses every request until fixed; streams stay
        if allow_list.version == self._allow_list_version:
            return
        self._allow_list_version = allow_list.version
        with self._lock:
            registered = list(self._clients.items())
        for cid, conn in registered:
            key = listed.get(cid)
            if key is None:
                conn.close(
                    f"client {cid} was removed from the server's allow-list (revoked)",
                    reject=True,
                )
            elif conn.public_key and key != conn.public_key:
                conn.close(
                    f"client {cid}'s key on the server's allow-list was replaced; the client "
                    "must register again with the new key",
                    reject=True,
                )

    def _upload_corrupted(self, conn: Connection) -> int:
        """Count a result of ``conn``'s client that failed its SHA-256; how many in a row."""
        assert conn.client_id is not None
        with self._streak_lock:
            self.corrupted_uploads += 1
            streak = self._corrupt_streaks.get(conn.client_id, 0) + 1
            self._corrupt_streaks[conn.client_id] = streak
        return streak

    def _upload_verified(self, conn: Connection) -> None:
        """A result of ``conn``'s client passed its SHA-256: its run of bad uploads is over."""
        if conn.client_id is not None and conn.client_id in self._corrupt_streaks:
            with self._streak_lock:
                self._corrupt_streaks.pop(conn.client_id, None)

    def _forget(self, conn: Connection, *, finished: bool = False) -> None:
        with self._lock:
            if conn.client_id is not None and self._clients.get(conn.client_id) is conn:
                del self._clients[conn.client_id]
                self._changed.notify_all()
            if finished:
                self._all.discard(conn)

    def _watch(self) -> None:
        """Close connections that went silent, that never registered, whose result stalled or
        whose client was revoked; cancel closed streams that do not end."""
        period = min(0.5, self.heartbeat_s / 4, self.stall_s / 4, self.register_timeout_s / 4)
        dead_after = 3 * self.heartbeat_s
        while not self._stop.wait(period):
            self._revoke()
            now = time.monotonic()
            with self._lock:
                conns = list(self._all)
            for conn in conns:
                if not conn.closed:
                    silent = now - conn.last_seen
                    if silent > dead_after and not conn.waiting:  # waiting: held back by us
                        conn.close(
                            f"no message for {silent:.1f} s (3 x heartbeat_s = {dead_after:g} s)"
                        )
                    elif not conn.spoke and now - conn.opened > self.register_timeout_s:
                        conn.close(
                            f"no Register within {self.register_timeout_s:g} s of connecting "
                            "(register_timeout_s)"
                        )
                    elif (stalled := conn.stalled(now, self.stall_s)) is not None:
                        conn.close(stalled)
                elif not conn.finished and now - conn.closed_at > CLOSE_GRACE_S:
                    conn.finished = True
                    conn.context.cancel()
                    self._forget(conn, finished=True)

    # --- tasks (used by GrpcExecutor) -------------------------------------------------

    def _give(
        self,
        client_id: ClientId,
        kind: TaskKind,
        round_number: int,
        config: Config,
        arrays: Broadcast,
        sink: queue.Queue[Any],
        max_result_bytes: int | None = None,
    ) -> Pending | None:
        with self._lock:
            conn = self._clients.get(client_id)
        if conn is None:
            return None
        limit = min(self.max_payload_bytes, max_result_bytes or self.max_payload_bytes)
        task_id = f"{round_number}.{kind}.{client_id}.{next(self._ids)}"
        header = pb.ServerMessage(
            task=pb.Task(
                task_id=task_id,
                kind=kind,
                round=round_number,
                config_json=dumps_scalars(config, "config"),
                payload_size=arrays.size,
                payload_sha256=arrays.sha256,
                max_result_bytes=limit,
            )
        )
        pending = Pending(task_id, client_id, kind, sink, conn, limit)
        return pending if conn.give(pending, header, arrays) else None


class GrpcExecutor:
    """Runs a round's tasks on connected clients; the ``server.Executor`` for deployment.

    Like the simulation executor it adds each client's ``seed`` to the task config (same
    seeds as in simulation), and with ``deterministic=True`` hands outcomes on in client-id
    order. The round's Arrays are serialized once and the same chunks go to every client.

    Each task bounds the result it accepts: ``max_result_bytes`` if ``submit`` is given one
    (e.g. by a strategy that compresses updates, or another framework's serialization), else
    the task's serialized Arrays × ``result_size_factor``, at least ``min_result_bytes``. A
    client that declares more is refused before anything is reserved for it.
    """

    def __init__(
        self,
        fleet: FleetServer,
        *,
        seed: int = 0,
        deterministic: bool = False,
        result_size_factor: float = DEFAULT_RESULT_SIZE_FACTOR,
        min_result_bytes: int = DEFAULT_MIN_RESULT_BYTES,
    ) -> None:
        if not (isinstance(result_size_factor, (int, float)) and result_size_factor >= 1):
            raise ConfigError(f"result_size_factor must be >= 1, got {result_size_factor}")
        if min_result_bytes < 1:
            raise ConfigError(f"min_result_bytes must be >= 1, got {min_result_bytes}")
        self.fleet = fleet
        self.seed = seed
        self.deterministic = deterministic
        self.result_size_factor = float(result_size_factor)
        self.min_result_bytes = min_result_bytes

    def expected_result_bytes(self, payload_bytes: int) -> int:
        """The largest result accepted for a task whose Arrays take ``payload_bytes``."""
        return max(self.min_result_bytes, math.ceil(payload_bytes * self.result_size_factor))

    def submit(
        self,
        round_number: int,
        kind: TaskKind,
        plan: Sequence[tuple[ClientId, Instructions]],
        timeout_s: float,
        *,
        max_result_bytes: int | None = None,
    ) -> Iterator[Outcome]:
        if max_result_bytes is not None and max_result_bytes < 1:
            raise ConfigError(f"max_result_bytes must be >= 1, got {max_result_bytes}")
        deadline = time.monotonic() + timeout_s
        stream = self._stream(round_number, kind, plan, deadline, max_result_bytes)
        return in_order(stream, self.deterministic)

    def _stream(
        self,
        round_number: int,
        kind: TaskKind,
        plan: Sequence[tuple[ClientId, Instructions]],
        deadline: float,
        max_result_bytes: int | None = None,
    ) -> Iterator[Outcome]:
        self.fleet.round = round_number
        sink: queue.Queue[Any] = queue.Queue()
        payloads: dict[int, Broadcast] = {}  # one per distinct Arrays object: usually one
        outstanding: dict[str, Pending] = {}
        absent: list[Outcome] = []
        try:
            for cid, ins in plan:
                key = id(ins.arrays)
                if key not in payloads:
                    payloads[key] = broadcast(ins.arrays, self.fleet.chunk_bytes)
                config = {**ins.config, "seed": task_seed(self.seed, round_number, cid)}
                payload = payloads[key]
                limit = max_result_bytes or self.expected_result_bytes(payload.size)
                pending = self.fleet._give(cid, kind, round_number, config, payload, sink, limit)
                if pending is None:
                    absent.append(Outcome(cid, kind, error=f"client {cid} is not connected"))
                else:
                    outstanding[pending.task_id] = pending
            payloads.clear()
            yield from absent
            while outstanding:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                try:
                    task_id, outcome, held = sink.get(timeout=remaining)
                except queue.Empty:
                    break
                yield from self._deliver(outstanding, task_id, outcome, held)
            # the deadline passed: whatever has not answered is a straggler
            for task_id, pending in list(outstanding.items()):
                if pending.expire():
                    del outstanding[task_id]
                    pending.conn.cancel(task_id, "the round deadline passed")
                    yield pending.failed("timeout: no result before the round deadline")
            while outstanding:  # outcomes that landed while we were expiring the rest
                yield from self._deliver(outstanding, *sink.get())
        finally:  # the consumer stopped early: free the clients' slots and the results' memory
            for pending in outstanding.values():
                if pending.expire():
                    pending.conn.cancel(pending.task_id, "the server stopped waiting for this task")
            while not sink.empty():
                release(sink.get_nowait()[2])
            give_memory_back()

    @staticmethod
    def _deliver(
        outstanding: dict[str, Pending], task_id: str, outcome: Outcome, held: Any
    ) -> Iterator[Outcome]:
        """Yield one outcome from the sink; its result memory is freed once the consumer has
        taken it in (it asks for the next one) or stopped."""
        try:
            if outstanding.pop(task_id, None) is not None:
                yield outcome
        finally:
            release(held)
