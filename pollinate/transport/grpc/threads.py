"""A thread pool that gives its threads back: the gRPC server's executor.

The synchronous gRPC server runs every stream in a thread of the pool it is given, for as
long as the stream lasts. ``concurrent.futures.ThreadPoolExecutor`` never ends a thread it
started, so one burst of streams (a flood of idle connections, a thousand clients
reconnecting at once) leaves the process with that many idle threads for good: 730 of them
after a flood of 1,100 streams. :class:`ElasticThreadPool` starts threads on demand up to
``max_workers`` and ends each one after ``idle_s`` without work.
"""

from __future__ import annotations

import itertools
import queue
import threading
from collections.abc import Callable
from concurrent import futures
from typing import Any

from pollinate.errors import ConfigError

_Item = tuple["futures.Future[Any]", Callable[..., Any], tuple[Any, ...], dict[str, Any]]


class ElasticThreadPool(futures.Executor):
    """``submit`` runs each call in an idle thread, or a new one while fewer than
    ``max_workers`` exist; calls past that wait in order. A thread idle for ``idle_s`` ends."""

    def __init__(self, max_workers: int, *, idle_s: float = 10.0, name: str = "pool") -> None:
        if max_workers < 1:
            raise ConfigError(f"max_workers must be >= 1, got {max_workers}")
        if not idle_s > 0:
            raise ConfigError(f"idle_s must be > 0, got {idle_s}")
        self.max_workers = max_workers
        self.idle_s = float(idle_s)
        self.name = name
        self._queue: queue.SimpleQueue[_Item | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        # Both counts are changed under the lock; a worker that just took an item still counts
        # in both until it says so, so ``idle < pending`` is exact: work nobody will take.
        self._threads = 0
        self.peak = 0  # the most threads alive at once
        self._idle = 0
        self._pending = 0
        self._shutdown = False
        self._ids = itertools.count()
        self._alive: set[threading.Thread] = set()

    @property
    def threads(self) -> int:
        """The threads alive now (busy or idle)."""
        with self._lock:
            return self._threads

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> futures.Future[Any]:
        future: futures.Future[Any] = futures.Future()
        with self._lock:
            if self._shutdown:
                raise RuntimeError("cannot schedule new work after shutdown")
            self._queue.put((future, fn, args, kwargs))
            self._pending += 1
            if self._idle < self._pending and self._threads < self.max_workers:
                self._threads += 1
                self.peak = max(self.peak, self._threads)
                self._idle += 1
                thread = threading.Thread(
                    target=self._work, name=f"{self.name}_{next(self._ids)}", daemon=True
                )
                self._alive.add(thread)
                thread.start()
        return future

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        with self._lock:
            self._shutdown = True
            if cancel_futures:
                while True:
                    try:
                        item = self._queue.get_nowait()
                    except queue.Empty:
                        break
                    if item is not None:
                        self._pending -= 1
                        item[0].cancel()
            for _ in range(self._threads):
                self._queue.put(None)  # one wake-up per thread: it ends
            alive = list(self._alive)
        if wait:
            for thread in alive:
                if thread is not threading.current_thread():
                    thread.join()

    def _work(self) -> None:
        while True:
            try:
                item = self._queue.get(timeout=self.idle_s)
            except queue.Empty:
                with self._lock:
                    if self._pending > self._idle - 1 and not self._shutdown:
                        continue  # work arrived just now that counts on this thread
                    self._exit()
                    return
            if item is None:
                with self._lock:
                    self._exit()
                return
            with self._lock:
                self._idle -= 1
                self._pending -= 1
            future, fn, args, kwargs = item
            if future.set_running_or_notify_cancel():
                try:
                    result = fn(*args, **kwargs)
                except BaseException as exc:
                    future.set_exception(exc)
                else:
                    future.set_result(result)
            del item, future, fn, args, kwargs  # drop references before idling
            with self._lock:
                self._idle += 1

    def _exit(self) -> None:  # under the lock
        self._idle -= 1
        self._threads -= 1
        self._alive.discard(threading.current_thread())
