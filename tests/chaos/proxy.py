"""A fault-injecting TCP proxy on 127.0.0.1, for the chaos tests.

:class:`ChaosProxy` listens on an ephemeral port of 127.0.0.1 and relays every connection it
accepts to ``127.0.0.1:<target_port>`` (the gRPC server), two directions per connection:
``up`` (client → server) and ``down`` (server → client). Each connection gets a plan of
:class:`Fault` values from a seeded :class:`Schedule`:

- ``latency``: every byte in that direction is held ``delay_s`` before it is forwarded;
- ``bandwidth``: that direction moves at most ``bytes_per_s``;
- ``reset``: after ``at_bytes`` bytes in that direction, both sockets are closed with a TCP
  RST (``SO_LINGER`` 0), as when a NAT box or a load balancer drops the connection;
- ``half_open``: after ``at_bytes`` bytes that direction stops moving, without closing; the
  other direction carries on. The connection is reset after ``hold_s`` (or as soon as the
  other direction ends), so a peer that never notices does not hang for ever;
- ``truncate``: of the read that crosses ``at_bytes``, only the bytes before ``at_bytes`` are
  forwarded (part of a frame, of a TLS record), then both sockets are closed with a FIN;
- ``flip``: the connection carries on, but one byte is inverted (XOR 0xFF) ``at_bytes`` bytes
  after each of the first ``count`` occurrences of ``marker`` in that direction (e.g. the
  magic bytes of a serialized payload: a transmission error that TCP's checksum missed, which
  only an end-to-end check can catch; meaningful without TLS, whose records would fail).

``latency``, ``bandwidth`` and ``flip`` shape a connection for its whole life; the three
others break it (at most one per connection). The plan of the n-th connection depends only on
the seed and n, not on the timing of the others. The proxy is bounded: at most
``Schedule.max_breaks`` connections are broken, none after ``Schedule.window_s`` seconds, none
after :meth:`calm`, and the whole proxy stops by itself after ``lifetime_s`` (every connection
reset). Tests stop it with :meth:`stop` (or as a context manager). :attr:`events` says what it
did, for failure messages; :attr:`moved` counts the bytes it delivered each way.

While the server is down (killed, restarting), the proxy keeps accepting and holds each new
connection for up to ``upstream_retry_s``, trying the server again every 50 ms, as a
listening socket that outlives the server does (systemd socket activation, a load balancer's
connection queue); with 0 it closes a connection the server does not take at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import struct
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

UP, DOWN = "up", "down"
BREAKS = ("reset", "half_open", "truncate")
KINDS = ("latency", "bandwidth", "flip", *BREAKS)
READ_BYTES = 64 << 10


@dataclass(frozen=True)
class Fault:
    """One fault on one direction of one connection (see the module docstring)."""

    kind: str
    direction: str = UP
    at_bytes: int = 0  # reset / half_open / truncate: where in the direction's bytes
    delay_s: float = 0.0  # latency
    bytes_per_s: float = 0.0  # bandwidth
    hold_s: float = 10.0  # half_open: reset the connection after this long
    marker: bytes = b""  # flip: the bytes after which one is inverted
    count: int = 1  # flip: how many occurrences of marker get a flipped byte

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown fault kind {self.kind!r}: one of {', '.join(KINDS)}")
        if self.direction not in (UP, DOWN):
            raise ValueError(f"direction must be {UP!r} or {DOWN!r}, got {self.direction!r}")
        if self.kind == "bandwidth" and not self.bytes_per_s > 0:
            raise ValueError("a bandwidth fault needs bytes_per_s > 0")
        if self.kind == "flip" and not (self.marker and self.count >= 1):
            raise ValueError("a flip fault needs a marker and count >= 1")
        if self.at_bytes < 0 or self.delay_s < 0 or self.hold_s < 0:
            raise ValueError(f"negative setting in {self}")

    @property
    def breaks(self) -> bool:
        return self.kind in BREAKS

    def __str__(self) -> str:
        if self.kind == "latency":
            return f"latency {self.delay_s * 1000:.0f} ms {self.direction}"
        if self.kind == "bandwidth":
            return f"bandwidth {self.bytes_per_s / 1000:.0f} kB/s {self.direction}"
        if self.kind == "flip":
            return f"flip {self.direction} at {self.at_bytes} bytes after {self.marker!r}"
        return f"{self.kind} {self.direction} at byte {self.at_bytes}"


@dataclass
class Schedule:
    """Which faults the n-th connection gets: drawn from ``random.Random(f"{seed}:{n}")``.

    Every connection gets ``latency_s`` (a uniform draw from the range, each direction) and
    ``bytes_per_s`` (likewise) when those are set; with probability ``p_break`` it also gets
    one of ``breaks``, in a random direction, at a byte offset drawn from ``at_bytes``.
    ``fixed`` maps connection numbers to explicit plans (they win over the draw).
    """

    seed: int = 0
    p_break: float = 0.0
    breaks: Sequence[str] = BREAKS
    at_bytes: tuple[int, int] = (1_000, 20_000)
    latency_s: tuple[float, float] | None = None
    bytes_per_s: tuple[float, float] | None = None
    hold_s: float = 10.0
    max_breaks: int = 10
    window_s: float = 120.0
    fixed: dict[int, list[Fault]] = field(default_factory=dict)

    def plan(self, n: int) -> list[Fault]:
        """The faults drawn for connection number ``n`` (before the bounds are applied)."""
        if n in self.fixed:
            return list(self.fixed[n])
        rng = random.Random(f"{self.seed}:{n}")
        faults: list[Fault] = []
        for direction in (UP, DOWN):
            if self.latency_s is not None:
                faults.append(Fault("latency", direction, delay_s=rng.uniform(*self.latency_s)))
            if self.bytes_per_s is not None:
                faults.append(
                    Fault("bandwidth", direction, bytes_per_s=rng.uniform(*self.bytes_per_s))
                )
        if self.breaks and rng.random() < self.p_break:
            faults.append(
                Fault(
                    rng.choice(list(self.breaks)),
                    rng.choice((UP, DOWN)),
                    at_bytes=rng.randint(*self.at_bytes),
                    hold_s=self.hold_s,
                )
            )
        return faults


class _Link:
    """One relayed connection: both sockets, and what has been done to it."""

    def __init__(self, n: int, client: asyncio.StreamWriter, server: asyncio.StreamWriter) -> None:
        self.n = n
        self.writers = {UP: server, DOWN: client}  # where each direction's bytes go
        self.closed = asyncio.Event()
        self.stalled = False  # a direction is held half-open
        self.moved = {UP: 0, DOWN: 0}

    def abort(self, rst: bool) -> None:
        """Close both sockets at once; with ``rst``, peers see a connection reset."""
        for writer in self.writers.values():
            if rst:
                sock = writer.get_extra_info("socket")
                if sock is not None:
                    with contextlib.suppress(OSError):
                        sock.setsockopt(
                            socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
                        )
                writer.transport.abort()
            else:
                writer.close()
        self.closed.set()


class _Flipper:
    """Finds ``fault.marker`` in one direction's bytes and inverts the byte ``at_bytes`` after
    each of its first ``count`` occurrences, across read boundaries."""

    def __init__(self, fault: Fault) -> None:
        self.fault = fault
        self.tail = b""  # the last len(marker) - 1 bytes seen: a marker may span two reads
        self.found = 0
        self.targets: list[int] = []  # stream positions still to flip
        self.done: list[int] = []
        self.logged: list[int] = []

    def apply(self, data: bytes, start: int) -> bytes:
        """``data`` (stream bytes from position ``start``) with the due bytes flipped."""
        marker, f = self.fault.marker, self.fault
        window = self.tail + data
        base = start - len(self.tail)
        i = window.find(marker)
        while i >= 0 and self.found < f.count:
            self.found += 1
            self.targets.append(base + i + f.at_bytes)
            i = window.find(marker, i + 1)
        self.tail = window[-(len(marker) - 1) :] if len(marker) > 1 else b""
        end = start + len(data)
        due = [t for t in self.targets if start <= t < end]
        if not due:
            return data
        out = bytearray(data)
        for t in due:
            out[t - start] ^= 0xFF
            self.targets.remove(t)
            self.done.append(t)
        return bytes(out)


class ChaosProxy:
    """Relays ``127.0.0.1:port`` to ``127.0.0.1:target_port``, injecting ``schedule``'s faults.

    Runs its own event loop in a daemon thread from construction until :meth:`stop` or
    ``lifetime_s``, whichever comes first.
    """

    def __init__(
        self,
        target_port: int,
        schedule: Schedule | None = None,
        lifetime_s: float = 600.0,
        upstream_retry_s: float = 0.0,
    ) -> None:
        self.target_port = target_port
        self.upstream_retry_s = upstream_retry_s
        self.schedule = schedule if schedule is not None else Schedule()
        self.lifetime_s = lifetime_s
        self.port = 0
        self.connections = 0
        self.armed = 0  # connections given a breaking fault (bounded by max_breaks)
        self.fired: list[tuple[int, Fault]] = []  # (connection, fault) for each break done
        self.events: list[str] = []
        self.moved = {UP: 0, DOWN: 0}  # bytes delivered each way, over all connections
        self.flipped: list[tuple[int, str, int]] = []  # (connection, direction, byte) flipped
        self._calm = False
        self._started = time.monotonic()
        self._links: set[_Link] = set()
        self._ready = threading.Event()
        self._loop = asyncio.new_event_loop()
        self._stop: asyncio.Event | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="chaos-proxy", daemon=True)
        self._thread.start()
        if not self._ready.wait(30) or self._error is not None:
            raise RuntimeError(f"the chaos proxy did not start: {self._error!r}")

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def calm(self) -> None:
        """Break no more connections from now on (shaping goes on)."""
        self._calm = True
        self._log(-1, "calm: no more breaking faults")

    def stop(self) -> None:
        """Reset every connection, stop listening and end the proxy's thread."""
        if self._thread.is_alive() and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(30)
        if self._thread.is_alive():
            raise RuntimeError("the chaos proxy did not stop within 30 s")

    def __enter__(self) -> ChaosProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def report(self, last: int = 60) -> str:
        """What the proxy did (its last ``last`` events), for failure messages."""
        head = (
            f"chaos proxy 127.0.0.1:{self.port} -> {self.target_port}: "
            f"{self.connections} connections, {self.armed} armed to break, {len(self.fired)} broken"
        )
        return "\n".join([head, *self.events[-last:]])

    # --- the event loop -----------------------------------------------------------------

    def _log(self, n: int, what: str) -> None:
        who = f"conn {n}" if n >= 0 else "proxy"
        self.events.append(f"{time.monotonic() - self._started:8.3f}s {who}: {what}")

    def _run(self) -> None:
        try:
            self._loop.run_until_complete(self._main())
        except BaseException as e:  # reported by the constructor or by stop()
            self._error = e
            self._ready.set()
        finally:
            self._loop.close()

    async def _main(self) -> None:
        self._stop = asyncio.Event()
        server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = server.sockets[0].getsockname()[1]
        self._ready.set()
        try:
            await asyncio.wait_for(self._stop.wait(), self.lifetime_s)
        except asyncio.TimeoutError:
            self._log(-1, f"lifetime of {self.lifetime_s:g} s is over: stopping")
        server.close()
        for link in list(self._links):
            link.abort(rst=True)
        await server.wait_closed()
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._log(-1, "stopped")

    def _faults(self, n: int) -> list[Fault]:
        faults = self.schedule.plan(n)
        breaking = [f for f in faults if f.breaks]
        if breaking:
            late = time.monotonic() - self._started > self.schedule.window_s
            if self._calm or late or self.armed >= self.schedule.max_breaks:
                faults = [f for f in faults if not f.breaks]
            else:
                self.armed += 1
                faults = [f for f in faults if not f.breaks] + breaking[:1]
        return faults

    async def _accept(self, c_reader: asyncio.StreamReader, c_writer: asyncio.StreamWriter) -> None:
        n = self.connections
        self.connections += 1
        since = time.monotonic()
        while True:
            try:
                s_reader, s_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
                break
            except OSError as e:
                if time.monotonic() >= since + self.upstream_retry_s:  # may be lowered meanwhile
                    self._log(n, f"server unreachable ({e.strerror or e}): closed")
                    c_writer.transport.abort()
                    return
                await asyncio.sleep(0.05)
        faults = self._faults(n)
        link = _Link(n, c_writer, s_writer)
        self._links.add(link)
        self._log(n, "open" + (": " + ", ".join(map(str, faults)) if faults else ""))
        try:
            pipes = {
                asyncio.ensure_future(self._pipe(link, c_reader, UP, faults)),
                asyncio.ensure_future(self._pipe(link, s_reader, DOWN, faults)),
            }
            _, pending = await asyncio.wait(pipes, return_when=asyncio.FIRST_COMPLETED)
            if pending:
                if link.stalled and not link.closed.is_set():
                    self._log(n, "the other direction ended while half-open: reset")
                    link.abort(rst=True)
                await asyncio.wait(pending)  # a clean half-close: the rest drains
            for pipe in pipes:
                if not pipe.cancelled() and pipe.exception() is not None:
                    self._log(n, f"relay error: {pipe.exception()!r}")
        finally:
            if not link.closed.is_set():
                link.abort(rst=False)
            self._links.discard(link)
            self._log(n, f"closed after {link.moved[UP]} bytes up, {link.moved[DOWN]} down")

    async def _pipe(
        self, link: _Link, reader: asyncio.StreamReader, direction: str, faults: list[Fault]
    ) -> None:
        """Move one direction's bytes: read, apply the faults, hand over to the writer."""
        delay = sum(f.delay_s for f in faults if f.kind == "latency" and f.direction == direction)
        rates = [
            f.bytes_per_s for f in faults if f.kind == "bandwidth" and f.direction == direction
        ]
        brk = next((f for f in faults if f.breaks and f.direction == direction), None)
        flip = next((f for f in faults if f.kind == "flip" and f.direction == direction), None)
        flipper = _Flipper(flip) if flip is not None else None
        queue: asyncio.Queue[tuple[float, Any]] = asyncio.Queue()
        deliver = asyncio.ensure_future(
            self._deliver(link, direction, queue, min(rates, default=0))
        )
        read = 0
        try:
            while not link.closed.is_set():
                try:
                    data = await reader.read(READ_BYTES)
                except (ConnectionError, OSError):  # the peer reset: so does the proxy
                    link.abort(rst=True)
                    break
                due = time.monotonic() + delay
                if not data:
                    queue.put_nowait((due, "eof"))
                    break
                if brk is not None and read + len(data) > brk.at_bytes:
                    cut = brk.at_bytes - read
                    if cut > 0:
                        queue.put_nowait((due, data[:cut]))
                    queue.put_nowait((due, brk))
                    if brk.kind == "half_open":  # read no more: the sender's window fills up
                        link.stalled = True
                        await asyncio.wait(
                            [asyncio.ensure_future(link.closed.wait())], timeout=brk.hold_s
                        )
                        if not link.closed.is_set():
                            self._log(link.n, f"half-open {direction} held {brk.hold_s:g} s: reset")
                            link.abort(rst=True)
                    break
                if flipper is not None:
                    data = flipper.apply(data, read)
                    for at in flipper.done[len(flipper.logged) :]:
                        flipper.logged.append(at)
                        self.flipped.append((link.n, direction, at))
                        self._log(link.n, f"flipped {direction} byte {at}")
                read += len(data)
                queue.put_nowait((due, data))
            await deliver
        finally:
            deliver.cancel()

    async def _deliver(
        self, link: _Link, direction: str, queue: asyncio.Queue[tuple[float, Any]], rate: float
    ) -> None:
        writer = link.writers[direction]
        while True:
            due, item = await queue.get()
            wait = due - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            if link.closed.is_set():
                return
            if isinstance(item, Fault):
                self.fired.append((link.n, item))
                self._log(link.n, f"{item} (after {link.moved[direction]} bytes)")
                if item.kind == "reset":
                    link.abort(rst=True)
                elif item.kind == "truncate":
                    with contextlib.suppress(ConnectionError, OSError):
                        await writer.drain()
                    link.abort(rst=False)
                return  # half_open: nothing more goes this way
            if item == "eof":
                with contextlib.suppress(ConnectionError, OSError, RuntimeError):
                    if writer.can_write_eof():
                        writer.write_eof()
                return
            step = max(1, int(rate / 20)) if rate else len(item)  # ~20 writes a second
            for i in range(0, len(item), step):
                piece = item[i : i + step]
                try:
                    writer.write(piece)
                    await writer.drain()
                except (ConnectionError, OSError, RuntimeError):
                    link.abort(rst=True)
                    return
                link.moved[direction] += len(piece)
                self.moved[direction] += len(piece)
                if rate:
                    await asyncio.sleep(len(piece) / rate)
