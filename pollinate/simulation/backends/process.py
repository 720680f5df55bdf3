"""The process backend: N worker processes on this machine, fed longest task first.

Each worker unpickles the user's ``client_fn`` once and keeps a per-worker cache, so the
model is built once per worker and reused for every client it serves. Large NumPy arrays
inside ``client_fn`` (the data set) are written once to ``.npy`` files and memory-mapped by
every worker, never pickled per task. The workers are started first and import
``client_fn``'s module (torch: 1-2 s) while this process writes those files. The round's
global arrays go to a shared-memory block once per round; each worker reads them once. A
worker that is still busy at the deadline, or that dies, is replaced, and its task counts
as failed. ``close()`` stops all workers at once, and they exit without the interpreter's
teardown.

Messages to a worker are pickled here and written to its pipe by that worker's own sender
thread, so this process never blocks on a send: with two tasks in flight per worker, a
task larger than the pipe's buffer (SCAFFOLD's control variates in ``Task.state``) would
otherwise block the parent until the worker reads it, while the worker blocks writing its
own large result, which the parent is not reading (a deadlock for any payload over ~200 KiB).
"""

from __future__ import annotations

import atexit
import contextlib
import importlib
import io
import logging
import multiprocessing as mp
import os
import pickle
import queue
import shutil
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import replace
from multiprocessing.connection import Connection, wait
from multiprocessing.reduction import ForkingPickler
from multiprocessing.shared_memory import SharedMemory
from typing import Any, NoReturn

import numpy as np

from pollinate import serde
from pollinate.client import ClientFn
from pollinate.errors import BackendError, ConfigError
from pollinate.simulation.backends.base import (
    Backend,
    check_workers,
    execute_task,
    longest_first,
    timeout_outcome,
)
from pollinate.types import Arrays, Outcome, Task, TrainRes

log = logging.getLogger("pollinate")

SHARE_MIN_BYTES = 1 << 16  # arrays at least this large are memory-mapped, not pickled
PREFETCH = 2  # tasks in flight per worker: the running one and the next


class _SharingPickler(pickle.Pickler):
    """Pickles large arrays as paths to ``.npy`` files that workers memory-map."""

    def __init__(self, file: io.BytesIO, folder: str) -> None:
        super().__init__(file, protocol=pickle.HIGHEST_PROTOCOL)
        self._folder = folder
        self._saved: dict[int, str] = {}

    def reducer_override(self, obj: Any) -> Any:
        if (
            type(obj) in (np.ndarray, np.memmap)
            and obj.nbytes >= SHARE_MIN_BYTES
            and not obj.dtype.hasobject
        ):
            path = self._saved.get(id(obj))
            if path is None:
                path = os.path.join(self._folder, f"array-{len(self._saved)}.npy")
                np.save(path, obj)
                self._saved[id(obj)] = path
            return _load_shared, (path,)
        return NotImplemented


def _load_shared(path: str) -> np.ndarray:
    return np.load(path, mmap_mode="r")


def _share(client_fn: ClientFn, folder: str) -> bytes:
    buf = io.BytesIO()
    try:
        _SharingPickler(buf, folder).dump(client_fn)
    except (pickle.PicklingError, AttributeError, TypeError) as exc:
        raise ConfigError(
            f"the process backend must send client_fn to its workers, but it cannot be "
            f"pickled ({exc}). Define it at module level (not a lambda or closure), or use "
            "backend='sequential'."
        ) from exc
    return buf.getvalue()


def _modules(client_fn: ClientFn) -> list[str]:
    """The module ``client_fn`` comes from, for workers to import before it arrives."""
    module = getattr(client_fn, "__module__", None)
    return [module] if isinstance(module, str) and module not in ("__main__", "builtins") else []


def _worker_main(conn: Connection, modules: list[str]) -> None:
    """A worker's loop: receive tasks, run them, send outcomes (arrays as raw bytes)."""
    for name in modules:  # while the server is still writing the data; unpickling reports errors
        with contextlib.suppress(Exception):
            importlib.import_module(name)
    client_fn = pickle.loads(_next_message(conn)[1])
    cache: dict[str, Any] = {}
    token, arrays = None, []
    while True:
        _, task_token, shm_name, size, task = _next_message(conn)
        if task_token != token:
            shm = SharedMemory(name=shm_name)
            try:
                arrays = serde.loads(shm.buf[:size], copy=True)  # type: ignore[index]
            finally:
                shm.close()
            token = task_token
        outcome = execute_task(client_fn, task, arrays, cache)
        res = outcome.result
        if isinstance(res, TrainRes) and _is_arrays(res.arrays):
            conn.send((replace(outcome, result=replace(res, arrays=[])), True))
            conn.send_bytes(serde.dumps(res.arrays))
        else:
            try:
                conn.send((outcome, False))
            except (pickle.PicklingError, TypeError, AttributeError) as exc:
                conn.send((_unsendable(outcome, exc), False))


