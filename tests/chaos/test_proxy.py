"""The chaos proxy itself: bytes pass through unchanged, and each fault does what it says.

Plain sockets on 127.0.0.1 stand on both sides of the proxy. Times are only ever checked from
below (the proxy must hold bytes at least as long as it says), never from above.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Iterator

import pytest

from tests.chaos.proxy import DOWN, UP, ChaosProxy, Fault, Schedule
from tests.waiting import WAIT, wait_until

pytestmark = pytest.mark.slow  # part of the chaos suite (`pytest tests/chaos -m slow`); ~5 s


class Target:
    """A TCP server on 127.0.0.1 that hands each accepted socket to ``handle`` in a thread."""

    def __init__(self, handle) -> None:  # type: ignore[no-untyped-def]
        self.handle = handle
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.accepted: list[socket.socket] = []
        self.errors: list[BaseException] = []
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted.append(conn)
            threading.Thread(target=self._run, args=(conn,), daemon=True).start()

    def _run(self, conn: socket.socket) -> None:
        try:
            self.handle(conn)
        except BaseException as e:
            self.errors.append(e)

    def close(self) -> None:
        self.sock.close()
        for conn in self.accepted:
            conn.close()


def echo(conn: socket.socket) -> None:
    while data := conn.recv(1 << 16):
        conn.sendall(data)
    conn.shutdown(socket.SHUT_WR)


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        data = sock.recv(n - len(out))
        if not data:
            break
        out += data
    return bytes(out)


def recv_all(sock: socket.socket) -> bytes:
    """Everything until EOF."""
    out = bytearray()
    while data := sock.recv(1 << 16):
        out += data
    return bytes(out)


@pytest.fixture
def echo_target() -> Iterator[Target]:
    target = Target(echo)
    yield target
    target.close()


def dial(proxy: ChaosProxy) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=WAIT)
    return sock


def test_bytes_pass_through_unchanged_both_ways(echo_target: Target) -> None:
    payloads = [os.urandom(n) for n in (1, 1000, 300_000, 2_000_000, 70_000)]
    with ChaosProxy(echo_target.port) as proxy:

        def round_trip(payload: bytes, out: list[bytes]) -> None:
            with dial(proxy) as sock:
                sender = threading.Thread(target=sock.sendall, args=(payload,))
                sender.start()
                got = recv_exactly(sock, len(payload))
                sender.join()
                sock.shutdown(socket.SHUT_WR)  # half-close: the echo side ends, so do we
                out.append(got + recv_all(sock))

        results: list[list[bytes]] = [[] for _ in payloads]
        threads = [
            threading.Thread(target=round_trip, args=(p, r)) for p, r in zip(payloads, results)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(WAIT)
        assert proxy.connections == len(payloads)
        assert proxy.fired == []
    for payload, result in zip(payloads, results):
        assert result == [payload]
    assert not echo_target.errors


def test_latency_holds_each_direction(echo_target: Target) -> None:
    schedule = Schedule(
        fixed={0: [Fault("latency", UP, delay_s=0.3), Fault("latency", DOWN, delay_s=0.2)]}
    )
    with ChaosProxy(echo_target.port, schedule) as proxy, dial(proxy) as sock:
        start = time.monotonic()
        sock.sendall(b"ping")
        assert recv_exactly(sock, 4) == b"ping"
        assert time.monotonic() - start >= 0.5
        assert "latency 300 ms up" in proxy.report()


def test_bandwidth_limits_the_rate(echo_target: Target) -> None:
    payload = os.urandom(100_000)
    schedule = Schedule(fixed={0: [Fault("bandwidth", UP, bytes_per_s=200_000)]})
    with ChaosProxy(echo_target.port, schedule) as proxy, dial(proxy) as sock:
        start = time.monotonic()
        sock.sendall(payload)
        assert recv_exactly(sock, len(payload)) == payload
        # 100 kB at 200 kB/s: the proxy sleeps 0.5 s in all, the last 1/20 after the last write
        assert time.monotonic() - start >= 0.45


def test_reset_forwards_up_to_the_offset_then_resets_both_sides() -> None:
    received: list[bytes] = []
    outcome: list[str] = []

    def record(conn: socket.socket) -> None:
        try:
            while data := conn.recv(1 << 16):
                received.append(data)
            outcome.append("eof")
        except ConnectionResetError:
            outcome.append("reset")

    target = Target(record)
    schedule = Schedule(fixed={0: [Fault("reset", UP, at_bytes=1000)]})
    payload = os.urandom(5000)
    try:
        with ChaosProxy(target.port, schedule) as proxy, dial(proxy) as sock:
            sock.sendall(payload)
            with pytest.raises(ConnectionResetError):
                while sock.recv(1 << 16):
                    pass
            wait_until(lambda: outcome, "the server side to see the reset")
            assert [f.kind for _, f in proxy.fired] == ["reset"]
    finally:
        target.close()
    assert b"".join(received) == payload[:1000]
    assert outcome == ["reset"]


def test_truncate_forwards_part_of_a_chunk_then_closes() -> None:
    payload = os.urandom(4000)
    ends: list[bytes] = []

    def send(conn: socket.socket) -> None:
        conn.sendall(payload)
        ends.append(recv_all(conn))  # the proxy's FIN: EOF, not a reset

    target = Target(send)
    schedule = Schedule(fixed={0: [Fault("truncate", DOWN, at_bytes=1500)]})
    try:
        with ChaosProxy(target.port, schedule) as proxy, dial(proxy) as sock:
            got = recv_all(sock)  # EOF, not a reset
            wait_until(lambda: ends, "the server side to see the close")
            assert [f.kind for _, f in proxy.fired] == ["truncate"]
    finally:
        target.close()
    assert got == payload[:1500]
    assert ends == [b""]


def test_half_open_stops_one_direction_without_closing_then_resets() -> None:
    got_up: list[bytes] = []
    server_side: list[socket.socket] = []

    def hold(conn: socket.socket) -> None:
        server_side.append(conn)
        try:
            while data := conn.recv(1 << 16):
                got_up.append(data)
        except ConnectionResetError:
            pass

    target = Target(hold)
    schedule = Schedule(fixed={0: [Fault("half_open", UP, at_bytes=1000, hold_s=1.5)]})
    payload = os.urandom(3000)
    try:
        with ChaosProxy(target.port, schedule) as proxy, dial(proxy) as sock:
            start = time.monotonic()
            sock.sendall(payload)
            wait_until(lambda: sum(map(len, got_up)) >= 1000, "the first 1000 bytes")
            wait_until(lambda: "half_open up" in proxy.report(), "the fault")
            # the other direction still works, and the stalled one delivers nothing more
            server_side[0].sendall(b"still here")
            assert recv_exactly(sock, 10) == b"still here"
            assert b"".join(got_up) == payload[:1000]
            # nobody closed it: the proxy resets it once hold_s is over
            with pytest.raises(ConnectionResetError):
                while sock.recv(1 << 16):
                    pass
            assert time.monotonic() - start >= 1.5
            assert "held 1.5 s: reset" in proxy.report()
    finally:
        target.close()


def test_schedule_is_seeded_and_bounded(echo_target: Target) -> None:
    a = Schedule(seed=7, p_break=0.5, latency_s=(0.0, 0.01), bytes_per_s=(1e5, 1e6))
    b = Schedule(seed=7, p_break=0.5, latency_s=(0.0, 0.01), bytes_per_s=(1e5, 1e6))
    c = Schedule(seed=8, p_break=0.5, latency_s=(0.0, 0.01), bytes_per_s=(1e5, 1e6))
    assert [a.plan(n) for n in range(50)] == [b.plan(n) for n in range(50)]
    assert [a.plan(n) for n in range(50)] != [c.plan(n) for n in range(50)]
    broken = [n for n in range(50) if any(f.breaks for f in a.plan(n))]
    assert 10 < len(broken) < 40  # p_break = 0.5 of 50
    assert a.plan(3) == a.plan(3)  # a plan does not depend on the plans drawn before it

    always = Schedule(seed=1, p_break=1.0, breaks=("reset",), at_bytes=(10_000, 10_000))
    always.max_breaks = 2
    with ChaosProxy(echo_target.port, always) as proxy:
        for _ in range(3):  # only the first two connections are armed
            with dial(proxy) as sock:
                sock.sendall(b"x")
                assert recv_exactly(sock, 1) == b"x"
        assert proxy.armed == 2
        proxy.calm()
        proxy.schedule.max_breaks = 10
        with dial(proxy) as sock:
            sock.sendall(b"y")
            assert recv_exactly(sock, 1) == b"y"
        assert proxy.armed == 2
    assert "reset up at byte 10000" in proxy.report() or "reset down at byte 10000" in (
        proxy.report()
    )


def test_the_proxy_stops_by_itself_and_resets_what_is_open(echo_target: Target) -> None:
    proxy = ChaosProxy(echo_target.port, lifetime_s=1.0)
    with dial(proxy) as sock:
        sock.sendall(b"a")
        assert recv_exactly(sock, 1) == b"a"
        wait_until(lambda: not proxy.running, "the proxy to stop by itself")
        with pytest.raises(ConnectionResetError):
            while sock.recv(1 << 16):
                pass
    assert "lifetime of 1 s is over" in proxy.report()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", proxy.port), timeout=WAIT)
    proxy.stop()  # stopping a stopped proxy is fine


def test_an_unreachable_server_closes_the_client_connection() -> None:
    with socket.create_server(("127.0.0.1", 0)) as s:
        port = s.getsockname()[1]  # closed again: nothing listens there
    with ChaosProxy(port) as proxy, dial(proxy) as sock:
        try:
            assert sock.recv(1) == b""
        except ConnectionResetError:
            pass
        wait_until(lambda: "server unreachable" in proxy.report(), "the proxy's report")


def test_a_connection_waits_for_a_server_that_is_coming_back() -> None:
    with socket.create_server(("127.0.0.1", 0)) as s:
        port = s.getsockname()[1]  # nothing listens there yet
    with ChaosProxy(port, upstream_retry_s=WAIT) as proxy, dial(proxy) as sock:
        sock.sendall(b"early")
        wait_until(lambda: proxy.connections == 1, "the proxy to accept")
        target = Target(echo)  # the server comes up on another port: move the proxy there
        proxy.target_port = target.port
        try:
            assert recv_exactly(sock, 5) == b"early"
        finally:
            target.close()


def test_flip_inverts_one_byte_after_each_of_the_first_markers() -> None:
    """The marker is split across two sends, so the proxy must find it across reads; only
    the first ``count`` markers get a flip, the other direction and the rest are untouched,
    and ``moved`` counts every byte delivered."""
    received: list[bytes] = []

    def sink(conn: socket.socket) -> None:
        received.append(recv_all(conn))
        conn.sendall(b"ok")
        conn.shutdown(socket.SHUT_WR)

    target = Target(sink)
    marker = b"PLN1"
    first, second = b"x" * 1000 + b"PL", b"N1" + bytes(range(200)) + marker + b"y" * 500
    third = marker + b"z" * 100  # a third marker: beyond count
    fault = Fault("flip", UP, at_bytes=10, marker=marker, count=2)
    try:
        with ChaosProxy(target.port, Schedule(fixed={0: [fault]})) as proxy, dial(proxy) as sock:
            for part in (first, second, third):
                sock.sendall(part)
                time.sleep(0.05)  # separate reads (not a timing assertion: any split works)
            sock.shutdown(socket.SHUT_WR)
            assert recv_all(sock) == b"ok"
            sent = first + second + third
            deadline = time.monotonic() + WAIT
            while not received and time.monotonic() < deadline:
                time.sleep(0.01)
            at1 = sent.index(marker) + 10
            at2 = sent.index(marker, at1) + 10
            want = bytearray(sent)
            want[at1] ^= 0xFF
            want[at2] ^= 0xFF
            assert received == [bytes(want)]
            assert [(n, d, at) for n, d, at in proxy.flipped] == [(0, UP, at1), (0, UP, at2)]
            assert proxy.moved == {UP: len(sent), DOWN: 2}
            assert "flip up at 10 bytes after b'PLN1'" in proxy.report()
    finally:
        target.close()
    with pytest.raises(ValueError, match="needs a marker"):
        Fault("flip", UP)
