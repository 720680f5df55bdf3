"""Deployment throughput: a 100 MB model to one client process and back, over gRPC vs a raw socket.

One client runs ``run_client`` in a separate process with an *echo* train (it returns the
Arrays it received). The server sends it the model with ``GrpcExecutor.submit`` and waits for
the Arrays to come back: the timed round trip is everything pollinate does for one client and
one task (serialize + SHA-256 + 1 MiB chunks out, reassemble + check + decode on the client,
the same back). Beside it, in the same run and interleaved repeat by repeat, a raw loopback
TCP socket moves the same payload bytes to an echo process and back (``sendall`` 100 MB, the
peer reads all of it and sends it back, ``recv_into`` 100 MB): what the wire alone costs on
this machine. The same gRPC round trip is measured again with TLS on (a throwaway CA and
server certificate in a temporary folder).

Every round trip's payload is checked: the SHA-256 of what came back equals that of what was
sent. MB/s counts the bytes moved both ways (2 x model size) per second of round trip; the
ratio is raw-socket MB/s over pollinate MB/s. Also printed: the codec work one round trip
needs (2 x encode + 2 x reassemble, in one process, no network), which bounds how fast the
gRPC path can be on this CPU.

    .venv/bin/python bench/deploy_throughput.py          # 100 MB, 2 warm-up + 5 timed repeats
    .venv/bin/python bench/deploy_throughput.py --mb 20 --repeats 2 --no-tls

All traffic is on 127.0.0.1; the script stops every server and process it starts.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
from deploy_common import (  # noqa: E402 - also puts the repository on sys.path
    echo_client_fn,
    machine_line,
    spawn,
    stop_process,
)

from pollinate.types import Arrays, TrainIns, TrainRes  # noqa: E402

MB = 1_000_000
N_ARRAYS = 4
WAIT_S = 120.0  # bound on any single wait (start-up, one round trip)


def client_main(address: str, ca_path: str, chunk_bytes: int) -> None:
    """``run_client`` until stdin closes (the parent's signal to stop)."""
    from pollinate.transport.grpc.client import Backoff, run_client

    logging.getLogger("pollinate").setLevel(logging.ERROR)
    stop = threading.Event()

    def watch_stdin() -> None:
        sys.stdin.read()  # returns at EOF: the parent closed the pipe or died
        stop.set()

    threading.Thread(target=watch_stdin, daemon=True).start()
    ca = Path(ca_path).read_bytes() if ca_path else None
    run_client(
        address,
        echo_client_fn,
        0,
        ca_cert_pem=ca,
        stop_event=stop,
        backoff=Backoff(0.05, 2.0, 1.0),
        max_retries=20,
        max_message_bytes=message_bytes(chunk_bytes),
    )


# --- the raw socket echo server (runs in its own process) -----------------------------------


def recv_exact(sock: socket.socket, buf: memoryview) -> None:
    got = 0
    while got < len(buf):
        n = sock.recv_into(buf[got:])
        if n == 0:
            raise ConnectionError("peer closed the connection")
        got += n


def echo_server_main() -> None:
    """Serve one connection: read an 8-byte length and that many bytes, send them back; a
    length of 0 (or the peer closing) ends it. Prints the port first."""
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(WAIT_S)
    print(server.getsockname()[1], flush=True)
    conn, _ = server.accept()
    conn.settimeout(WAIT_S)
    buf = bytearray()
    try:
        with conn:
            for _ in range(1000):  # bounded
                head = bytearray(8)
                recv_exact(conn, memoryview(head))
                (size,) = struct.unpack("<Q", head)
                if size == 0:
                    return
                if len(buf) != size:
                    buf = bytearray(size)
                recv_exact(conn, memoryview(buf))
                conn.sendall(buf)
    finally:
        server.close()


# --- helpers (parent side) ------------------------------------------------------------------


def message_bytes(chunk_bytes: int) -> int:
    """The gRPC message limit that fits one chunk and its framing."""
    from pollinate.transport.grpc.codec import DEFAULT_MAX_MESSAGE_BYTES, MESSAGE_OVERHEAD

    return max(DEFAULT_MAX_MESSAGE_BYTES, chunk_bytes + MESSAGE_OVERHEAD)


def arrays_digest(arrays: Arrays) -> str:
    h = hashlib.sha256()
    for a in arrays:
        h.update(f"{a.dtype.str}{a.shape}".encode())
        h.update(np.ascontiguousarray(a).view(np.uint8).data)
    return h.hexdigest()


def make_model(total_bytes: int, seed: int = 0) -> Arrays:
    """``N_ARRAYS`` float32 arrays holding exactly ``total_bytes`` bytes of data."""
    if total_bytes % (4 * N_ARRAYS):
        raise SystemExit(f"the model size must be a multiple of {4 * N_ARRAYS} bytes")
    rng = np.random.default_rng(seed)
    n = total_bytes // 4 // N_ARRAYS
    return [rng.standard_normal(n, dtype=np.float32) for _ in range(N_ARRAYS)]


class GrpcPath:
    """A FleetServer here and one echo client process connected to it."""

    def __init__(self, tls_dir: Path | None, chunk_bytes: int) -> None:
        from pollinate.transport.grpc.server import FleetServer, GrpcExecutor

        tls = None
        ca_path = ""
        if tls_dir is not None:
            from pollinate.security import make_ca, make_server_cert

            ca_crt, ca_key = make_ca(tls_dir)
            crt, key = make_server_cert(tls_dir, ca_crt, ca_key, ["127.0.0.1"])
            tls = (crt.read_bytes(), key.read_bytes())
            ca_path = str(ca_crt)
        self.fleet = FleetServer(
            "127.0.0.1:0",
            tls=tls,
            heartbeat_s=5.0,
            chunk_bytes=chunk_bytes,
            max_message_bytes=message_bytes(chunk_bytes),
        ).start()
        self.executor = GrpcExecutor(self.fleet)
        self.proc: subprocess.Popen[str] | None = None
        self.round = 0
        self.proc = spawn(
            __file__,
            "--role",
            "client",
            "--address",
            self.fleet.address,
            "--ca",
            ca_path,
            "--chunk-kib",
            str(chunk_bytes // 1024),
        )
        if not self.fleet.wait_for(1, timeout=WAIT_S):
            raise RuntimeError("the client process did not connect")

    def round_trip(self, arrays: Arrays) -> tuple[float, Arrays]:
        self.round += 1
        plan = [(0, TrainIns(arrays, {}))]
        start = time.perf_counter()
        outcomes = list(self.executor.submit(self.round, "train", plan, WAIT_S))
        seconds = time.perf_counter() - start
        (outcome,) = outcomes
        if not outcome.ok:
            raise RuntimeError(f"the echo task failed: {outcome.error}")
        assert isinstance(outcome.result, TrainRes)
        return seconds, list(outcome.result.arrays)

    def close(self) -> None:
        try:
            self.fleet.stop(grace=0.5, finished="benchmark over")
        finally:
            stop_process(self.proc)


class RawPath:
    """A loopback TCP connection to an echo process."""

    def __init__(self) -> None:
        self.proc: subprocess.Popen[str] | None = spawn(__file__, "--role", "echo")
        assert self.proc.stdout is not None
        port = int(self.proc.stdout.readline())
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=WAIT_S)
        self.buf = bytearray()

    def round_trip(self, data: bytes | bytearray) -> tuple[float, bytearray]:
        if len(self.buf) != len(data):
            self.buf = bytearray(len(data))
            self.buf[:] = b"\0" * len(data)  # touch the pages outside the timing
        start = time.perf_counter()
        self.sock.sendall(struct.pack("<Q", len(data)))
        self.sock.sendall(data)
        recv_exact(self.sock, memoryview(self.buf))
        return time.perf_counter() - start, self.buf

    def close(self) -> None:
        try:
            self.sock.sendall(struct.pack("<Q", 0))
            self.sock.close()
        except OSError:
            pass
        stop_process(self.proc)


def codec_seconds(arrays: Arrays, repeats: int) -> dict[str, float]:
    """Median seconds of each piece of codec work one payload needs (one direction), in this
    process with no network: ``serde.dumps``, SHA-256, cutting into chunks, reassembling
    (copy + SHA-256) and decoding."""
    from pollinate import serde
    from pollinate.transport.grpc.codec import DEFAULT_CHUNK_BYTES, Assembler, decode

    names = ["serde.dumps", "sha256", "cut into chunks", "reassemble (copy+sha256)", "decode"]
    parts: dict[str, list[float]] = {name: [] for name in names}
    step = DEFAULT_CHUNK_BYTES
    for _ in range(repeats):
        t0 = time.perf_counter()
        data = serde.dumps(arrays)
        t1 = time.perf_counter()
        digest = hashlib.sha256(data).digest()
        t2 = time.perf_counter()
        view = memoryview(data)
        chunks = [bytes(view[i : i + step]) for i in range(0, len(data), step)]
        t3 = time.perf_counter()
        view.release()
        del data
        asm = Assembler("bench", sum(map(len, chunks)), digest, max_bytes=1 << 40)
        t4 = time.perf_counter()
        offset = 0
        for i, c in enumerate(chunks):
            asm.add(offset, c, i == len(chunks) - 1)
            offset += len(c)
        t5 = time.perf_counter()
        decode(asm.result(), 1 << 40, writeable=True)
        t6 = time.perf_counter()
        del chunks, asm
        for name, seconds in zip(names, (t1 - t0, t2 - t1, t3 - t2, t5 - t4, t6 - t5)):
            parts[name].append(seconds)
    return {name: statistics.median(ts) for name, ts in parts.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--role", choices=["bench", "client", "echo"], default="bench")
    parser.add_argument("--address", default="")
    parser.add_argument("--ca", default="")
    parser.add_argument("--mb", type=int, default=100, help="model size in MB (10^6 bytes)")
    parser.add_argument("--repeats", type=int, default=5, help="timed round trips")
    parser.add_argument("--warmup", type=int, default=2, help="round trips not timed")
    parser.add_argument(
        "--chunk-kib", type=int, default=1024, help="chunk size on the stream (default 1 MiB)"
    )
    parser.add_argument("--verbose", action="store_true", help="print every round trip")
    parser.add_argument("--no-tls", action="store_true", help="skip the TLS measurement")
    args = parser.parse_args(argv)
    if args.role == "client":
        client_main(args.address, args.ca, args.chunk_kib * 1024)
        return 0
    if args.role == "echo":
        echo_server_main()
        return 0
    if args.repeats < 1 or args.mb < 1:
        parser.error("--repeats and --mb must be >= 1")

    from pollinate import serde

    logging.getLogger("pollinate").setLevel(logging.ERROR)  # the plaintext warnings
    size = args.mb * MB
    chunk = args.chunk_kib * 1024
    arrays = make_model(size)
    sent_digest = arrays_digest(arrays)
    raw_bytes = serde.dumps(arrays)  # the very bytes pollinate puts on the wire
    raw_digest = hashlib.sha256(raw_bytes).hexdigest()
    print(machine_line())
    print(
        f"model: {N_ARRAYS} float32 arrays, {size:,} bytes of array data "
        f"({len(raw_bytes):,} bytes serialized, {chunk // 1024} KiB chunks); "
        f"{args.warmup} warm-up + {args.repeats} timed round trips, interleaved"
    )

    paths: dict[str, Any] = {}
    times: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="pollinate-bench-tls-") as tmp:
        try:
            paths["raw socket"] = RawPath()
            paths["pollinate gRPC"] = GrpcPath(None, chunk)
            if not args.no_tls:
                paths["pollinate gRPC + TLS"] = GrpcPath(Path(tmp), chunk)
            times = {name: [] for name in paths}
            # interleaved, so that changes in the machine's load hit all paths alike
            for i in range(args.warmup + args.repeats):
                for name, path in paths.items():
                    if isinstance(path, RawPath):
                        seconds, back = path.round_trip(raw_bytes)
                        ok = hashlib.sha256(back).hexdigest() == raw_digest
                    else:
                        seconds, echoed = path.round_trip(arrays)
                        ok = arrays_digest(echoed) == sent_digest
                        del echoed
                    if not ok:
                        raise RuntimeError(f"{name}: the payload came back different")
                    if i >= args.warmup:
                        times[name].append(seconds)
        finally:
            for path in paths.values():
                path.close()

    codec = codec_seconds(arrays, 3)
    print("all payloads came back with the SHA-256 they were sent with")
    print()
    raw_rate = 2 * size / MB / statistics.median(times["raw socket"])
    print(f"{'path':<22} {'round trip (median, min)':>26} {'MB/s both ways':>15} {'raw/this':>9}")
    for name, ts in times.items():
        if args.verbose:
            print(f"  {name}: " + " ".join(f"{t:.3f}" for t in ts))
        med = statistics.median(ts)
        rate = 2 * size / MB / med
        print(f"{name:<22} {med:>14.3f} s {min(ts):>8.3f} s {rate:>15.0f} {raw_rate / rate:>8.1f}x")
    print()
    one_way = sum(codec.values())
    grpc_med = statistics.median(times["pollinate gRPC"])
    print(
        f"codec work per direction (one process, no network), {one_way:.3f} s: "
        + ", ".join(f"{k} {v:.3f}" for k, v in codec.items())
    )
    print(
        f"pollinate gRPC round trip {grpc_med:.3f} s = codec 2 x {one_way:.3f} s "
        f"({2 * one_way / grpc_med:.0%}) + gRPC stream, threads and the task "
        f"{grpc_med - 2 * one_way:.3f} s"
    )
    if uptime := _uptime():
        print(f"uptime after: {uptime}")
    return 0


def _uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


if __name__ == "__main__":
    sys.exit(main())
