"""An analytics config: TOML with ``[run]``, ``[data]``, ``[policy]``, ``[privacy]``,
``[secure_aggregation]``, ``[simulation]`` and one ``[[query]]`` table per question.

::

    [run]
    name = "diabetes-analytics"
    output = "runs/diabetes-analytics"
    seed = 0

    [data]
    dataset = "diabetes"          # or "csv:PATH/*.csv" / "parquet:PATH" (one file per client)
    partition = "dirichlet"       # iid | dirichlet (on partition_by)
    partition_by = "sex"
    num_clients = 8

    [policy]                      # each data holder's controls (a client may set its own)
    min_group_size = 5            # refuse answers resting on fewer rows in any cell
    # exposed = ["age", "sex", "bmi"]   # the columns it answers about (default: all)

    [privacy]                     # for queries with noise_multiplier or epsilon
    max_epsilon = 4.0             # the session's budget (0: no limit, ε still reported)
    delta = 1e-6
    require_dp = false            # true: refuse queries without noise

    [[query]]
    name = "mean_age_high_progression"
    statistic = "mean"
    column = "age"
    where = "target > 150 and bmi >= 30"

Unknown sections and keys are errors that list the allowed ones; each query is checked by
:meth:`pollinate.analytics.Query.from_dict`.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from pollinate.analytics.dp import ACCOUNTANTS
from pollinate.analytics.local import Policy
from pollinate.analytics.query import Query
from pollinate.config import parse_override, read_toml
from pollinate.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


@dataclass
class AnalyticsRun:
    name: str = "analytics"
    output: str = ""  # default: runs/<name>
    seed: int = 0


@dataclass
class AnalyticsData:
    dataset: str = "diabetes"  # diabetes | csv:GLOB | parquet:PATH
    partition: str = "iid"  # iid | dirichlet (splitting one table)
    partition_by: str = ""  # dirichlet: the column skewed across clients
    alpha: float = 0.5
    num_clients: int = 8


@dataclass
class AnalyticsPolicy:
    exposed: list[str] | None = None  # None: every column
    min_group_size: int = 1


@dataclass
class AnalyticsPrivacy:
    max_epsilon: float = 0.0  # 0: no limit (ε is still accounted and reported)
    delta: float = 1e-6
    accountant: str = "rdp"
    require_dp: bool = False  # refuse queries without noise (else: answered exactly)


@dataclass
class AnalyticsSecure:
    """SecAgg+ for the sums; the defaults fit counts and sums (a wide, fine grid)."""

    enabled: bool = False
    neighbours: float = 0.5
    threshold: float = 0.6
    clip_range: float = 1e9  # a client refuses local sums beyond ±clip_range
    quantization_bits: int = 52
    modulus_bits: int = 64


@dataclass
class AnalyticsSimulation:
    backend: str = "sequential"  # sequential | process | ray
    workers: int = 2


@dataclass
class AnalyticsConfig:
    run: AnalyticsRun = field(default_factory=AnalyticsRun)
    data: AnalyticsData = field(default_factory=AnalyticsData)
    policy: AnalyticsPolicy = field(default_factory=AnalyticsPolicy)
    privacy: AnalyticsPrivacy = field(default_factory=AnalyticsPrivacy)
    secure_aggregation: AnalyticsSecure = field(default_factory=AnalyticsSecure)
    simulation: AnalyticsSimulation = field(default_factory=AnalyticsSimulation)
    queries: list[Query] = field(default_factory=list)
    #: queries with group_by but no groups: their groups are asked of the clients first
    discover: set[str] = field(default_factory=set)

    @property
    def output_dir(self) -> Path:
        return Path(self.run.output or f"runs/{self.run.name}")

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in fields(self):
            if f.name == "discover":
                continue
            if f.name == "queries":
                out["query"] = [
                    {
                        k: v
                        for k, v in q.to_dict().items()
                        if k != "groups" or q.name not in self.discover
                    }
                    for q in self.queries
                ]
            else:
                out[f.name] = dict(vars(getattr(self, f.name)))
        return out

    def policy_object(self) -> Policy:
        exposed = frozenset(self.policy.exposed) if self.policy.exposed is not None else None
        return Policy(exposed=exposed, min_group_size=self.policy.min_group_size)

    def private(self) -> bool:
        """Whether ε is accounted: a query has noise, or a budget is set."""
        return (
            any(q.private for q in self.queries)
            or self.privacy.max_epsilon > 0
            or self.privacy.require_dp
        )


def is_analytics(path: str | Path) -> bool:
    """Whether the TOML file at ``path`` is an analytics config (it has ``[[query]]``)."""
    try:
        return "query" in tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError):
        return False


def load(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> AnalyticsConfig:
    """Read an analytics config and apply ``--set section.key=value`` overrides."""
    raw = read_toml(path)
    for text in overrides:
        section, key, value = parse_override(text)
        if section == "query" or not isinstance(raw.setdefault(section, {}), dict):
            raise ConfigError(f"--set {text!r}: only [section] keys can be overridden")
        raw[section][key] = value
    return from_dict(raw)


def from_dict(raw: dict[str, Any]) -> AnalyticsConfig:
    cfg = AnalyticsConfig()
    sections = {f.name: f for f in fields(cfg) if f.name != "queries"}
    for name, table in raw.items():
        if name == "query":
            continue
        if name not in sections:
            allowed = ", ".join(sorted([*sections, "query"]))
            raise ConfigError(
                f"unknown section [{name}] in an analytics config; allowed: {allowed}"
            )
        if not isinstance(table, dict):
            raise ConfigError(f"[{name}] must be a table of keys")
        _fill(name, getattr(cfg, name), table)
    queries = raw.get("query", [])
    if not isinstance(queries, list) or not queries:
        raise ConfigError("an analytics config needs at least one [[query]] table")
    for i, q in enumerate(queries):
        if isinstance(q, dict):
            q = {"name": f"query{i + 1}", **q}
            if q.get("group_by") is not None and "groups" not in q:
                cfg.discover.add(str(q["name"]))  # checked now with a stand-in group
                q = {**q, "groups": [""]}
        cfg.queries.append(Query.from_dict(q))
    names = [q.name for q in cfg.queries]
    if len(set(names)) != len(names):
        raise ConfigError(f"query names must be unique, got {names}")
    _check(cfg)
    return cfg


def _fill(section: str, target: Any, table: dict[str, Any]) -> None:
    known = {f.name: f for f in fields(target)}
    for key, value in table.items():
        if key not in known:
            raise ConfigError(f"unknown key {section}.{key}; allowed: {', '.join(sorted(known))}")
        current = getattr(target, key)
        where = f"{section}.{key}"
        if key == "exposed":
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise ConfigError(f"{where} must be a list of column names, got {value!r}")
        elif isinstance(current, bool):
            if not isinstance(value, bool):
                raise ConfigError(f"{where} must be true or false, got {value!r}")
        elif isinstance(current, (int, float)) and not isinstance(current, bool):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ConfigError(f"{where} must be a number, got {value!r}")
            if isinstance(current, int) and not isinstance(value, int):
                raise ConfigError(f"{where} must be an integer, got {value!r}")
            if not math.isfinite(value):
                raise ConfigError(f"{where} must be a finite number, got {value!r}")
            value = type(current)(value)
        elif isinstance(current, str) and not isinstance(value, str):
            raise ConfigError(f"{where} must be a string, got {value!r}")
        setattr(target, key, value)


def _check(cfg: AnalyticsConfig) -> None:
    if cfg.data.num_clients < 1:
        raise ConfigError(f"data.num_clients must be >= 1, got {cfg.data.num_clients}")
    if cfg.policy.min_group_size < 1:
        raise ConfigError(f"policy.min_group_size must be >= 1, got {cfg.policy.min_group_size}")
    p = cfg.privacy
    if p.max_epsilon < 0 or not math.isfinite(p.max_epsilon):
        raise ConfigError(f"privacy.max_epsilon must be >= 0 (0: no limit), got {p.max_epsilon}")
    if not 0 < p.delta < 1:
        raise ConfigError(f"privacy.delta must be in (0, 1), got {p.delta}")
    if p.accountant not in ACCOUNTANTS:
        raise ConfigError(f"privacy.accountant must be one of {', '.join(ACCOUNTANTS)}")
    if cfg.simulation.backend not in ("sequential", "process", "ray"):
        raise ConfigError("simulation.backend must be one of sequential, process, ray")
    if cfg.secure_aggregation.enabled:
        secure_config(cfg).check(cfg.data.num_clients)


def secure_config(cfg: AnalyticsConfig) -> Any:
    """[secure_aggregation] as a ``SecAggConfig`` (its own checks explain bad values)."""
    from pollinate.privacy.secagg import SecAggConfig

    s = cfg.secure_aggregation
    return SecAggConfig(
        neighbours=s.neighbours,
        threshold=s.threshold,
        clip_range=s.clip_range,
        quantization_bits=s.quantization_bits,
        modulus_bits=s.modulus_bits,
    )
