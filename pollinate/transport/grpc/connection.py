"""One client's stream on the server: what it was given, what it is sending, how it ends.

A :class:`Connection` has two threads: gRPC's, which drains the outbox into the stream
(:meth:`Connection.outgoing`), and a reader, which handles what the client sends
(:meth:`Connection.read`). Every task given to the client is a :class:`Pending` that ends
exactly once: with the client's result, with a failure when the stream breaks or is closed,
or expired by the executor at the deadline. A result whose bytes fail their SHA-256 (damaged
in transit) ends its task with a ``corrupted: …`` failure and the stream carries on, unless
the client's uploads failed ``max_corrupt_uploads`` times in a row. Used by
``server.FleetServer``; not public API.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pollinate.errors import ConfigError
from pollinate.limits import MAX_REASON_CHARS, check_metrics
from pollinate.transport.grpc import pollinate_pb2 as pb
from pollinate.transport.grpc.auth import AuthError
from pollinate.transport.grpc.codec import (
    Assembler,
    Broadcast,
    CorruptPayload,
    ProtocolError,
    decode,
    loads_scalars,
    result_digest,
)
from pollinate.types import ClientId, EvaluateRes, Metrics, Outcome, QueryRes, TaskKind, TrainRes

if TYPE_CHECKING:
    import grpc

    from pollinate.transport.grpc.server import FleetServer

log = logging.getLogger("pollinate")

CLOSE = object()  # wakes a connection's sender to end the stream
EXPIRED_KEPT = 1024  # task ids of timed-out tasks remembered per connection
CLOSE_GRACE_S = 5.0  # a closed stream that has not ended after this is cancelled


class ResultMemory:
    """Bounds the bytes of client results held by the server: being received, or received and
    waiting for the aggregation to take them.

    A connection's reader asks for a result's declared size (once its header is authenticated
    and the size is within the task's expected bound) before reassembling it, and waits while
    the bound would be passed. A waiting reader reads nothing from its stream, so gRPC's flow
    control holds that client back until the aggregation has caught up: server memory stays
    near ``limit`` however many clients answer at once, instead of growing with clients x model.

    A result is always let in beside at most one other reservation, whatever the sizes: a
    result larger than ``limit`` waits its turn instead of deadlocking, and one client that
    holds a reservation without sending its bytes cannot hold the others back (its stream is
    closed after ``stall_s``, see ``FleetServer``). So at most ``max(limit, the two largest
    results)`` bytes are held at once.
    """

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ConfigError(f"result_memory_bytes must be >= 1, got {limit}")
        self.limit = limit
        self.held = 0
        self.count = 0  # reservations held
        self.peak = 0  # the most bytes held at once
        self.waits = 0  # results that had to wait for room
        self._cond = threading.Condition()

    def hold(self, n: int, keep_waiting: Callable[[], bool]) -> Held | None:
        """Reserve ``n`` bytes, waiting while they do not fit; None if ``keep_waiting()`` turns
        False first (the connection closed)."""
        with self._cond:
            if not self._fits(n):
                self.waits += 1
            while not self._fits(n):
                if not keep_waiting():
                    return None
                self._cond.wait(0.25)
            if not keep_waiting():
                return None
            self.held += n
            self.count += 1
            self.peak = max(self.peak, self.held)
        return Held(self, n)

    def _fits(self, n: int) -> bool:
        return self.count <= 1 or self.held + n <= self.limit

    def _release(self, n: int) -> None:
        with self._cond:
            self.held -= n
            self.count -= 1
            self._cond.notify_all()


class Held:
    """Bytes reserved in a :class:`ResultMemory` for one result; ``release`` is idempotent."""

    def __init__(self, memory: ResultMemory, n: int) -> None:
        self._memory: ResultMemory | None = memory
        self.n = n

    def release(self) -> None:
        memory, self._memory = self._memory, None
        if memory is not None:
            memory._release(self.n)


def release(held: Held | None) -> None:
    if held is not None:
        held.release()


class Pending:
    """One task given to one client, until its outcome is known (exactly once)."""

    def __init__(
        self,
        task_id: str,
        client_id: ClientId,
        kind: TaskKind,
        sink: queue.Queue[Any],
        conn: Connection,
        max_result_bytes: int,
    ) -> None:
        self.task_id = task_id
        self.max_result_bytes = max_result_bytes  # the largest result payload accepted
        self.conn = conn
        self.client_id = client_id
        self.kind = kind
        self.sink = sink
        self.sent_at = time.monotonic()
        self.done = False
        self._lock = threading.Lock()

    def finish(self, outcome: Outcome, held: Held | None = None) -> bool:
        """Deliver ``outcome`` unless the task already ended; return whether it was delivered.

        ``held``: the result's reserved memory, released by whoever takes it from the sink."""
        with self._lock:
            if self.done:
                release(held)
                return False
            self.done = True
            self.sink.put((self.task_id, outcome, held))
            return True

    def expire(self) -> bool:
        """End the task without an outcome (the executor reports it); False if already ended."""
        with self._lock:
            if self.done:
                return False
            self.done = True
            return True

    def failed(self, reason: str) -> Outcome:
        return Outcome(
            self.client_id, self.kind, error=reason, seconds=time.monotonic() - self.sent_at
        )


@dataclass
class Send:
    """A task header and its Arrays (shared chunk frames), queued for one connection."""

    pending: Pending
    header: pb.ServerMessage
    arrays: Broadcast


@dataclass
class Incoming:
    """A result whose Arrays are arriving in chunks (``pending`` None: discard it)."""

    pending: Pending | None
    header: pb.Result
    metrics: Metrics
    assembler: Assembler
    held: Held | None = None  # its bytes in the fleet's ResultMemory
    progress_at: float = field(default_factory=time.monotonic)  # when its last chunk came


class Connection:
    """One client's stream: its outbox, the tasks it holds, the results it is sending."""

    def __init__(self, fleet: FleetServer, context: grpc.ServicerContext) -> None:
        self.fleet = fleet
        self.context = context
        self.peer = context.peer()
        self.client_id: ClientId | None = None
        self.outbox: queue.Queue[Any] = queue.Queue()
        self.lock = threading.Lock()
        self.tasks: dict[str, Pending] = {}
        self.receiving: dict[str, Incoming] = {}
        self.expired: OrderedDict[str, None] = OrderedDict()
        self.opened = self.last_seen = time.monotonic()
        self.spoke = False  # it sent a first message (Register, if it is in protocol)
        self.public_key = ""  # base64 of its key on the allow-list, once registered
        self.closed = False
        self.closed_at = 0.0
        self.waiting = False  # the reader waits for result memory (see ResultMemory)
        self.finished = False  # the stream has ended (or was cancelled)
        self.final: pb.ServerMessage | None = None
        self.hung_up = threading.Event()  # the RPC is over on the client's side too

    @property
    def name(self) -> str:
        who = "unregistered peer" if self.client_id is None else f"client {self.client_id}"
        return f"{who} ({self.peer})"

    # --- sending ----------------------------------------------------------------------

    def outgoing(self) -> Iterator[pb.ServerMessage | bytes]:
        """The server's half of the stream: the outbox, with heartbeats when it is idle."""
        try:
            while not self.closed:
                try:
                    item = self.outbox.get(timeout=self.fleet.heartbeat_s)
                except queue.Empty:
                    yield pb.ServerMessage(heartbeat=pb.Heartbeat(sent_at=time.time()))
                    continue
                if item is CLOSE:
                    break
                if isinstance(item, Send):
                    yield from self._task_messages(item)
                else:
                    yield item
            if self.final is not None:
                yield self.final
                if self.final.WhichOneof("body") == "finished":
                    # Keep the stream open until the client hangs up, which it does once it
                    # has read Finished: a server that exits right after would otherwise reset
                    # connections with Finished still unread, and those clients would retry
                    # forever. Bounded, for clients that never hang up.
                    self.hung_up.wait(CLOSE_GRACE_S)
        finally:
            self.finished = True
            self.close("the stream ended")
            self.fleet._forget(self, finished=True)

    def _task_messages(self, item: Send) -> Iterator[pb.ServerMessage | bytes]:
        pending = item.pending
        if pending.done:
            return
        yield item.header
        for frame in item.arrays.frames:  # the same bytes for every client: no copy here
            if pending.done or self.closed:
                return  # cancelled half-way: a Cancel message follows
            yield frame

    def send(self, msg: pb.ServerMessage) -> None:
        if not self.closed:
            self.outbox.put(msg)

    def give(self, pending: Pending, header: pb.ServerMessage, arrays: Broadcast) -> bool:
        """Queue a task for this client; False if the connection is already closed."""
        with self.lock:
            if self.closed:
                return False
            self.tasks[pending.task_id] = pending
        self.outbox.put(Send(pending, header, arrays))
        return True

    def cancel(self, task_id: str, reason: str) -> None:
        """Forget a task the executor gave up on; tell the client to drop it."""
        with self.lock:
            if self.tasks.pop(task_id, None) is None:
                return
            self.expired[task_id] = None
            while len(self.expired) > EXPIRED_KEPT:
                self.expired.popitem(last=False)
            incoming = self.receiving.get(task_id)
            if incoming is not None:
                incoming.pending = None
                incoming.assembler.discard()
                release(incoming.held)
        self.send(pb.ServerMessage(cancel=pb.Cancel(task_id=task_id, reason=reason)))

    # --- closing ----------------------------------------------------------------------

    def ended(self) -> None:
        """gRPC's callback: the RPC is over (the client hung up, or the stream was cancelled)."""
        self.hung_up.set()
        self.close("the stream ended")

    def close(self, reason: str, *, reject: bool = False, finished: bool = False) -> None:
        """End the stream (with a Reject, or a Finished when the run is over, saying ``reason``);
        fail its tasks."""
        with self.lock:
            if self.closed:
                return
            self.closed = True
            self.closed_at = time.monotonic()
            if reject:
                self.final = pb.ServerMessage(reject=pb.Reject(reason=reason))
            elif finished:
                self.final = pb.ServerMessage(finished=pb.Finished(reason=reason))
            pending = list(self.tasks.values())
            self.tasks.clear()
            for incoming in self.receiving.values():
                release(incoming.held)
            self.receiving.clear()
        if reject:
            log.warning("%s rejected: %s", self.name, reason)
        elif self.client_id is not None and not self.fleet._stopping:
            log.info("%s disconnected: %s", self.name, reason)
        for p in pending:
            p.finish(p.failed(f"client {p.client_id} lost its connection: {reason}"))
        self.fleet._forget(self)
        self.outbox.put(CLOSE)

    # --- receiving --------------------------------------------------------------------

    def read(self, requests: Iterator[pb.ClientMessage | Malformed]) -> None:
        """The reader thread: handle each message the client sends until the stream ends."""
        try:
            for msg in requests:
                self.last_seen = time.monotonic()
                self.spoke = True
                if self.closed:
                    return
                try:
                    self._handle(msg)
                except (ProtocolError, AuthError) as e:
                    self.close(str(e), reject=True)
                    return
                except Exception:  # a server fault costs one stream (no Reject: it may retry)
                    log.exception("error handling a message from %s", self.name)
                    self.close("internal server error while handling its message")
                    return
        except Exception as e:  # the stream broke (client killed, network gone, cancelled)
            self.close(f"stream broken ({type(e).__name__})")
            return
        self.close("the client closed its stream")

    def _handle(self, msg: pb.ClientMessage | Malformed) -> None:
        if isinstance(msg, Malformed):
            raise ProtocolError(f"a frame that is not a valid ClientMessage ({msg.error})")
        which = msg.WhichOneof("body")
        if self.client_id is None:
            if which != "register":
                raise ProtocolError(f"the first message must be Register, got {which or 'none'}")
            self.fleet._register(self, msg.register)
        elif which == "heartbeat":
            return
        elif which == "result":
            self._on_result(msg.result)
        elif which == "chunk":
            with self.lock:
                corrupted = self._on_chunk(msg.chunk)
            if corrupted is not None:
                self._on_corrupted(*corrupted)
        elif which == "register":
            raise ProtocolError("Register sent twice on one stream")
        else:
            raise ProtocolError("an empty message (no body)")

    def _on_result(self, res: pb.Result) -> None:
        """Check a Result header (its task, signature, metrics and declared size), then hand
        the outcome on, or get ready to receive its Arrays (see :meth:`_receive`)."""
        assert self.client_id is not None
        tid = res.task_id
        with self.lock:
            if tid in self.receiving:
                raise ProtocolError(f"a second Result for task {tid!r}")
            pending = self.tasks.get(tid)
            if pending is None and tid not in self.expired:
                raise ProtocolError(
                    f"a Result for task {tid!r}, which this client was not given or already "
                    "answered"
                )
        self.fleet._verify("result", self.client_id, result_digest(res), res)
        metrics = self._metrics(res)
        if res.num_examples < 0:
            raise ProtocolError(f"num_examples must be >= 0, got {res.num_examples}")
        kind = pending.kind if pending is not None else None
        if not res.ok or kind == "evaluate":
            if res.payload_size:
                raise ProtocolError(f"task {tid!r}: a failed or evaluate result carries no Arrays")
        elif kind in ("train", "query") and not res.payload_size:
            raise ProtocolError(f"task {tid!r}: a {kind} result must carry Arrays")
        if res.payload_size:
            self._receive(res, pending, metrics)
            return
        with self.lock:
            if pending is None or self.tasks.get(tid) is not pending:
                return  # a late answer to a task that timed out (or just did)
            del self.tasks[tid]
        if not res.ok:
            reason = res.error.strip()[:MAX_REASON_CHARS]
            pending.finish(
                pending.failed(reason or "the client reported a failure without a reason")
            )
        else:
            result = EvaluateRes(res.loss, res.num_examples, metrics)
            pending.finish(self._outcome(pending, result))

    def _metrics(self, res: pb.Result) -> Metrics:
        """The result's metrics, within the fleet's bounds (``ProtocolError`` otherwise)."""
        fleet = self.fleet
        if len(res.metrics_json) > 6 * fleet.max_metrics_bytes + 64:  # JSON escapes: <= 6x
            raise ProtocolError(
                f"task {res.task_id!r}: the metrics take {len(res.metrics_json)} characters of "
                f"JSON, far more than the {fleet.max_metrics_bytes} bytes allowed per result"
            )
        metrics = loads_scalars(res.metrics_json, "metrics")
        problem = check_metrics(metrics, fleet.max_metrics_keys, fleet.max_metrics_bytes)
        if problem is not None:
            raise ProtocolError(f"task {res.task_id!r}: {problem}")
        return metrics

    def _receive(self, res: pb.Result, pending: Pending | None, metrics: Metrics) -> None:
        """Reserve result memory for an authenticated header whose declared size is within the
        task's bound (waiting for room if needed), then expect its chunks.

        A result for a task that expired, or that expires while waiting, is checked chunk by
        chunk but not kept, and holds no memory."""
        tid, size = res.task_id, res.payload_size
        limit = pending.max_result_bytes if pending is not None else self.fleet.max_payload_bytes
        if size > limit:
            raise ProtocolError(
                f"task {tid!r}: the result declares {size} bytes of Arrays, which exceeds the "
                f"limit of {limit} bytes for this task (the round's expected update size: the "
                "model's payload times the server's result_size_factor)"
            )
        if len(res.payload_sha256) != 32:
            raise ProtocolError(
                f"task {tid!r}: payload SHA-256 must be 32 bytes, got {len(res.payload_sha256)}"
            )
        held = self._hold(size, pending) if pending is not None else None
        with self.lock:
            if self.closed:  # close() already released what this stream held
                release(held)
                return
            keep = held is not None and pending is not None and self.tasks.get(tid) is pending
            if not keep:  # expired while its reader waited for room: checked, not kept
                release(held)
                held = None
            try:
                assembler = Assembler(
                    f"result of task {tid!r}", size, res.payload_sha256, max_bytes=limit, keep=keep
                )
            except BaseException:
                release(held)
                raise
            self.receiving[tid] = Incoming(pending if keep else None, res, metrics, assembler, held)

    def _hold(self, size: int, pending: Pending) -> Held | None:
        """Reserve ``size`` bytes of result memory; None if the task ends or the stream closes
        while waiting (see ResultMemory)."""
        self.waiting = True  # the watcher does not count this silence against the client
        try:
            return self.fleet.result_memory.hold(size, lambda: not self.closed and not pending.done)
        finally:
            self.last_seen = time.monotonic()
            self.waiting = False

    def stalled(self, now: float, stall_s: float) -> str | None:
        """Why this stream's result transfer counts as stalled (None if it does not): no chunk
        of a result in progress for more than ``stall_s``."""
        with self.lock:
            for tid, incoming in self.receiving.items():
                idle = now - incoming.progress_at
                if idle > stall_s:
                    got, size = incoming.assembler.received, incoming.assembler.size
                    return (
                        f"its result for task {tid} stalled: no bytes for {idle:.1f} s after "
                        f"{got} of {size} (stall_s = {stall_s:g} s)"
                    )
        return None

    def _on_chunk(self, chunk: pb.Chunk) -> tuple[str, Pending | None, str] | None:
        """Take a chunk of a result (the caller holds ``lock``); when the result is whole but
        fails its SHA-256, drop it and return ``(task_id, its pending task or None, why)``."""
        incoming = self.receiving.get(chunk.task_id)
        if incoming is None:
            raise ProtocolError(
                f"a Chunk for task {chunk.task_id!r}, which has no Result header before it"
            )
        try:
            done = incoming.assembler.add(chunk.offset, chunk.data, chunk.last)
        except CorruptPayload as e:  # whole and well framed, but damaged: refuse this result
            del self.receiving[chunk.task_id]
            release(incoming.held)
            pending = incoming.pending
            if pending is not None:
                self.tasks.pop(pending.task_id, None)
            return chunk.task_id, pending, str(e)
        incoming.progress_at = time.monotonic()
        if not done:
            return None
        del self.receiving[chunk.task_id]
        self.fleet._upload_verified(self)
        pending = incoming.pending
        if pending is None:
            release(incoming.held)
            return None
        try:
            arrays = decode(incoming.assembler.result(), self.fleet.max_payload_bytes)
        except BaseException:
            release(incoming.held)
            raise
        self.tasks.pop(pending.task_id, None)
        res = incoming.header
        kind = QueryRes if pending.kind == "query" else TrainRes
        result = kind(arrays, res.num_examples, incoming.metrics)
        pending.finish(self._outcome(pending, result), incoming.held)
        return None

    def _on_corrupted(self, task_id: str, pending: Pending | None, detail: str) -> None:
        """A result failed its SHA-256: the task fails with ``corrupted: …`` (its memory is
        already released) and the client is told; the stream stays open, as the header was
        checked (signature, bounds) and the framing was sound, unless this client's uploads
        failed ``max_corrupt_uploads`` times in a row: then it is rejected, saying so."""
        why = f"corrupted: the upload failed its SHA-256 check and was rejected ({detail})"
        if pending is not None:
            pending.finish(pending.failed(why))
        streak, limit = self.fleet._upload_corrupted(self), self.fleet.max_corrupt_uploads
        log.warning(
            "%s: its result for task %s was rejected, %d in a row (at most %d): %s",
            self.name,
            task_id,
            streak,
            limit,
            why,
        )
        if streak >= limit:
            self.close(
                f"{streak} uploads in a row failed their SHA-256 check (max_corrupt_uploads = "
                f"{limit}): check the client's network and memory; last: {detail}",
                reject=True,
            )
            return
        self.send(pb.ServerMessage(cancel=pb.Cancel(task_id=task_id, reason=why)))

    @staticmethod
    def _outcome(pending: Pending, result: TrainRes | EvaluateRes | QueryRes) -> Outcome:
        seconds = time.monotonic() - pending.sent_at
        return Outcome(pending.client_id, pending.kind, result=result, seconds=seconds)


@dataclass(frozen=True)
class Malformed:
    """A frame that does not parse as a ClientMessage (refused by the reader with a Reject)."""

    error: str


def parse_client_message(data: bytes) -> pb.ClientMessage | Malformed:
    # parsing never raises into gRPC: its own "Exception deserializing request!" abort gives
    # the client no reason and can leave the server unable to shut down (grpcio 1.85)
    try:
        return pb.ClientMessage.FromString(data)
    except Exception as e:
        return Malformed(f"{type(e).__name__}: {e}")