def _next_message(conn: Connection) -> Any:
    """The server's next message; the worker exits on "stop" or when the server is gone."""
    try:
        msg = conn.recv()
    except (EOFError, OSError, KeyboardInterrupt):
        _exit_worker()
    if msg[0] == "stop":
        _exit_worker()
    return msg


def _exit_worker() -> NoReturn:
    """Exit without tearing the interpreter down (as forked multiprocessing children do).

    A normal exit of a process that imported torch spends 0.5-1 s unloading modules, and
    ``close()`` waits for it; atexit handlers still run and output is flushed.
    """
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        if stream is not None:
            stream.flush()
    os._exit(0)


def _unsendable(outcome: Outcome, exc: Exception) -> Outcome:
    return Outcome(
        outcome.client_id,
        outcome.kind,
        error=f"the client's result cannot be sent back to the server: {exc}",
        seconds=outcome.seconds,
    )


def _is_arrays(value: object) -> bool:
    return isinstance(value, list) and all(isinstance(a, np.ndarray) for a in value)


class _Worker:
    """One worker process; it waits for ``send_client_fn`` before serving tasks.

    ``send`` pickles a message here (so a pickling error reaches the caller) and hands the
    bytes to this worker's sender thread, which writes them to the pipe in order: the
    caller never waits for the worker to read, whatever the message's size.
    """

    def __init__(self, ctx: Any, modules: list[str], env: dict[str, str]) -> None:
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(target=_worker_main, args=(child, modules), daemon=True)
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)  # thread limits are read by the child at start-up
        try:
            self.process.start()
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        child.close()
        self._outbox: queue.SimpleQueue[memoryview | None] = queue.SimpleQueue()
        self._sender = threading.Thread(
            target=self._send_loop, name=f"pollinate-send-{self.process.pid}", daemon=True
        )
        self._sender.start()

    def _send_loop(self) -> None:
        """Write queued messages to the pipe until ``None``; stop at the first failed write
        (the worker died: the parent learns it from the pipe's end-of-file)."""
        while (data := self._outbox.get()) is not None:
            try:
                self.conn.send_bytes(data)
            except (OSError, ValueError):
                return

    def send(self, message: tuple[Any, ...]) -> None:
        """Queue ``message`` for the worker; returns at once."""
        self._outbox.put(ForkingPickler.dumps(message))

    def send_client_fn(self, payload: bytes) -> None:
        self.send(("client_fn", payload))

    def request_stop(self) -> None:
        self.send(("stop",))

    def wait_or_kill(self, timeout: float = 2.0) -> None:
        """Wait up to ``timeout`` s for the worker to exit after ``request_stop``, then kill it."""
        self.process.join(timeout)
        self.kill()

    def kill(self) -> None:
        if self.process.is_alive():
            self.process.kill()
            self.process.join(5)
        # a write blocked on the dead worker's pipe fails now; the thread must be gone before
        # the pipe closes (its file descriptor could otherwise be reused under the write)
        self._outbox.put(None)
        self._sender.join(5)
        if self._sender.is_alive():
            log.warning(
                "worker %s: its pipe is still blocked after the worker exited; left open",
                self.process.pid,
            )
            return
        self.conn.close()


