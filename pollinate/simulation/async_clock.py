"""The asynchronous loop's clients on the virtual clock: event-driven, never slept.

``AsyncClock`` is the executor ``pollinate.asynchronous.run_async`` drives in simulation.
``start`` dispatches one client's training at the current simulated time ``now``; ``next``
returns the outcome of the client that finishes first on the simulated clock and moves
``now`` to that moment. A task's simulated duration is the virtual clock's
(``pollinate.simulation.clock``)::

    latency + bytes_down / downlink + compute + bytes_up / uplink

with compute ``num_examples × epochs × seconds_per_example`` (or the measured seconds /
``speed`` for a profile without ``seconds_per_example``). The environment's draws are keyed by
the dispatch number instead of a round: a client is **offline** (it fails at once and costs no
time), its download or upload is **lost** (noticed at the task timeout, or when the transfer
would have ended if there is none) or **corrupted** (rejected on arrival), or it takes longer
than the task timeout (``timeout_s``; the slot is freed at ``start + timeout_s``). A client
that raises reports its error right after its download when its profile gives
``seconds_per_example`` (there is no example count to charge), after its measured seconds /
``speed`` otherwise.

The training itself really runs on the backend, lazily and in batches: a dispatched client
is only trained when the next event cannot be decided without its duration (its earliest
possible end, ``start + latency + download``, comes before the earliest known end). Then
every dispatched client not yet trained runs in one batch (``SimulationExecutor.
submit_tasks``: in parallel on the process backend, one backend call per model version),
together with the dispatches the loop expects next on the same model (``prefetch``: the
clients its seeded picks will choose while the buffer fills, up to ``buffer_size − 1``). A
client's result depends only on the model it was sent, its data, its state and its task seed,
never on when the backend ran it: a prefetched result is used only when the real dispatch has
the same number, client and model, its client state is saved only then, and a wrong guess is
dropped (its client's state untouched). So the simulated history is the same whatever the
backend and however the batches fall: the same seed gives the same history (ties in time go
to the earlier dispatch).
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from pollinate.serde import payload_size
from pollinate.simulation.engine import SimulationExecutor
from pollinate.simulation.environment import ClientProfile, Environment
from pollinate.types import ClientId, Outcome, TrainIns, TrainRes

#: the environment of a simulation without one: every client the same device, computing
#: ``SECONDS_PER_EXAMPLE`` simulated seconds per example and epoch, on an instant network
SECONDS_PER_EXAMPLE = 0.001


def uniform_environment(num_clients: int, seed: int = 0) -> Environment:
    """The environment an asynchronous simulation uses when given none (see
    ``SECONDS_PER_EXAMPLE``): arrivals are ordered by the clients' example counts, the same in
    every run."""
    tier = {"name": "uniform", "share": 1.0, "seconds_per_example": SECONDS_PER_EXAMPLE}
    return Environment.from_tiers([tier], num_clients, seed=seed)


def _fmt(seconds: float) -> str:
    return f"{seconds:.6g}"


@dataclass
class _Waiting:
    """A dispatched client whose training has not run yet."""

    task: int
    client_id: ClientId
    ins: TrainIns
    start: float
    t_down: float  # latency + download
    profile: ClientProfile
    errors: dict[str, bool]
    bytes_down: int


class AsyncClock:
    """Dispatched clients' tasks on the virtual clock (see the module docstring).

    ``timeout_s``: the simulated seconds a task may take (``inf``: none).
    """

    def __init__(
        self, executor: SimulationExecutor, environment: Environment, timeout_s: float
    ) -> None:
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        self.executor = executor
        self.environment = environment
        self.timeout_s = float(timeout_s)
        self.wall_timeout_s = 600.0  # the backend's real-time limit for one batch
        self.now = 0.0
        # (end, task, outcome, bytes up, failure counted on arrival): a heap
        self._events: list[tuple[float, int, Outcome, int, str]] = []
        self._waiting: dict[int, _Waiting] = {}
        self._sizes: dict[int, int] = {}  # serialized size per broadcast
        self._guesses: dict[int, tuple[ClientId, TrainIns]] = {}  # expected dispatches
        self._cache: dict[int, tuple[ClientId, TrainIns, Outcome]] = {}  # their results
        self.stats = self._fresh_stats()

    @staticmethod
    def _fresh_stats() -> dict[str, Any]:
        return {"bytes_down": 0, "bytes_up": 0, "offline": 0, "lost": 0, "corrupted": 0}

    def take_stats(self) -> dict[str, Any]:
        """Since the last call: bytes sent (downloads when dispatched, uploads when they
        arrive) and the environment's failures that arrived."""
        stats, self.stats = self.stats, self._fresh_stats()
        return stats

    # dispatch ----------------------------------------------------------------------------

    def prefetch(self, guesses: list[tuple[int, ClientId]], ins: TrainIns) -> None:
        """The dispatches expected next, ``(task, client)``, all from ``ins``: trained with
        the next batch that must run, kept until their real dispatch (see the module
        docstring)."""
        self._guesses = {t: (cid, ins) for t, cid in guesses if t not in self._cache}

    def _prefetched(self, task: int, client_id: ClientId, ins: TrainIns) -> Outcome | None:
        """The prefetched outcome of exactly this dispatch (None: none); forgets the
        guesses it makes stale."""
        hit = self._cache.pop(task, None)
        for t in [t for t, (cid, _, _) in self._cache.items() if t < task or cid == client_id]:
            del self._cache[t]  # passed, or its client's state is about to change
        for t in [t for t, (cid, _) in self._guesses.items() if t <= task or cid == client_id]:
            del self._guesses[t]
        if hit is None or hit[0] != client_id or hit[1] is not ins:
            return None
        return hit[2]

    def start(self, task: int, client_id: ClientId, ins: TrainIns) -> None:
        """Dispatch ``client_id``'s training at ``now`` (``task``: the dispatch number)."""
        prefetched = self._prefetched(task, client_id, ins)
        env = self.environment
        ids = np.array([client_id], dtype=np.int64)
        profile = env.profiles(ids)[0]
        if not env.online(task, self.now, ids)[0]:
            why = f"offline: client {client_id} is unreachable"
            self._at(self.now, task, Outcome(client_id, "train", error=why), stat="offline")
            return
        draws = {k: bool(v[0]) for k, v in env.transfers(task, "train", ids).items()}
        key = id(ins.arrays)
        if key not in self._sizes:
            self._sizes = {key: payload_size(ins.arrays)}  # one version at a time is current
        down = self._sizes[key]
        self.stats["bytes_down"] += down
        t_down = profile.latency_ms / 1000 + profile.download_s(down)
        if draws["lost_down"]:
            end = t_down if math.isinf(self.timeout_s) else self.timeout_s
            why = "lost: the model download was lost"
            self._at(self.now + end, task, Outcome(client_id, "train", error=why), stat="lost")
        elif t_down > self.timeout_s:
            why = (
                f"timeout: simulated duration of at least {_fmt(t_down)} s (latency and "
                f"download alone) > task timeout {_fmt(self.timeout_s)} s"
            )
            self._at(self.now + self.timeout_s, task, Outcome(client_id, "train", error=why))
        elif draws["corrupt_down"]:
            why = "corrupted: the model download failed its checksum; the client did not run"
            bad = Outcome(client_id, "train", error=why)
            self._at(self.now + t_down, task, bad, stat="corrupted")
        else:
            waiting = _Waiting(task, client_id, ins, self.now, t_down, profile, draws, down)
            if prefetched is None:
                self._waiting[task] = waiting
                return
            if prefetched.ok and prefetched.state is not None:
                self.executor.state_store.put(client_id, prefetched.state)
            self._arrival(waiting, prefetched)

    def _at(self, end: float, task: int, outcome: Outcome, up: int = 0, stat: str = "") -> None:
        """Schedule ``outcome`` at simulated time ``end``; its upload's bytes and failure
        count when it arrives (batches run ahead of the clock)."""
        heapq.heappush(self._events, (end, task, outcome, up, stat))

    # the next event ----------------------------------------------------------------------

    def pending(self) -> int:
        """Tasks dispatched whose outcome has not been returned yet."""
        return len(self._events) + len(self._waiting)

    def next(self) -> tuple[int, Outcome]:
        """The outcome that arrives first in simulated time, as ``(task, outcome)``; ``now``
        moves to its arrival."""
        if not self.pending():
            raise RuntimeError("AsyncClock.next called with no task in flight")
        earliest_possible = min(
            (w.start + w.t_down for w in self._waiting.values()), default=math.inf
        )
        if not self._events or self._events[0][0] >= earliest_possible:
            self._run_waiting()
        end, task, outcome, up, stat = heapq.heappop(self._events)
        self.now = max(self.now, end)
        self.stats["bytes_up"] += up
        if stat:
            self.stats[stat] += 1
        return task, outcome

    def _run_waiting(self) -> None:
        """Train every dispatched client not trained yet, in one batch, and schedule their
        arrivals."""
        waiting, self._waiting = self._waiting, {}
        guesses, self._guesses = self._guesses, {}
        plan = [(w.task, w.client_id, w.ins) for w in waiting.values()]
        by_client = {w.client_id: w for w in waiting.values()}
        guessed = {cid: task for task, (cid, _) in guesses.items() if cid not in by_client}
        plan += [(task, cid, guesses[task][1]) for cid, task in guessed.items()]
        for outcome in self.executor.submit_tasks(
            "train", plan, self.wall_timeout_s, hold_state=guessed
        ):
            cid = outcome.client_id
            if cid in by_client:
                self._arrival(by_client[cid], outcome)
            else:
                task = guessed[cid]
                self._cache[task] = (cid, guesses[task][1], outcome)

    def _arrival(self, w: _Waiting, outcome: Outcome) -> None:
        """Judge one trained client: its duration, the timeout, the upload."""
        cid, res = w.client_id, outcome.result
        examples = res.num_examples if isinstance(res, TrainRes) else None
        epochs = float(w.ins.config.get("epochs", 1))
        compute = w.profile.compute_s(outcome.seconds, examples, epochs)
        if outcome.error is not None:  # the client raised, or its worker died
            if w.profile.seconds_per_example > 0:
                compute = 0.0  # no example count to charge: its error comes back at once
            self._at(w.start + min(w.t_down + compute, self.timeout_s), w.task, outcome)
            return
        up = payload_size(res.arrays) if isinstance(res, TrainRes) else 0
        duration = w.t_down + compute + w.profile.upload_s(up)
        if duration > self.timeout_s:
            why = (
                f"timeout: simulated duration {_fmt(duration)} s > task timeout "
                f"{_fmt(self.timeout_s)} s"
            )
            failed = Outcome(cid, "train", error=why, seconds=outcome.seconds)
            self._at(w.start + self.timeout_s, w.task, failed, up)
        elif w.errors["lost_up"]:
            end = duration if math.isinf(self.timeout_s) else self.timeout_s
            lost = Outcome(cid, "train", error="lost: the upload was lost", seconds=outcome.seconds)
            self._at(w.start + end, w.task, lost, up, "lost")
        elif w.errors["corrupt_up"]:
            why = "corrupted: the upload failed its checksum and was rejected"
            bad = Outcome(cid, "train", error=why, seconds=outcome.seconds)
            self._at(w.start + duration, w.task, bad, up, "corrupted")
        else:
            self._at(w.start + duration, w.task, outcome, up)

    def close(self) -> None:
        """Forget the tasks in flight."""
        self._events, self._waiting, self._guesses, self._cache = [], {}, {}, {}
