"""Real-world conditions of simulated clients: device and network profiles, seeded draws.

Every client has a profile (``ClientProfile``):

- compute: ``speed``, a multiplier of the speed measured on this machine (0.5: the task's
  measured seconds count twice), or ``seconds_per_example`` (> 0 wins over ``speed``): local
  training costs ``num_examples × epochs × seconds_per_example`` simulated seconds, the same
  on every machine and every run, so deadline decisions are reproducible;
- network: ``downlink_mbps`` and ``uplink_mbps`` (Mbit/s, 10^6 bits; ``inf``: instant) and a
  ``latency_ms`` charged once per task;
- availability: ``online``, the probability that the client is reachable in a round, and/or
  an on/off cycle in simulated seconds (``on_s`` online then ``off_s`` offline, each client at
  its own seeded phase), judged at the round's start on the virtual clock;
- transmission errors: ``loss`` and ``corrupt``, the probability that one transfer (the model
  download, or the update upload) is lost, or arrives corrupted and is caught by its
  checksum.

Profiles come from named *tiers* with shares (``[environment] tiers = [{share = 0.6, …}, …]``:
exactly ``round(share × N)`` clients per tier, largest remainders first, assigned in a seeded
random order) or from a CSV *trace* with one row per client (a header row names the columns;
``client_id`` optional). Memory is flat in the number of clients: tiers keep one int8 tier
index per client (1 MB for 1,000,000 clients), a trace one float64 column per given field;
``profile(cid)`` builds a profile on demand, and every random draw of a round (online, lost,
corrupted) is a counter-based hash of ``(seed, round, purpose, client id)``: the same seed
gives the same environment and the same draws, whichever clients are sampled and in whatever
order they run.
"""

from __future__ import annotations

import csv
import difflib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pollinate.errors import ConfigError
from pollinate.types import ClientId, TaskKind

#: the profile fields a tier or a trace may set, with their defaults
DEFAULTS: dict[str, float] = {
    "speed": 1.0,
    "seconds_per_example": 0.0,
    "downlink_mbps": math.inf,
    "uplink_mbps": math.inf,
    "latency_ms": 0.0,
    "online": 1.0,
    "on_s": 0.0,
    "off_s": 0.0,
    "loss": 0.0,
    "corrupt": 0.0,
}
FIELDS: tuple[str, ...] = tuple(DEFAULTS)
#: the keys a tier may have: the profile fields, its share and a name
TIER_KEYS: tuple[str, ...] = ("share", "name", *FIELDS)
PROBABILITIES = ("online", "loss", "corrupt")

# purposes of the hashed draws (online is per round; transfers per round and task kind)
_PHASE, _ONLINE = 1, 2
_TRANSFERS = {"lost_down": 0, "corrupt_down": 1, "lost_up": 2, "corrupt_up": 3}
_KIND_CODE = {"train": 0, "evaluate": 1, "query": 2}


@dataclass(frozen=True)
class ClientProfile:
    """One client's device and network, as ``Environment.profile`` builds it on demand."""

    client_id: ClientId
    tier: str  # the tier's name, or "trace"
    speed: float = 1.0
    seconds_per_example: float = 0.0
    downlink_mbps: float = math.inf
    uplink_mbps: float = math.inf
    latency_ms: float = 0.0
    online: float = 1.0
    on_s: float = 0.0
    off_s: float = 0.0
    phase_s: float = 0.0  # where in its on/off cycle the client is at simulated time 0
    loss: float = 0.0
    corrupt: float = 0.0

    def download_s(self, nbytes: int) -> float:
        """Simulated seconds to receive ``nbytes`` bytes."""
        return transfer_s(nbytes, self.downlink_mbps)

    def upload_s(self, nbytes: int) -> float:
        """Simulated seconds to send ``nbytes`` bytes."""
        return transfer_s(nbytes, self.uplink_mbps)

    def compute_s(self, measured_s: float, num_examples: int | None, epochs: float) -> float:
        """Simulated compute seconds: ``num_examples × epochs × seconds_per_example`` when
        both are known, else the measured seconds divided by ``speed``."""
        if self.seconds_per_example > 0 and num_examples is not None:
            return num_examples * epochs * self.seconds_per_example
        return measured_s / self.speed