class ProcessBackend(Backend):
    """Worker processes on this machine (the default backend)."""

    name = "process"

    def __init__(
        self, workers: int = 2, threads_per_worker: int = 1, gpus_per_worker: float = 0.0
    ) -> None:
        check_workers(workers, threads_per_worker)
        self.workers = workers
        self.threads_per_worker = threads_per_worker
        self.gpus_per_worker = gpus_per_worker  # > 0: workers pinned to GPUs round robin
        self._ctx = mp.get_context("spawn")
        self._pool: list[_Worker] = []
        self._modules: list[str] = []
        self._payload = b""
        self._folder: str | None = None
        self._token = 0

    def _env(self, index: int) -> dict[str, str]:
        n = str(self.threads_per_worker)
        env = {v: n for v in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")}
        if self.gpus_per_worker > 0:
            from pollinate.frameworks.devices import worker_env

            env.update(worker_env(index, self.gpus_per_worker))
        return env

    def start(self, client_fn: ClientFn) -> None:
        self.close()
        self._folder = tempfile.mkdtemp(prefix="pollinate-shared-")
        self._modules = _modules(client_fn)
        try:
            self._pool = [self._spawn(i) for i in range(self.workers)]
        except OSError as exc:
            self.close()
            raise BackendError(f"could not start {self.workers} worker processes: {exc}") from exc
        try:  # while the workers import client_fn's module (torch: 1-2 s)
            self._payload = _share(client_fn, self._folder)
            for worker in self._pool:
                worker.send_client_fn(self._payload)
        except BaseException:
            self.close()
            raise

    def _spawn(self, index: int) -> _Worker:
        return _Worker(self._ctx, self._modules, self._env(index))

    def _replace(self, worker: _Worker) -> _Worker:
        worker.kill()
        fresh = self._spawn(self._pool.index(worker))
        fresh.send_client_fn(self._payload)
        self._pool[self._pool.index(worker)] = fresh
        return fresh

    def run(self, arrays: Arrays, tasks: Sequence[Task], deadline: float) -> Iterator[Outcome]:
        if not self._pool:
            raise BackendError("ProcessBackend.run called before start()")
        payload = serde.dumps(arrays)
        shm = SharedMemory(create=True, size=max(1, len(payload)))
        shm.buf[: len(payload)] = payload  # type: ignore[index]
        self._token += 1
        pending = longest_first(tasks)
        # each worker's tasks in flight, oldest (running) first
        queued: dict[_Worker, deque[Task]] = {w: deque() for w in self._pool}

        def dispatch() -> None:
            """One task per worker, then a second one queued behind it while there are
            enough tasks left for everyone: a worker starts it the moment it has sent the
            first one's result, instead of waiting a round trip for the parent."""
            for depth in range(1, PREFETCH + 1):
                for worker, flight in queued.items():
                    if not pending or time.monotonic() >= deadline:
                        return
                    if depth > 1 and len(pending) < len(queued):
                        return  # the last tasks go to whichever worker frees up first
                    if len(flight) < depth:
                        task = pending.pop(0)
                        worker.send(("task", self._token, shm.name, len(payload), task))
                        flight.append(task)

        def replace_worker(worker: _Worker) -> deque[Task]:
            """Kill ``worker``, put a fresh one in its place; return its tasks in flight."""
            flight = queued.pop(worker)
            queued[self._replace(worker)] = deque()
            return flight

        try:
            while pending or any(queued.values()):
                dispatch()
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    for worker in [w for w, f in queued.items() if f]:
                        running, *waiting = replace_worker(worker)
                        yield timeout_outcome(running, "still running at the round deadline")
                        pending[:0] = waiting
                    for task in pending:
                        yield timeout_outcome(task)
                    pending = []
                    break
                ready = []
                conns = {w.conn: w for w, f in queued.items() if f}
                for conn in wait(list(conns), timeout=remaining):
                    worker = conns[conn]  # type: ignore[index]
                    outcome = self._receive(worker, queued[worker].popleft())
                    if outcome.error and outcome.error.startswith("worker"):
                        pending[:0] = replace_worker(worker)  # queued behind the crash: rerun
                    ready.append(outcome)
                dispatch()  # freed workers start their next task before the results are used
                yield from ready
        finally:
            for worker in [w for w, f in queued.items() if f]:  # abandoned mid-round: don't
                replace_worker(worker)  # leave stale results in a worker's pipe
            shm.close()
            shm.unlink()

    @staticmethod
    def _receive(worker: _Worker, task: Task) -> Outcome:
        try:
            outcome, has_arrays = worker.conn.recv()
            if has_arrays:
                arrays = serde.loads(worker.conn.recv_bytes())
                outcome = replace(outcome, result=replace(outcome.result, arrays=arrays))
            return outcome
        except (EOFError, OSError):
            worker.process.join(1)
            code = worker.process.exitcode
            return Outcome(
                task.client_id,
                task.kind,
                error=f"worker process died (exit code {code}) while running this client",
            )

    def close(self) -> None:
        for worker in self._pool:  # all at once: the workers exit in parallel
            worker.request_stop()
        for worker in self._pool:
            worker.wait_or_kill()
        self._pool = []
        if self._folder:
            shutil.rmtree(self._folder, ignore_errors=True)
            self._folder = None
