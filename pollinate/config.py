"""The TOML run config: schema, validation, and ``--set section.key=value`` overrides.

Every key has a default, so an empty file (or none) is the default digits experiment.
Errors name the key, what was given and what is allowed.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_type_hints

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from pollinate.errors import ConfigError


@dataclass
class RunSection:
    """[run]: the experiment as a whole."""

    name: str = "digits"
    rounds: int = 10
    seed: int = 0
    output: str = ""  # the run folder; default runs/<name>
    deterministic: bool = False


@dataclass
class DataSection:
    """[data]: the data set and how it is split across clients."""

    dataset: str = "digits"
    partition: str = "iid"
    num_clients: int = 10
    alpha: float = 0.5
    min_size: int = 2
    shards_per_client: int = 2
    client_test_fraction: float = 0.1
    classes_per_client: int = 2  # pathological
    partition_by: str = ""  # natural: the column whose values are the clients
    label_column: str = ""  # hf: sources; default 'label', else 'labels'
    feature_columns: list[str] = field(default_factory=list)  # hf: sources; default: auto
    test_fraction: float = 0.2  # hf: sources without a test split: the server's test share


@dataclass
class ModelSection:
    """[model]: what is trained."""

    name: str = "mlp"
    hidden: list[int] = field(default_factory=lambda: [64])
    framework: str = "torch"  # torch | keras | jax | sklearn | xgboost
    max_depth: int = 6  # xgboost: depth of each tree
    eta: float = 0.3  # xgboost: shrinkage of each tree
    local_rounds: int = 1  # xgboost: boosting rounds each client adds per round


@dataclass
class TrainSection:
    """[train]: local training on each client."""

    epochs: int = 5
    batch_size: int = 32
    optimizer: str = "sgd"
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 0.0
    local_evaluation: bool = True
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps


@dataclass
class StrategySection:
    """[strategy]: client selection and aggregation.

    The algorithm-specific keys (``server_lr`` … ``num_selected``) default to None: the named
    strategy's own default (``pollinate.strategy.presets``); a key the strategy does not
    take is an error.
    """

    name: str = "fedavg"
    fraction_train: float = 1.0
    min_train_clients: int = 2
    min_available_clients: int = 2
    fraction_evaluate: float = 1.0
    min_evaluate_clients: int = 2
    round_timeout_s: float = 600.0
    selection: str = "uniform"  # uniform | poisson | power_of_choice | cooldown | oort
    candidates: int = 0  # power_of_choice: d clients polled (0: twice the round's size)
    cooldown_rounds: int = 3  # cooldown: rounds a failed client sits out
    # oort (pollinate.strategy.oort): utility × (T / t)^alpha for clients slower than T
    oort_alpha: float = 2.0  # the system penalty's exponent (0: durations ignored)
    oort_preferred_duration_s: float = 0.0  # T; 0: the round deadline
    oort_exploration: float = 0.9  # ε: the fraction of picks among never-tried clients
    oort_exploration_decay: float = 0.98  # ε shrinks by this factor each round …
    oort_min_exploration: float = 0.3  # … down to this
    oort_cutoff: float = 0.95  # exploit among utilities >= cutoff × the k-th highest
    # update bounds, on by default (see pollinate.strategy.check.UpdateBounds)
    max_norm: float = 0.0  # > 0: an absolute cap on each update's L2 norm
    norm_factor: float = 100.0  # cap: this × the round's median update norm (0: off)
    max_examples: int = 0  # > 0: an absolute cap on a client's declared example count
    examples_factor: float = 100.0  # cap: this × the round's median example count (0: off)
    on_excess: str = "reject"  # reject | clip (the norm cap)
    # algorithm-specific (None: the strategy's default)
    server_lr: float | None = None  # fedavgm, fedadam, fedyogi, fedadagrad, scaffold
    server_momentum: float | None = None  # fedavgm
    beta_1: float | None = None  # fedadam, fedyogi, fedadagrad
    beta_2: float | None = None  # fedadam, fedyogi
    tau: float | None = None  # fedadam, fedyogi, fedadagrad
    proximal_mu: float | None = None  # fedprox
    q: float | None = None  # qfedavg
    lipschitz: float | None = None  # qfedavg (default 1 / train.lr)
    trim_fraction: float | None = None  # fedtrimmedavg
    num_malicious: int | None = None  # krum, multikrum, bulyan
    num_selected: int | None = None  # multikrum
    # fedbuff (asynchronous; run.rounds counts server steps)
    concurrency: int | None = None  # clients training at once (K)
    buffer_size: int | None = None  # results per server step (M)
    staleness: str | None = None  # constant | sqrt | hinge
    hinge_a: float | None = None  # hinge staleness: 1/(a(τ − b) + 1) past b
    hinge_b: float | None = None
    evaluate_every: int | None = None  # centralized evaluation every N server steps


@dataclass
class SimulationSection:
    """[simulation]: where the virtual clients run."""

    backend: str = "process"
    workers: int = 2
    threads_per_worker: int = 1
    ray_address: str = ""
    gpus_per_worker: float = 0.0  # process: workers pinned to GPUs round robin; ray: num_gpus


@dataclass
class PrivacySection:
    """[privacy]: differential privacy of the trained model, and its budget."""

    mode: str = "none"  # none | central (DP-FedAvg) | local (each client noises its update)
    noise_multiplier: float = 1.0  # z: noise standard deviation = z × clip
    target_epsilon: float = 0.0  # > 0: solve z for this ε over the whole run instead
    delta: float = 1e-5
    clip: float = 1.0  # L2 clip C of each update; the initial C when adaptive (default 0.1)
    clip_on: str = "server"  # central: server | client
    adaptive: bool = False  # central: C follows a private quantile of update norms
    target_quantile: float = 0.5  # adaptive: the quantile C tracks
    clip_lr: float = 0.2  # adaptive: the geometric learning rate of C
    max_epsilon: float = 0.0  # > 0: stop before a round that would exceed it
    sampling: str = "poisson"  # central: poisson (q = strategy.fraction_train) | fixed
    accountant: str = "pld"  # central: pld | rdp (fixed sampling needs rdp)


@dataclass
class SecureAggregationSection:
    """[secure_aggregation]: SecAgg+, so the server sees only the sum of the updates."""

    enabled: bool = False
    neighbours: float = 0.5  # each client's neighbours: a count, or a fraction of the others
    threshold: float = 0.6  # shares that rebuild a secret: a count, or a fraction of neighbours
    clip_range: float = 8.0  # each update coordinate is clipped to ±clip_range
    quantization_bits: int = 22  # levels per coordinate: 2^bits
    modulus_bits: int = 32  # masked sums live modulo 2^modulus_bits
    max_weight: int = 1000  # FedAvg weights: example counts capped here (0: uniform)


@dataclass
class EnvironmentSection:
    """[environment]: device and network profiles on a virtual clock (none: neither set)."""

    seed: int = 0
    tiers: list[dict[str, Any]] = field(default_factory=list)  # tables of share, speed, …
    trace: str = ""  # or a CSV file with one row per client
    deadline_s: float = 0.0  # the simulated round deadline; 0: strategy.round_timeout_s


@dataclass
class CompressionSection:
    """[compression]: how updates (uplink) and the global model (downlink) are encoded."""

    uplink: str = "none"  # none | fp16 | bf16 | qsgd | topk
    downlink: str = "none"  # none | fp16 | bf16
    bits: int = 8  # qsgd: levels s = 2^bits - 1
    topk_fraction: float = 0.01  # topk: the fraction of coordinates sent


@dataclass
class AttackSection:
    """[attack]: simulated malicious clients, for robustness testing (simulation only;
    ``pollinate server``/``client`` refuse it). kind none: no attack."""

    kind: str = "none"  # none | sign_flip | scale | gaussian | label_flip | little_is_enough
    fraction: float = 0.2  # of the clients (when `clients` is empty)
    clients: list[int] = field(default_factory=list)  # explicit attacker ids
    scale: float = 10.0  # sign_flip sends −scale·Δ, scale sends scale·Δ
    seed: int = 0  # which clients attack


@dataclass
class TrackingSection:
    """[tracking]: experiment trackers that log every round (``pollinate.tracking``)."""

    mlflow: bool = False
    tensorboard: bool = False
    wandb: bool = False
    mlflow_uri: str = ""  # default sqlite:///<run folder>/mlflow.db
    mlflow_experiment: str = ""  # default run.name
    tensorboard_dir: str = ""  # default <run folder>/tensorboard
    wandb_project: str = "pollinate"
    wandb_mode: str = "offline"  # offline: no network (``wandb sync`` later) | online | disabled
    wandb_dir: str = ""  # default the run folder
    max_clients_logged: int = 20  # per-client metrics of at most this many clients (0: none)


@dataclass
class RunConfig:
    """A whole run config."""

    run: RunSection = field(default_factory=RunSection)
    data: DataSection = field(default_factory=DataSection)
    model: ModelSection = field(default_factory=ModelSection)
    train: TrainSection = field(default_factory=TrainSection)
    strategy: StrategySection = field(default_factory=StrategySection)
    simulation: SimulationSection = field(default_factory=SimulationSection)
    privacy: PrivacySection = field(default_factory=PrivacySection)
    secure_aggregation: SecureAggregationSection = field(default_factory=SecureAggregationSection)
    environment: EnvironmentSection = field(default_factory=EnvironmentSection)
    compression: CompressionSection = field(default_factory=CompressionSection)
    attack: AttackSection = field(default_factory=AttackSection)
    tracking: TrackingSection = field(default_factory=TrackingSection)

    @property
    def output_dir(self) -> Path:
        return Path(self.run.output or f"runs/{self.run.name}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


CHOICES: dict[tuple[str, str], tuple[str, ...]] = {
    ("data", "partition"): (
        "iid",
        "dirichlet",
        "shards",
        "quantity",
        "pathological",
        "inner_dirichlet",
        "linear",
        "square",
        "exponential",
        "natural",
    ),
    ("train", "optimizer"): ("sgd", "adam"),
    ("strategy", "selection"): ("uniform", "poisson", "power_of_choice", "cooldown", "oort"),
    ("strategy", "on_excess"): ("reject", "clip"),
    ("simulation", "backend"): ("sequential", "process", "ray"),
    ("privacy", "mode"): ("none", "central", "local"),
    ("privacy", "clip_on"): ("server", "client"),
    ("privacy", "sampling"): ("poisson", "fixed"),
    ("privacy", "accountant"): ("pld", "rdp"),
    ("compression", "uplink"): ("none", "fp16", "bf16", "qsgd", "topk"),
    ("compression", "downlink"): ("none", "fp16", "bf16"),
    ("attack", "kind"): (
        "none",
        "sign_flip",
        "scale",
        "gaussian",
        "label_flip",
        "little_is_enough",
    ),
    ("tracking", "wandb_mode"): ("offline", "online", "disabled"),
    ("model", "framework"): ("torch", "keras", "jax", "sklearn", "xgboost"),
}
POSITIVE = {
    ("run", "rounds"),
    ("data", "num_clients"),
    ("data", "alpha"),
    ("data", "shards_per_client"),
    ("train", "epochs"),
    ("train", "batch_size"),
    ("train", "lr"),
    ("strategy", "round_timeout_s"),
    ("simulation", "workers"),
    ("simulation", "threads_per_worker"),
    ("privacy", "delta"),
    ("privacy", "clip"),
    ("privacy", "clip_lr"),
    ("secure_aggregation", "neighbours"),
    ("secure_aggregation", "threshold"),
    ("secure_aggregation", "clip_range"),
    ("secure_aggregation", "quantization_bits"),
    ("secure_aggregation", "modulus_bits"),
    ("compression", "bits"),
    ("compression", "topk_fraction"),
    ("data", "classes_per_client"),
    ("model", "max_depth"),
    ("model", "eta"),
    ("model", "local_rounds"),
}
NON_NEGATIVE = {
    ("data", "min_size"),
    ("train", "momentum"),
    ("train", "weight_decay"),
    ("strategy", "min_train_clients"),
    ("strategy", "min_available_clients"),
    ("strategy", "min_evaluate_clients"),
    ("strategy", "candidates"),
    ("strategy", "cooldown_rounds"),
    ("strategy", "oort_alpha"),
    ("strategy", "oort_preferred_duration_s"),
    ("strategy", "max_norm"),
    ("strategy", "norm_factor"),
    ("strategy", "max_examples"),
    ("strategy", "examples_factor"),
    ("privacy", "noise_multiplier"),
    ("privacy", "target_epsilon"),
    ("privacy", "max_epsilon"),
    ("secure_aggregation", "max_weight"),
    ("environment", "deadline_s"),
    ("tracking", "max_clients_logged"),
    ("simulation", "gpus_per_worker"),
}
FRACTIONS = {
    ("data", "client_test_fraction"),
    ("strategy", "fraction_train"),
    ("strategy", "fraction_evaluate"),
    ("strategy", "oort_exploration"),
    ("strategy", "oort_min_exploration"),
    ("privacy", "target_quantile"),
    ("compression", "topk_fraction"),
    ("data", "test_fraction"),
}
# keys whose value may also be "package.module:function", besides their CHOICES
PLUGGABLE = {("data", "partition")}


def _sections() -> dict[str, type]:
    return {f.name: f.type for f in dataclasses.fields(RunConfig)}  # type: ignore[misc]


def _hints(cls: type) -> dict[str, Any]:
    return get_type_hints(cls)


def _unknown(kind: str, name: str, known: list[str]) -> ConfigError:
    close = difflib.get_close_matches(name, known, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return ConfigError(f"unknown {kind} {name!r}{hint}; allowed: {', '.join(sorted(known))}")


def _coerce(section: str, key: str, value: Any, hint: Any) -> Any:
    where = f"{section}.{key}"
    if hint in (float | None, int | None, str | None):  # optional: absent means "the default"
        plain = {float | None: float, int | None: int, str | None: str}[hint]
        return _coerce(section, key, value, plain)
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where} must be true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where} must be an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where} must be a number, got {value!r}")
        if not math.isfinite(value):  # nan passes every comparison check below it
            raise ConfigError(f"{where} must be a finite number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where} must be a string, got {value!r}")
        return value
    if hint == list[int]:
        low = 0 if (section, key) == ("attack", "clients") else 1  # client ids start at 0
        if not isinstance(value, list) or not all(
            isinstance(v, int) and not isinstance(v, bool) and v >= low for v in value
        ):
            what = "client ids (integers >= 0)" if low == 0 else "positive integers"
            raise ConfigError(f"{where} must be a list of {what}, got {value!r}")
        return list(value)
    if hint == list[dict[str, Any]]:  # an array of inline tables of scalars
        if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
            raise ConfigError(f"{where} must be a list of tables {{key = value, …}}, got {value!r}")
        for i, table in enumerate(value):
            for k, v in table.items():
                if not isinstance(v, (bool, int, float, str)):
                    raise ConfigError(f"{where}[{i}].{k} must be a number or string, got {v!r}")
        return [dict(v) for v in value]
    if hint == list[str]:
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            raise ConfigError(f"{where} must be a list of names, got {value!r}")
        return list(value)
    raise ConfigError(f"{where}: unsupported type {hint}")  # pragma: no cover


def _check(cfg: RunConfig) -> None:
    for (section, key), allowed in CHOICES.items():
        value = getattr(getattr(cfg, section), key)
        if (section, key) in PLUGGABLE and ":" in value:
            continue  # imported and checked when the run is built
        if value not in allowed:
            own = " or 'package.module:function'" if (section, key) in PLUGGABLE else ""
            raise ConfigError(
                f"{section}.{key} = {value!r} is not allowed; choose one of: "
                f"{', '.join(allowed)}{own}"
            )
    for section, key in POSITIVE:
        value = getattr(getattr(cfg, section), key)
        if value <= 0:
            raise ConfigError(f"{section}.{key} must be > 0, got {value}")
    for section, key in NON_NEGATIVE:
        value = getattr(getattr(cfg, section), key)
        if value < 0:
            raise ConfigError(f"{section}.{key} must be >= 0, got {value}")
    for section, key in FRACTIONS:
        value = getattr(getattr(cfg, section), key)
        if not 0.0 <= value <= 1.0:
            raise ConfigError(f"{section}.{key} must be between 0 and 1, got {value}")
    if cfg.data.client_test_fraction >= 1.0:
        raise ConfigError("data.client_test_fraction must be < 1: clients need training data")
    if cfg.strategy.fraction_train == 0:
        raise ConfigError("strategy.fraction_train must be > 0: no client would train")
    if cfg.strategy.min_available_clients > cfg.data.num_clients:
        raise ConfigError(
            f"strategy.min_available_clients = {cfg.strategy.min_available_clients} exceeds "
            f"data.num_clients = {cfg.data.num_clients}; lower it or add clients"
        )
    if cfg.strategy.min_train_clients > cfg.data.num_clients:
        raise ConfigError(
            f"strategy.min_train_clients = {cfg.strategy.min_train_clients} exceeds "
            f"data.num_clients = {cfg.data.num_clients}; lower it or add clients"
        )
    if not cfg.run.name.strip():
        raise ConfigError("run.name must not be empty")
    _check_strategy(cfg)
    _check_fedbuff(cfg)
    _check_attack(cfg)
    _check_privacy(cfg.privacy)
    _check_secure(cfg)
    _check_conditions(cfg)
    _check_device(cfg)


def _check_conditions(cfg: RunConfig) -> None:
    """[environment] tiers (each key named when wrong) and [compression] combinations."""
    env = cfg.environment
    if env.tiers and env.trace:
        raise ConfigError("[environment] sets both tiers and trace: choose one")
    if env.tiers:
        from pollinate.simulation.environment import parse_tiers

        parse_tiers(env.tiers)
    c = cfg.compression
    if c.bits > 16:
        raise ConfigError(f"compression.bits must be between 1 and 16, got {c.bits}")
    if c.uplink != "none" and cfg.secure_aggregation.enabled:
        raise ConfigError(
            f"compression.uplink = {c.uplink!r} with secure_aggregation: SecAgg+ quantizes "
            "and masks the update itself; set compression.uplink = 'none'"
        )
    if c.uplink != "none" and cfg.privacy.mode == "central" and cfg.privacy.clip_on == "client":
        raise ConfigError(
            f"compression.uplink = {c.uplink!r} with client-side clipping: the decoded update "
            "may exceed the clip and be rejected; use privacy.clip_on = 'server' or no "
            "compression"
        )


def _check_attack(cfg: RunConfig) -> None:
    a = cfg.attack
    if a.kind == "none":
        return
    if cfg.secure_aggregation.enabled:
        raise ConfigError(
            "[attack] with secure_aggregation: the simulated attack rewrites clients' updates, "
            "which SecAgg+ masks; turn one of them off"
        )
    from pollinate.attacks import Attack

    Attack.from_config(dataclasses.asdict(a), cfg.data.num_clients)  # its own checks


def strategy_params(s: StrategySection) -> dict[str, Any]:
    """The algorithm-specific [strategy] keys that were set (not None)."""
    from pollinate.strategy.presets import PARAM_OWNERS

    return {k: getattr(s, k) for k in PARAM_OWNERS if getattr(s, k, None) is not None}


def oort_params(cfg: RunConfig) -> dict[str, Any]:
    """[strategy]'s oort_* keys as ``Oort`` parameters; the preferred duration defaults to
    the round deadline (``environment.deadline_s``, else ``strategy.round_timeout_s``)."""
    s = cfg.strategy
    return {
        "alpha": s.oort_alpha,
        "preferred_duration_s": s.oort_preferred_duration_s
        or cfg.environment.deadline_s
        or s.round_timeout_s,
        "exploration": s.oort_exploration,
        "exploration_decay": s.oort_exploration_decay,
        "min_exploration": s.oort_min_exploration,
        "cutoff": s.oort_cutoff,
    }


def _check_strategy(cfg: RunConfig) -> None:
    from pollinate.strategy.presets import PRESETS, preset_params

    s = cfg.strategy
    if s.selection == "oort":
        from pollinate.strategy.selection import make_policy

        if cfg.privacy.mode == "central":
            raise ConfigError(
                "strategy.selection = 'oort' with privacy.mode = 'central': DP-FedAvg samples "
                "the clients itself, at random, as its privacy accounting assumes; use "
                "selection = 'uniform', or another privacy.mode"
            )

        make_policy("oort", **oort_params(cfg))  # its own checks name each key
    if ":" in s.name:
        return  # a user's strategy: its own checks when it is built
    if s.name not in PRESETS:
        close = difflib.get_close_matches(s.name, list(PRESETS), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(
            f"strategy.name = {s.name!r} is not allowed{hint}; choose one of: "
            f"{', '.join(PRESETS)}, or 'package.module:Class' for your own strategy"
        )
    trees = s.name.startswith("fedxgb_")
    if trees != (cfg.model.framework == "xgboost"):
        raise ConfigError(
            f"strategy.name = {s.name!r} with model.framework = {cfg.model.framework!r}: "
            "boosted trees are appended, not averaged, so model.framework = 'xgboost' goes with "
            "strategy.name = 'fedxgb_bagging' or 'fedxgb_cyclic', and only with them"
        )
    allowed = preset_params(s.name)
    for key in strategy_params(s):
        if key not in allowed:
            from pollinate.strategy.presets import PARAM_OWNERS

            raise ConfigError(
                f"strategy.{key} does not apply to strategy {s.name!r} (it belongs to "
                f"{', '.join(PARAM_OWNERS[key])}); {s.name!r} takes: "
                f"{', '.join(allowed) or 'no algorithm-specific keys'}"
            )


def _check_fedbuff(cfg: RunConfig) -> None:
    """What asynchronous FedBuff cannot be combined with, named with both parts."""
    if cfg.strategy.name != "fedbuff":
        return
    s = cfg.strategy
    if cfg.privacy.mode != "none":
        raise ConfigError(
            f"strategy.name = 'fedbuff' with privacy.mode = {cfg.privacy.mode!r}: differential "
            "privacy here clips, noises and accounts per round, and FedBuff has no rounds; "
            "set privacy.mode = 'none' or use a synchronous strategy (fedavg)"
        )
    if cfg.secure_aggregation.enabled:
        raise ConfigError(
            "strategy.name = 'fedbuff' with secure_aggregation: SecAgg+ sums one round's "
            "cohort, while FedBuff applies each result as it arrives; turn one of them off"
        )
    if cfg.attack.kind != "none":
        raise ConfigError(
            f"strategy.name = 'fedbuff' with attack.kind = {cfg.attack.kind!r}: simulated "
            "attacks rewrite a round's results and FedBuff has no rounds; use a synchronous "
            "strategy for robustness tests"
        )
    if s.selection != "uniform":
        raise ConfigError(
            f"strategy.name = 'fedbuff' with strategy.selection = {s.selection!r}: FedBuff "
            "hands each freed slot to an idle client picked uniformly; set selection = 'uniform'"
        )
    for key in ("concurrency", "buffer_size", "evaluate_every"):
        value = getattr(s, key)
        if value is not None and value < 1:
            raise ConfigError(f"strategy.{key} must be >= 1, got {value}")
    if s.staleness is not None:
        from pollinate.strategy.fedbuff import STALENESS

        if s.staleness not in STALENESS:
            raise ConfigError(
                f"strategy.staleness = {s.staleness!r} is not allowed; choose one of: "
                f"{', '.join(STALENESS)}"
            )
    for key in ("hinge_a", "hinge_b"):
        value = getattr(s, key)
        if value is not None and value < 0:
            raise ConfigError(f"strategy.{key} must be >= 0, got {value}")
    if (s.hinge_a is not None or s.hinge_b is not None) and s.staleness != "hinge":
        raise ConfigError(
            "strategy.hinge_a and hinge_b shape the hinge staleness function; set "
            "strategy.staleness = 'hinge' too, or remove them"
        )
    if s.concurrency is not None and s.concurrency > cfg.data.num_clients:
        raise ConfigError(
            f"strategy.concurrency = {s.concurrency} exceeds data.num_clients = "
            f"{cfg.data.num_clients}: no more clients than exist can train at once; lower it"
        )


def _check_device(cfg: RunConfig) -> None:
    from pollinate.frameworks.devices import check_device

    check_device(cfg.train.device)
    if cfg.simulation.gpus_per_worker > 0 and ":" in cfg.train.device:
        raise ConfigError(
            f"train.device = {cfg.train.device!r} names one GPU, but simulation.gpus_per_worker "
            "pins each worker to its own GPUs (each sees them from cuda:0); use device = 'cuda' "
            "or 'auto'"
        )


def _check_secure(cfg: RunConfig) -> None:
    s = cfg.secure_aggregation
    if not s.enabled:
        return
    if cfg.privacy.mode == "central" and cfg.privacy.clip_on != "client":
        raise ConfigError(
            "secure_aggregation with privacy.mode = 'central' needs privacy.clip_on = 'client': "
            "the server only sees the sum, so the clients must clip their own updates"
        )
    from pollinate.privacy.secagg import SecAggConfig

    SecAggConfig(  # its own checks, with their explanations
        neighbours=s.neighbours,
        threshold=s.threshold,
        clip_range=s.clip_range,
        quantization_bits=s.quantization_bits,
        modulus_bits=s.modulus_bits,
    ).check(_max_clients_per_round(cfg))


def _max_clients_per_round(cfg: RunConfig) -> int:
    """The most clients a round is expected to sample. Poisson sampling draws a binomial
    number: its mean plus 6 standard deviations (exceeded about once in 10^9 rounds; a round
    that does sample more is refused by the round's own check, with the same explanation)."""
    from pollinate.strategy.selection import sample_size

    n = cfg.data.num_clients
    q = cfg.strategy.fraction_train
    if cfg.privacy.mode == "central" and cfg.privacy.sampling == "poisson":
        return min(n, math.ceil(n * q + 6 * math.sqrt(n * q * (1 - q))))
    return sample_size(q, n, cfg.strategy.min_train_clients)


def _check_privacy(p: PrivacySection) -> None:
    if p.mode == "none":
        return
    if p.delta >= 1:
        raise ConfigError(f"privacy.delta must be < 1 (typically below 1/clients), got {p.delta}")
    if p.noise_multiplier == 0 and p.target_epsilon == 0:
        raise ConfigError(
            "privacy.noise_multiplier = 0 adds no noise (ε would be infinite); set "
            "noise_multiplier > 0 or target_epsilon > 0, or privacy.mode = 'none'"
        )
    if p.max_epsilon and p.target_epsilon > p.max_epsilon:
        raise ConfigError(
            f"privacy.target_epsilon = {p.target_epsilon} exceeds privacy.max_epsilon = "
            f"{p.max_epsilon}: the run would stop before its last round"
        )
    if not 0 < p.target_quantile < 1:
        raise ConfigError(
            f"privacy.target_quantile must be strictly between 0 and 1, got {p.target_quantile}"
        )
    if p.mode == "local" and p.adaptive:
        raise ConfigError(
            "privacy.adaptive works with mode = 'central' only: under local DP the server "
            "never sees an update's norm; set a fixed privacy.clip"
        )
    if p.mode == "central" and p.sampling == "fixed" and p.accountant == "pld":
        raise ConfigError(
            "privacy.sampling = 'fixed' needs privacy.accountant = 'rdp': dp_accounting's PLD "
            "accountant has no event for sampling without replacement"
        )


def _privacy_defaults(cfg: RunConfig, given: dict[str, Any]) -> None:
    """Defaults of [privacy] that depend on which keys were given."""
    if "noise_multiplier" in given and "target_epsilon" in given:
        raise ConfigError(
            "set one of privacy.noise_multiplier or privacy.target_epsilon, not both "
            "(with target_epsilon the noise multiplier is solved for)"
        )
    if cfg.privacy.adaptive and "clip" not in given:
        cfg.privacy.clip = 0.1  # Andrew et al.'s initial clip


def from_dict(raw: dict[str, Any]) -> RunConfig:
    """Validate a nested dict (parsed TOML) into a ``RunConfig``."""
    cfg = RunConfig()
    sections = _sections()
    for section, values in raw.items():
        if section not in sections:
            raise _unknown("config section", f"[{section}]", [f"[{s}]" for s in sections])
        if not isinstance(values, dict):
            raise ConfigError(f"[{section}] must be a table of keys, got {values!r}")
        target = getattr(cfg, section)
        hints = _hints(type(target))
        for key, value in values.items():
            if key not in hints:
                raise _unknown(f"key in [{section}]", key, list(hints))
            setattr(target, key, _coerce(section, key, value, hints[key]))
    privacy = raw.get("privacy", {})
    _privacy_defaults(cfg, privacy if isinstance(privacy, dict) else {})
    _check(cfg)
    return cfg


def parse_override(text: str) -> tuple[str, str, Any]:
    """Parse ``section.key=value``; the value is read as TOML, else taken as a string."""
    if "=" not in text or "." not in text.split("=", 1)[0]:
        raise ConfigError(f"--set expects section.key=value, got {text!r}")
    path, raw = text.split("=", 1)
    section, key = path.strip().split(".", 1)
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return section, key, value


def read_toml(path: str | Path) -> dict[str, Any]:
    """A config file's TOML tables; ConfigError when it is missing or not TOML."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {p} does not exist")
    try:
        return tomllib.loads(p.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{p} is not valid TOML: {exc}") from None


def load(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Read a TOML run config (``None``: the defaults) and apply ``--set`` overrides."""
    raw: dict[str, Any] = read_toml(path) if path is not None else {}
    for text in overrides:
        section, key, value = parse_override(text)
        raw.setdefault(section, {})
        if not isinstance(raw[section], dict):
            raise ConfigError(f"[{section}] must be a table of keys")
        raw[section][key] = value
    return from_dict(raw)