def transfer_s(nbytes: int, mbps: float) -> float:
    """Seconds to move ``nbytes`` bytes at ``mbps`` Mbit/s (``inf``: 0)."""
    return 0.0 if math.isinf(mbps) else nbytes * 8 / (mbps * 1e6)


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer (Steele, Lea & Flood 2014) on a uint64 array: a bijection whose
    outputs look independent for consecutive inputs."""
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def uniforms(seed: int, key: Sequence[int], client_ids: np.ndarray) -> np.ndarray:
    """One uniform [0, 1) draw per client id, a pure function of ``(seed, key, client id)``."""
    k = np.random.SeedSequence([seed, *key]).generate_state(1, dtype=np.uint64)
    ids = np.asarray(client_ids, dtype=np.uint64).reshape(-1)
    with np.errstate(over="ignore"):
        bits = _mix(_mix(ids + np.uint64(0x9E3779B97F4A7C15)) ^ k)
    return (bits >> np.uint64(11)).astype(np.float64) * 2.0**-53


def _name(kind: str, key: str, known: Sequence[str]) -> ConfigError:
    close = difflib.get_close_matches(key, known, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return ConfigError(f"unknown {kind} {key!r}{hint}; allowed: {', '.join(known)}")


def check_value(key: str, value: Any, name: str) -> float:
    """Profile field ``key``'s ``value`` as a float, or a ConfigError naming it ``name`` and
    saying the allowed range."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ConfigError(f"{name} must be a number, got {value!r}")
    v = float(value)
    if math.isnan(v):
        raise ConfigError(f"{name} must be a number, got nan")
    if key in PROBABILITIES and not 0.0 <= v <= 1.0:
        raise ConfigError(f"{name} is a probability: between 0 and 1, got {v}")
    if key in ("speed", "downlink_mbps", "uplink_mbps") and not v > 0:
        raise ConfigError(f"{name} must be > 0 (inf: unlimited), got {v}")
    if key in ("seconds_per_example", "latency_ms", "on_s", "off_s") and not v >= 0:
        raise ConfigError(f"{name} must be >= 0, got {v}")
    if key in ("speed", "seconds_per_example", "latency_ms", "on_s", "off_s") and math.isinf(v):
        raise ConfigError(f"{name} must be finite, got {v}")
    return v


def _check_column(key: str, column: np.ndarray, where: str) -> None:
    """``check_value`` over a whole trace column, naming the first bad client."""
    if key in PROBABILITIES:
        bad = ~((column >= 0) & (column <= 1))
    elif key in ("speed", "downlink_mbps", "uplink_mbps"):
        bad = ~(column > 0)
    else:
        bad = ~(column >= 0)
    if key in ("speed", "seconds_per_example", "latency_ms", "on_s", "off_s"):
        bad |= np.isinf(column)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        check_value(key, float(column[i]), f"{where}, client {i}: {key}")


def _check_cycle(where: str, on_s: float, off_s: float) -> None:
    if (on_s > 0) != (off_s > 0):
        raise ConfigError(
            f"{where}: an on/off cycle needs both on_s and off_s > 0 (got on_s = {on_s:g}, "
            f"off_s = {off_s:g}); set both, or neither for a client that is never cycled off"
        )


