"""A virtual clock: clients' tasks judged on simulated device and network time, never slept.

``VirtualClockExecutor`` wraps any executor (``SimulationExecutor``) with an ``Environment``.
For each client a round plans, in order:

1. **offline** (drawn per round, seeded): fails at once with ``"offline: …"`` and never runs;
2. the model download is **lost** (``"lost: …"``) or arrives **corrupted** and is caught by
   its checksum (``"corrupted: …"``): the client does not run;
3. if latency and download alone pass the deadline the client does not run either
   (``"timeout: …"``): it could not have answered in time, whatever it computed;
4. the others run on the wrapped executor; each outcome's simulated duration is::

       latency + bytes_down / downlink + compute + bytes_up / uplink

   where ``bytes_down`` is the serialized size (``pollinate.serde``) of the arrays the client
   was sent (the broadcast counted once per client), ``bytes_up`` that of the arrays it
   returned, and compute the measured task seconds / ``speed``, or ``num_examples × epochs ×
   seconds_per_example`` (``epochs`` from the train config; 1 for evaluate and query);
5. a duration past the deadline is a **timeout** (``"timeout: simulated duration X s >
   deadline Y s"``); otherwise the upload may be **lost** or **corrupted** (rejected on
   arrival, never averaged in). A failure never carries a result.

Every outcome carries its simulated duration as ``Outcome.duration_s`` (None for offline
clients and lost downloads, whose duration nobody saw; a lower bound for a client whose
download alone missed the deadline): what a deadline-aware selection policy learns from.

A round's phase (training, then evaluation) lasts until the last result that arrived by the
deadline, or the whole deadline when the server was left waiting for one that never came (a
timeout or a lost transfer; with an infinite deadline, a lost transfer is noticed when it would
have ended). Offline clients refuse the connection at once and cost no time. The clock adds
up the phases; ``round_stats(round)`` reports a round's simulated time, bytes and per-client
timings. Bytes count what left the sender: every online client's download, and every upload
of a client that ran, whatever happened to it on the way.

Measured compute seconds vary from run to run, and so would deadline decisions near the
edge: give every tier ``seconds_per_example`` for runs whose drops must be reproducible.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import numpy as np

from pollinate.serde import payload_size
from pollinate.server import Callback
from pollinate.simulation.environment import ClientProfile, Environment
from pollinate.strategy.check import failure_kind

__all__ = ["ClockRecorder", "VirtualClockExecutor", "failure_kind"]
from pollinate.types import (
    Arrays,
    ClientId,
    EvaluateRes,
    Instructions,
    Outcome,
    QueryRes,
    TaskKind,
    TrainRes,
)

#: the failure kinds the environment adds to a strategy's error | timeout | rejected


class _Executor(Protocol):
    def submit(
        self,
        round_number: int,
        kind: TaskKind,
        plan: Sequence[tuple[ClientId, Instructions]],
        timeout_s: float,
    ) -> Iterator[Outcome]: ...


@dataclass
class TaskTiming:
    """One client's task on the virtual clock."""

    status: str  # ok | offline | lost | corrupted | timeout | error
    duration_s: float | None  # simulated seconds until its answer arrived (None: offline)
    made_deadline: bool
    bytes_down: int = 0
    bytes_up: int = 0
    tier: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "tier": self.tier,
            "status": self.status,
            "duration_s": None if self.duration_s is None else round(self.duration_s, 6),
            "made_deadline": self.made_deadline,
            "bytes_down": self.bytes_down,
            "bytes_up": self.bytes_up,
        }


@dataclass
class _Phase:
    """One ``submit`` of a round: its deadline, timings and whether the server waited."""

    kind: TaskKind
    deadline_s: float
    timings: dict[ClientId, TaskTiming] = field(default_factory=dict)
    waited: bool = False  # someone's answer never came: the phase lasts the whole deadline
    lost_ends: list[float] = field(default_factory=list)  # when lost transfers would end

    def seconds(self) -> float:
        arrived = [
            t.duration_s
            for t in self.timings.values()
            if t.duration_s is not None and t.made_deadline and t.status != "lost"
        ]
        end = max(arrived, default=0.0)
        if self.waited:
            if math.isinf(self.deadline_s):
                return max([end, *self.lost_ends])
            return max(end, self.deadline_s)
        return end


def _fmt(seconds: float) -> str:
    return f"{seconds:.6g}"


