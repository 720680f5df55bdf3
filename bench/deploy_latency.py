"""Round trip of a model to one client across a slow link, with and without HTTP/2 BDP probing.

The client process reaches the server through a relay in this process that holds every byte
for ``RTT / 2`` in each direction (loopback has no latency of its own, and this machine has
no ``netem``). HTTP/2 flow control is end to end, so the relay shows what window sizes cost
on a long link: with a window of W bytes a stream moves at most W per round-trip time.

It compares ``FleetServer``'s default (gRPC's BDP probing on: windows grow with the link)
against ``grpc_options=[("grpc.http2.bdp_probe", 0)]``, which keeps the server's receive
windows small and so bounds what held-back clients can push into server memory (see
DEPLOY.md), at the price measured here: the client's upload of its result.

    .venv/bin/python bench/deploy_latency.py [--mb 20] [--rtt-ms 0,40,200] [--repeats 3]
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import statistics
import sys
import threading
import time
from typing import Any

import numpy as np
from deploy_common import (  # also puts the repo on sys.path
    echo_client_fn,
    machine_line,
    spawn,
    stop_process,
)

from pollinate.transport.grpc.server import FleetServer, GrpcExecutor  # noqa: E402
from pollinate.types import TrainIns  # noqa: E402

SETTINGS: dict[str, list[tuple[str, Any]]] = {
    "BDP probing on (default)": [],
    "bdp_probe = 0": [("grpc.http2.bdp_probe", 0)],
}


class Relay:
    """A TCP relay on 127.0.0.1 that delays each direction by ``delay_s`` (its own thread)."""

    def __init__(self, target_port: int, delay_s: float) -> None:
        self.target_port = target_port
        self.delay_s = delay_s
        self.port = 0
        self._ready = threading.Event()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_until_complete, args=(self._main(),))
        self._thread.daemon = True
        self._thread.start()
        self._ready.wait(30)

    async def _main(self) -> None:
        server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = server.sockets[0].getsockname()[1]
        self._stop = asyncio.Event()
        self._ready.set()
        async with server:
            await self._stop.wait()

    async def _handle(self, r1: asyncio.StreamReader, w1: asyncio.StreamWriter) -> None:
        r2, w2 = await asyncio.open_connection("127.0.0.1", self.target_port)
        await asyncio.gather(self._pipe(r1, w2), self._pipe(r2, w1), return_exceptions=True)

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        due: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def deliver() -> None:
            while True:
                at, data = await due.get()
                if not data:
                    writer.close()
                    return
                await asyncio.sleep(max(0.0, at - time.monotonic()))
                writer.write(data)
                await writer.drain()

        task = asyncio.create_task(deliver())
        while True:
            data = await reader.read(1 << 20)
            due.put_nowait((time.monotonic() + self.delay_s, data))
            if not data:
                break
        await task

    def close(self) -> None:
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)


def client_main(address: str) -> None:
    """An echo client until stdin closes."""
    from pollinate.transport.grpc.client import Backoff, run_client

    logging.getLogger("pollinate").setLevel(logging.ERROR)
    stop = threading.Event()
    threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
    run_client(address, echo_client_fn, 0, stop_event=stop, backoff=Backoff(0.05, 2, 1))


def round_trips(options: list[tuple[str, Any]], rtt_s: float, mb: int, repeats: int) -> list[float]:
    arrays = [np.random.default_rng(0).random(mb * 250_000, dtype=np.float32)]
    fleet = FleetServer("127.0.0.1:0", run_id="latency", grpc_options=options).start()
    relay = Relay(fleet.port, rtt_s / 2) if rtt_s else None
    client = spawn(__file__, "--client", f"127.0.0.1:{relay.port if relay else fleet.port}")
    try:
        if not fleet.wait_for(1, timeout=60):
            raise RuntimeError("the client did not connect")
        executor = GrpcExecutor(fleet)
        times = []
        for i in range(repeats + 1):  # the first one warms the connection up
            start = time.perf_counter()
            (outcome,) = executor.submit(i + 1, "train", [(0, TrainIns(arrays, {}))], 600)
            if not outcome.ok:
                raise RuntimeError(outcome.error)
            np.testing.assert_array_equal(outcome.result.arrays[0], arrays[0])  # type: ignore[union-attr]
            times.append(time.perf_counter() - start)
        return times[1:]
    finally:
        stop_process(client)
        if relay is not None:
            relay.close()
        fleet.stop(grace=0.2)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=20, help="model size in MB (float32)")
    parser.add_argument("--rtt-ms", default="0,40,200", help="round-trip times to emulate")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--client", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.client:
        client_main(args.client)
        return 0
    logging.getLogger("pollinate").setLevel(logging.ERROR)
    print(machine_line())
    print(f"one client process, {args.mb} MB each way, median of {args.repeats} round trips")
    print(f"{'RTT':>8}  {'server setting':<26} {'round trip':>11} {'MB/s both ways':>15}")
    for rtt_ms in (float(x) for x in args.rtt_ms.split(",")):
        for name, options in SETTINGS.items():
            t = statistics.median(round_trips(options, rtt_ms / 1000, args.mb, args.repeats))
            print(f"{rtt_ms:>6.0f}ms  {name:<26} {t:>9.2f} s {2 * args.mb / t:>15.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