def parse_tiers(tiers: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Validate ``[environment] tiers``: each a table of ``TIER_KEYS`` with a share > 0, the
    shares summing to 1; returns them with every field filled in (names default to
    ``tier0``, ``tier1`` …)."""
    if not tiers:
        raise ConfigError("environment.tiers is empty; give at least one tier, or none at all")
    out = []
    for i, tier in enumerate(tiers):
        where = f"environment.tiers[{i}]"
        if not isinstance(tier, Mapping):
            raise ConfigError(f"{where} must be a table {{share = …, …}}, got {tier!r}")
        for key in tier:
            if key not in TIER_KEYS:
                raise _name(f"key in {where}", str(key), TIER_KEYS)
        if "share" not in tier:
            raise ConfigError(f"{where} has no share: say which fraction of clients it holds")
        name = tier.get("name", f"tier{i}")
        if not isinstance(name, str) or not name:
            raise ConfigError(f"{where}.name must be a non-empty string, got {name!r}")
        share = check_value("share", tier["share"], f"{where}.share")
        if not 0 < share <= 1:
            raise ConfigError(f"{where}.share must be in (0, 1], got {share}")
        filled: dict[str, Any] = {"name": name, "share": share}
        for key in FIELDS:
            filled[key] = check_value(key, tier.get(key, DEFAULTS[key]), f"{where}.{key}")
        _check_cycle(where, filled["on_s"], filled["off_s"])
        out.append(filled)
    total = sum(t["share"] for t in out)
    if abs(total - 1.0) > 1e-6:
        raise ConfigError(f"environment.tiers' shares sum to {total:g}; they must sum to 1")
    names = [t["name"] for t in out]
    if len(set(names)) != len(names):
        raise ConfigError(f"environment.tiers have repeated names: {names}")
    return out


def tier_counts(shares: Sequence[float], num_clients: int) -> np.ndarray:
    """Clients per tier: ``floor(share × N)``, the rest one each to the largest remainders
    (ties to the earlier tier), so the counts sum to ``N``."""
    exact = np.asarray(shares, dtype=np.float64) * num_clients
    counts = np.floor(exact).astype(np.int64)
    rest = num_clients - int(counts.sum())
    order = np.argsort(-(exact - counts), kind="stable")
    counts[order[:rest]] += 1
    return counts


class Environment:
    """The devices and networks of ``num_clients`` clients, and the seeded draws of each round.

    Build one with ``from_tiers``, ``from_trace`` or ``from_config``. Internally a table of
    rows (one per tier, or one per client for a trace) and, for tiers, one small integer per
    client naming its row.
    """

    def __init__(
        self,
        table: Mapping[str, np.ndarray],
        num_clients: int,
        *,
        seed: int = 0,
        row_of: np.ndarray | None = None,
        names: Sequence[str] = (),
    ) -> None:
        if num_clients < 1:
            raise ConfigError(f"num_clients must be >= 1, got {num_clients}")
        self.num_clients = int(num_clients)
        self.seed = int(seed)
        self.row_of = row_of  # None: row = client id (a trace)
        rows = len(names) if row_of is not None else num_clients
        self.table = {
            key: np.asarray(table.get(key, np.full(rows, DEFAULTS[key])), dtype=np.float64)
            for key in FIELDS
        }
        self.names = list(names)
        self.cycled = bool((self.table["on_s"] > 0).any())

    # construction ---------------------------------------------------------------------

    @classmethod
    def from_tiers(
        cls, tiers: Sequence[Mapping[str, Any]], num_clients: int, seed: int = 0
    ) -> Environment:
        """Clients split among ``tiers`` by their shares, in a seeded random order."""
        parsed = parse_tiers(tiers)
        counts = tier_counts([t["share"] for t in parsed], num_clients)
        dtype = np.int8 if len(parsed) <= 127 else np.int32
        row_of = np.repeat(np.arange(len(parsed), dtype=dtype), counts)
        np.random.default_rng([seed, 0x7E5]).shuffle(row_of)
        table = {key: np.array([t[key] for t in parsed], dtype=np.float64) for key in FIELDS}
        return cls(table, num_clients, seed=seed, row_of=row_of, names=[t["name"] for t in parsed])

    @classmethod
    def from_trace(cls, path: str | Path, num_clients: int, seed: int = 0) -> Environment:
        """One row per client from a CSV file with a header of ``FIELDS`` (absent columns take
        their defaults) and optionally ``client_id`` (otherwise row ``i`` is client ``i``).
        Rows beyond ``num_clients`` are ignored; fewer rows are an error."""
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"environment.trace {p} does not exist")
        with p.open(newline="", encoding="utf-8") as f:
            header = [h.strip() for h in next(csv.reader(f), [])]
            for name in header:
                if name not in ("client_id", *FIELDS):
                    raise _name(f"column in {p}", name, ("client_id", *FIELDS))
            if not header or len(set(header)) != len(header):
                raise ConfigError(f"{p}: the header must name distinct columns, got {header}")
            try:  # NumPy's C parser: a million rows in about a second
                values = np.loadtxt(f, delimiter=",", dtype=np.float64, ndmin=2)
            except ValueError as exc:
                raise ConfigError(f"{p} is not a CSV of numbers under its header: {exc}") from None
        if values.size and values.shape[1] != len(header):
            raise ConfigError(f"{p}: rows have {values.shape[1]} fields, the header {len(header)}")
        rows = values.shape[0]
        if rows < num_clients:
            raise ConfigError(
                f"environment.trace {p} has {rows} client rows, fewer than the {num_clients} "
                "clients of the run: add rows, or lower data.num_clients"
            )
        data = {key: values[:, j] for j, key in enumerate(header)}
        if "client_id" in data:
            ids = data.pop("client_id")
            if not np.array_equal(np.sort(ids), np.arange(rows)):
                raise ConfigError(f"{p}: client_id must hold each of 0..{rows - 1} once")
            order = np.argsort(ids)
            data = {key: col[order] for key, col in data.items()}
        data = {key: np.ascontiguousarray(col[:num_clients]) for key, col in data.items()}
        for key, col in data.items():
            _check_column(key, col, f"{p}")
        on = data.get("on_s", np.zeros(1))
        off = data.get("off_s", np.zeros(1))
        bad = np.flatnonzero((on > 0) != (off > 0))
        if bad.size:
            i = int(bad[0])
            _check_cycle(f"{p}, client {i}", float(on[i]), float(off[i]))
        return cls(data, num_clients, seed=seed)

    @classmethod
    def from_config(cls, section: Any, num_clients: int) -> Environment | None:
        """From an ``[environment]`` config section; None when it sets neither tiers nor a
        trace (no environment: clients as fast as this machine, no network)."""
        tiers, trace = section.tiers, section.trace
        if tiers and trace:
            raise ConfigError("[environment] sets both tiers and trace: choose one")
        if tiers:
            return cls.from_tiers(tiers, num_clients, seed=section.seed)
        if trace:
            return cls.from_trace(trace, num_clients, seed=section.seed)
        return None

    # profiles -------------------------------------------------------------------------

    def _rows(self, client_ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(client_ids, dtype=np.int64)
        if ids.size and (ids.min() < 0 or ids.max() >= self.num_clients):
            bad = ids[(ids < 0) | (ids >= self.num_clients)][0]
            raise ConfigError(
                f"client {bad} is outside the environment's 0..{self.num_clients - 1}"
            )
        return ids if self.row_of is None else self.row_of[ids].astype(np.int64)

    def column(self, key: str, client_ids: np.ndarray) -> np.ndarray:
        """One profile field for many clients at once."""
        return self.table[key][self._rows(client_ids)]

    def phase_s(self, client_ids: np.ndarray) -> np.ndarray:
        """Each client's seeded offset into its on/off cycle."""
        period = self.column("on_s", client_ids) + self.column("off_s", client_ids)
        return uniforms(self.seed, (_PHASE,), client_ids) * period

    def profile(self, client_id: ClientId) -> ClientProfile:
        """Client ``client_id``'s profile."""
        return self.profiles([client_id])[0]

    def profiles(self, client_ids: Sequence[int] | np.ndarray) -> list[ClientProfile]:
        """The profiles of many clients, read column by column (one object per client
        asked for, never per client of the population)."""
        ids = np.asarray(client_ids, dtype=np.int64).reshape(-1)
        rows = self._rows(ids)
        columns = {key: self.table[key][rows].tolist() for key in FIELDS}
        cycled = np.asarray(columns["on_s"]) > 0
        phases = np.where(cycled, self.phase_s(ids), 0.0).tolist() if self.cycled else None
        tiers = [self.names[r] for r in rows.tolist()] if self.row_of is not None else None
        return [
            ClientProfile(
                int(cid),
                tiers[j] if tiers is not None else "trace",
                phase_s=phases[j] if phases is not None else 0.0,
                **{key: columns[key][j] for key in FIELDS},
            )
            for j, cid in enumerate(ids.tolist())
        ]

    def tier_of(self, client_id: ClientId) -> str:
        """The name of the client's tier ("trace" for a trace)."""
        return self.profile(client_id).tier

    # the draws of a round -------------------------------------------------------------

    def online(self, round_number: int, clock_s: float, client_ids: np.ndarray) -> np.ndarray:
        """Which clients are reachable in round ``round_number``, which starts at simulated
        time ``clock_s``: inside the on part of their cycle (if cycled) and lucky with
        probability ``online``."""
        ids = np.asarray(client_ids, dtype=np.int64)
        up = uniforms(self.seed, (_ONLINE, round_number), ids) < self.column("online", ids)
        if self.cycled:
            on, off = self.column("on_s", ids), self.column("off_s", ids)
            period = on + off
            cycled = period > 0
            t = np.mod(clock_s + self.phase_s(ids), np.where(cycled, period, 1.0))
            up &= ~cycled | (t < on)
        return up

    def transfers(
        self, round_number: int, kind: TaskKind, client_ids: np.ndarray
    ) -> dict[str, np.ndarray]:
        """Each client's transmission errors in one round's task of ``kind``: boolean arrays
        ``lost_down``, ``corrupt_down``, ``lost_up`` and ``corrupt_up`` (independent draws,
        each transfer lost with probability ``loss`` and corrupted with ``corrupt``)."""
        ids = np.asarray(client_ids, dtype=np.int64)
        loss, corrupt = self.column("loss", ids), self.column("corrupt", ids)
        out = {}
        for name, code in _TRANSFERS.items():
            p = loss if name.startswith("lost") else corrupt
            u = uniforms(self.seed, (3 + code, round_number, _KIND_CODE[kind]), ids)
            out[name] = u < p
        return out

    def describe(self) -> dict[str, Any]:
        """How many clients each tier holds (for a run's record)."""
        if self.row_of is None:
            return {"trace_clients": self.num_clients}
        counts = np.bincount(self.row_of, minlength=len(self.names))
        return {name: int(c) for name, c in zip(self.names, counts)}