class VirtualClockExecutor:
    """``executor`` with every task judged on simulated time (see the module docstring).

    ``deadline_s``: the simulated round deadline; None takes the ``timeout_s`` each
    ``submit`` is given (the strategy's ``round_timeout_s``), which also stays the wall-clock
    limit passed on to ``executor``. Same ``submit`` as ``pollinate.server.Executor``.
    """

    def __init__(
        self, executor: _Executor, environment: Environment, deadline_s: float | None = None
    ) -> None:
        if deadline_s is not None and not deadline_s > 0:
            raise ValueError(f"deadline_s must be > 0 (or None), got {deadline_s}")
        self.executor = executor
        self.environment = environment
        self.deadline_s = deadline_s
        self.clock_s = 0.0  # simulated seconds since the run started
        self._rounds: dict[int, list[_Phase]] = {}
        self._round_start: dict[int, float] = {}

    def submit(
        self,
        round_number: int,
        kind: TaskKind,
        plan: Sequence[tuple[ClientId, Instructions]],
        timeout_s: float,
    ) -> Iterator[Outcome]:
        deadline = self.deadline_s if self.deadline_s is not None else timeout_s
        if round_number not in self._round_start:
            self._round_start[round_number] = self.clock_s
            for old in [r for r in self._rounds if r < round_number - 1]:
                del self._rounds[old]  # keep only the last rounds: memory stays flat
                self._round_start.pop(old, None)
        phase = _Phase(kind, float(deadline))
        self._rounds.setdefault(round_number, []).append(phase)
        return self._stream(round_number, kind, list(plan), timeout_s, phase)

    def _stream(
        self,
        round_number: int,
        kind: TaskKind,
        plan: list[tuple[ClientId, Instructions]],
        timeout_s: float,
        phase: _Phase,
    ) -> Iterator[Outcome]:
        try:
            yield from self._judge(round_number, kind, plan, timeout_s, phase)
        finally:
            self.clock_s += phase.seconds()

    def _judge(
        self,
        round_number: int,
        kind: TaskKind,
        plan: list[tuple[ClientId, Instructions]],
        timeout_s: float,
        phase: _Phase,
    ) -> Iterator[Outcome]:
        env, deadline = self.environment, phase.deadline_s
        ids = np.array([cid for cid, _ in plan], dtype=np.int64)
        online = env.online(round_number, self._round_start[round_number], ids)
        errors = env.transfers(round_number, kind, ids)
        profiles = {p.client_id: p for p in self.profiles(ids)}
        sizes: dict[int, int] = {}  # one serialized size per distinct broadcast
        run: list[tuple[ClientId, Instructions]] = []
        before: dict[ClientId, float] = {}  # latency + download, of those that run
        refused: list[Outcome] = []
        for i, (cid, ins) in enumerate(plan):
            p = profiles[cid]
            if not online[i]:
                phase.timings[cid] = TaskTiming("offline", None, False, tier=p.tier)
                refused.append(Outcome(cid, kind, error=f"offline: client {cid} is unreachable"))
                continue
            if id(ins.arrays) not in sizes:
                sizes[id(ins.arrays)] = payload_size(ins.arrays)
            down = sizes[id(ins.arrays)]
            t_down = p.latency_ms / 1000 + p.download_s(down)
            if errors["lost_down"][i]:
                phase.timings[cid] = TaskTiming("lost", None, False, down, tier=p.tier)
                phase.waited = True
                phase.lost_ends.append(t_down)
                refused.append(Outcome(cid, kind, error="lost: the model download was lost"))
            elif t_down > deadline:
                phase.timings[cid] = TaskTiming("timeout", t_down, False, down, tier=p.tier)
                phase.waited = True
                why = (
                    f"timeout: simulated duration of at least {_fmt(t_down)} s (latency and "
                    f"download alone) > deadline {_fmt(deadline)} s"
                )
                refused.append(Outcome(cid, kind, error=why, duration_s=t_down))
            elif errors["corrupt_down"][i]:
                phase.timings[cid] = TaskTiming("corrupted", t_down, True, down, tier=p.tier)
                why = "corrupted: the model download failed its checksum; the client did not run"
                refused.append(Outcome(cid, kind, error=why, duration_s=t_down))
            else:
                phase.timings[cid] = TaskTiming("ok", None, False, down, tier=p.tier)
                before[cid] = t_down
                run.append((cid, ins))
        yield from sorted(refused, key=lambda o: o.client_id)
        if not run:
            return
        index = {cid: i for i, (cid, _) in enumerate(plan)}
        config = {cid: ins.config for cid, ins in run}
        for outcome in self.executor.submit(round_number, kind, run, timeout_s):
            cid = outcome.client_id
            i, timing, p = index[cid], phase.timings[cid], profiles[cid]
            yield self._finish(outcome, timing, p, before[cid], config[cid], errors, i, phase)

    def _finish(
        self,
        outcome: Outcome,
        timing: TaskTiming,
        p: ClientProfile,
        t_down: float,
        config: dict[str, Any],
        errors: dict[str, np.ndarray],
        i: int,
        phase: _Phase,
    ) -> Outcome:
        """Judge one outcome of a client that ran: its duration, the deadline, the upload."""
        deadline, cid, kind = phase.deadline_s, outcome.client_id, outcome.kind
        res = outcome.result
        examples = res.num_examples if isinstance(res, (TrainRes, EvaluateRes, QueryRes)) else None
        epochs = float(config.get("epochs", 1)) if kind == "train" else 1.0
        compute = p.compute_s(outcome.seconds, examples, epochs)
        if outcome.error is not None:  # the client raised, died, or ran out of wall time
            timing.status = failure_kind(outcome.error)
            timing.duration_s = t_down + compute
            timing.made_deadline = timing.status == "error" and timing.duration_s <= deadline
            phase.waited |= not timing.made_deadline
            return replace(outcome, duration_s=timing.duration_s)
        arrays: Arrays = res.arrays if isinstance(res, (TrainRes, QueryRes)) else []
        timing.bytes_up = payload_size(arrays) if arrays else 0
        duration = t_down + compute + p.upload_s(timing.bytes_up)
        timing.duration_s = duration
        if duration > deadline:
            timing.status = "timeout"
            phase.waited = True
            why = f"timeout: simulated duration {_fmt(duration)} s > deadline {_fmt(deadline)} s"
            return Outcome(cid, kind, error=why, seconds=outcome.seconds, duration_s=duration)
        if errors["lost_up"][i]:
            timing.status = "lost"
            phase.waited = True
            phase.lost_ends.append(duration)
            why = "lost: the upload was lost"
            return Outcome(cid, kind, error=why, seconds=outcome.seconds, duration_s=duration)
        timing.made_deadline = True
        if errors["corrupt_up"][i]:
            timing.status = "corrupted"
            why = "corrupted: the upload failed its checksum and was rejected"
            return Outcome(cid, kind, error=why, seconds=outcome.seconds, duration_s=duration)
        return replace(outcome, duration_s=duration)

    def profiles(self, client_ids: np.ndarray) -> list[ClientProfile]:
        """The profiles of ``client_ids`` (one object per sampled client, never per client
        of the population)."""
        return self.environment.profiles(client_ids)

    def round_stats(self, round_number: int) -> dict[str, Any]:
        """Round ``round_number`` on the virtual clock (``{}`` if it is not one of the last
        two rounds submitted)::

            {"simulated_time_s": s, "clock_s": s since the run started, at the round's end,
             "bytes_down": n, "bytes_up": n, "deadline_s": s,
             "train": {"simulated_time_s", "bytes_down", "bytes_up", "offline", "lost",
                       "corrupted", "timeouts"},          (and "evaluate" / "query")
             "clients": {"<id>": {"train": {"tier", "status", "duration_s",
                                            "made_deadline", "bytes_down", "bytes_up"}, …}}}
        """
        phases = self._rounds.get(round_number)
        if not phases:
            return {}
        out: dict[str, Any] = {}
        clients: dict[str, dict[str, Any]] = {}
        total = 0.0
        for phase in phases:
            seconds = phase.seconds()
            total += seconds
            stats = out.setdefault(
                phase.kind,
                {
                    "simulated_time_s": 0.0,
                    "bytes_down": 0,
                    "bytes_up": 0,
                    "offline": 0,
                    "lost": 0,
                    "corrupted": 0,
                    "timeouts": 0,
                },
            )
            stats["simulated_time_s"] += seconds
            for cid, t in phase.timings.items():
                stats["bytes_down"] += t.bytes_down
                stats["bytes_up"] += t.bytes_up
                key = "timeouts" if t.status == "timeout" else t.status
                if key in stats:
                    stats[key] += 1
                clients.setdefault(str(cid), {})[phase.kind] = t.to_dict()
        for stats in out.values():
            stats["simulated_time_s"] = round(stats["simulated_time_s"], 6)
        kinds = list(out)
        start = self._round_start[round_number]
        return {
            "simulated_time_s": round(total, 6),
            "clock_s": round(start + total, 6),
            "bytes_down": sum(out[k]["bytes_down"] for k in kinds),
            "bytes_up": sum(out[k]["bytes_up"] for k in kinds),
            "deadline_s": None if math.isinf(deadline := phases[0].deadline_s) else deadline,
            **out,
            "clients": clients,
        }


class ClockRecorder(Callback):
    """Adds each round's virtual-clock statistics to its history record, under
    ``"environment"`` (put it first among the callbacks, so that those writing the history
    see it)."""

    def __init__(self, clock: VirtualClockExecutor) -> None:
        self.clock = clock

    def on_round_end(self, record: dict[str, Any], arrays: Arrays) -> None:
        stats = self.clock.round_stats(int(record["round"]))
        if stats:
            record["environment"] = stats
