"""Named algorithms as presets of ``FedAvg``'s parts, and the registry the run config uses.

Each preset returns a ``FedAvg`` with some parts set; every other keyword (sampling
fractions, minimums, the round deadline, train/evaluate configs, ``evaluate_fn``, ``seed``,
``selection``, ``bounds``) is passed through, so a preset's part can be overridden too:
``FedAdam(server_lr=0.01, selection=PowerOfChoice(20))``.

| name | parts | paper |
| --- | --- | --- |
| fedavg | weighted mean, plain step (η = 1) | McMahan et al. 2017 |
| fedavgm | weighted mean, server momentum | Hsu et al. 2019 |
| fedprox | proximal term on the clients | Li et al. 2020 |
| fedadam / fedyogi / fedadagrad | weighted mean, adaptive server step | Reddi et al. 2021 |
| scaffold | control variates | Karimireddy et al. 2020 |
| fednova | normalised averaging by local steps | Wang et al. 2020 |
| qfedavg | loss-weighted fair averaging | Li et al. 2020 |
| fedmedian / fedtrimmedavg | coordinate-wise median / trimmed mean | Yin et al. 2018 |
| krum / multikrum | distance-based selection | Blanchard et al. 2017 |
| bulyan | Krum selection + trimmed median | El Mhamdi et al. 2018 |
| fedxgb_bagging / fedxgb_cyclic | boosted trees appended (framework xgboost) | Ma et al. 2023 |
| fedbuff | asynchronous: staleness-weighted buffer of updates | Nguyen et al. 2022 |
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from pollinate.errors import ConfigError
from pollinate.strategy import aggregators as agg
from pollinate.strategy import optimizers as opt
from pollinate.strategy.algorithms import (
    ControlVariates,
    FairWeighting,
    NormalizedAveraging,
    ProximalTerm,
)
from pollinate.strategy.base import Strategy
from pollinate.strategy.fedavg import FedAvg
from pollinate.strategy.fedbuff import FedBuff
from pollinate.strategy.xgb import FedXgbBagging, FedXgbCyclic


def _with(kw: dict[str, Any], **parts: Any) -> FedAvg:
    """``FedAvg`` with the preset's ``parts``; a part given in ``kw`` (not None) wins."""
    given = {k: v for k, v in kw.items() if not (k in parts and v is None)}
    return FedAvg(**{**parts, **given})


def FedAvgM(*, server_lr: float = 1.0, server_momentum: float = 0.9, **kw: Any) -> FedAvg:
    """FedAvg with server momentum (Hsu, Qi & Brown 2019, arXiv:1909.06335):
    ``v ← βv + Δ``, ``w ← w + ηv``."""
    return _with(kw, optimizer=opt.Momentum(server_lr=server_lr, momentum=server_momentum))


def FedProx(*, proximal_mu: float = 0.01, **kw: Any) -> FedAvg:
    """FedAvg whose clients add ``μ/2 ‖w − w_global‖²`` to their loss (Li et al. 2020)."""
    return _with(kw, algorithm=ProximalTerm(proximal_mu))


def FedAdam(
    *,
    server_lr: float = 0.1,
    beta_1: float = 0.9,
    beta_2: float = 0.99,
    tau: float = 1e-3,
    **kw: Any,
) -> FedAvg:
    """FedAvg with an Adam server step (Reddi et al. 2021, arXiv:2003.00295, Algorithm 2)."""
    return _with(kw, optimizer=opt.Adam(server_lr=server_lr, beta_1=beta_1, beta_2=beta_2, tau=tau))


def FedYogi(
    *,
    server_lr: float = 0.1,
    beta_1: float = 0.9,
    beta_2: float = 0.99,
    tau: float = 1e-3,
    **kw: Any,
) -> FedAvg:
    """FedAvg with a Yogi server step (Reddi et al. 2021, Algorithm 2)."""
    return _with(kw, optimizer=opt.Yogi(server_lr=server_lr, beta_1=beta_1, beta_2=beta_2, tau=tau))


def FedAdagrad(
    *, server_lr: float = 0.1, beta_1: float = 0.0, tau: float = 1e-3, **kw: Any
) -> FedAvg:
    """FedAvg with an Adagrad server step (Reddi et al. 2021, Algorithm 2)."""
    return _with(kw, optimizer=opt.Adagrad(server_lr=server_lr, beta_1=beta_1, tau=tau))


def Scaffold(*, server_lr: float = 1.0, **kw: Any) -> FedAvg:
    """SCAFFOLD with control variates, option II (Karimireddy et al. 2020)."""
    return _with(kw, algorithm=ControlVariates(), optimizer=opt.Plain(server_lr=server_lr))


def FedNova(*, local_momentum: float = 0.0, **kw: Any) -> FedAvg:
    """FedAvg with updates normalised by each client's local steps (Wang et al. 2020)."""
    return _with(kw, algorithm=NormalizedAveraging(local_momentum))


def QFedAvg(*, q: float = 0.1, lipschitz: float = 20.0, **kw: Any) -> FedAvg:
    """q-FedAvg: higher-loss clients weigh more, for fairness (Li et al. 2020)."""
    return _with(kw, algorithm=FairWeighting(q, lipschitz))


def FedMedian(**kw: Any) -> FedAvg:
    """The coordinate-wise median of the clients' models (Yin et al. 2018)."""
    return _with(kw, aggregator=agg.Median())


def FedTrimmedAvg(*, trim_fraction: float = 0.1, **kw: Any) -> FedAvg:
    """The coordinate-wise trimmed mean, ``trim_fraction`` cut at each end (Yin et al. 2018)."""
    return _with(kw, aggregator=agg.TrimmedMean(beta=trim_fraction))


def _enough_for(name: str, num_malicious: int, needed: int, kw: dict[str, Any]) -> None:
    """Refuse a round minimum that would let the aggregator see too few updates."""
    minimum = kw.get("min_train_clients", 2)
    if minimum < needed:
        raise ConfigError(
            f"strategy {name!r} with num_malicious = {num_malicious} needs at least {needed} "
            f"accepted updates per round, but strategy.min_train_clients = {minimum}; raise "
            f"min_train_clients to {needed} (and sample enough clients) or lower num_malicious"
        )


def Krum(*, num_malicious: int = 1, **kw: Any) -> FedAvg:
    """The one client model closest to its neighbours (Blanchard et al. 2017); needs
    ``min_train_clients >= 2f + 3``."""
    _enough_for("krum", num_malicious, 2 * num_malicious + 3, kw)
    return _with(kw, aggregator=agg.Krum(num_malicious=num_malicious))


def MultiKrum(*, num_malicious: int = 1, num_selected: int | None = None, **kw: Any) -> FedAvg:
    """The example-weighted mean of the ``num_selected`` best Krum scores (Blanchard et al.
    2017; default ``n − f``); needs ``min_train_clients >= 2f + 3``."""
    _enough_for("multikrum", num_malicious, 2 * num_malicious + 3, kw)
    return _with(
        kw, aggregator=agg.MultiKrum(num_malicious=num_malicious, num_selected=num_selected)
    )


def Bulyan(*, num_malicious: int = 1, **kw: Any) -> FedAvg:
    """Krum selection, then a trimmed mean around the median (El Mhamdi et al. 2018); needs
    ``min_train_clients >= 4f + 3``."""
    _enough_for("bulyan", num_malicious, 4 * num_malicious + 3, kw)
    return _with(kw, aggregator=agg.Bulyan(num_malicious=num_malicious))


#: config name → preset
PRESETS: dict[str, Callable[..., Strategy]] = {
    "fedavg": FedAvg,
    "fedavgm": FedAvgM,
    "fedprox": FedProx,
    "fedadam": FedAdam,
    "fedyogi": FedYogi,
    "fedadagrad": FedAdagrad,
    "scaffold": Scaffold,
    "fednova": FedNova,
    "qfedavg": QFedAvg,
    "fedmedian": FedMedian,
    "fedtrimmedavg": FedTrimmedAvg,
    "krum": Krum,
    "multikrum": MultiKrum,
    "bulyan": Bulyan,
    "fedxgb_bagging": FedXgbBagging,
    "fedxgb_cyclic": FedXgbCyclic,
    "fedbuff": FedBuff,
}

#: keyword arguments every strategy takes (FedAvg's own), not specific to one algorithm
COMMON = frozenset(inspect.signature(FedAvg).parameters)


def preset_params(name: str) -> dict[str, Any]:
    """The parameters specific to preset ``name``, with their defaults."""
    preset = PRESETS[name]
    if preset in (FedAvg, FedXgbBagging, FedXgbCyclic):
        return {}
    return {
        p.name: p.default
        for p in inspect.signature(preset).parameters.values()
        if p.kind is inspect.Parameter.KEYWORD_ONLY and p.name not in COMMON
    }


#: every algorithm-specific parameter → the presets that take it
PARAM_OWNERS: dict[str, tuple[str, ...]] = {}
for _name in PRESETS:
    for _param in preset_params(_name):
        PARAM_OWNERS[_param] = (*PARAM_OWNERS.get(_param, ()), _name)


def make_strategy(name: str, params: dict[str, Any], **common: Any) -> Strategy:
    """The strategy called ``name`` (a preset, or ``"package.module:Class"``) with its
    algorithm-specific ``params`` and the ``common`` keywords every strategy takes."""
    if ":" in name:
        return _user_strategy(name, params, common)
    if name not in PRESETS:
        raise ConfigError(
            f"strategy.name = {name!r} is not a known strategy; choose one of: "
            f"{', '.join(PRESETS)}, or 'package.module:Class' for your own"
        )
    allowed = preset_params(name)
    for key in params:
        if key not in allowed:
            owners = PARAM_OWNERS.get(key, ())
            where = f" (it belongs to {', '.join(owners)})" if owners else ""
            raise ConfigError(
                f"strategy.{key} does not apply to strategy {name!r}{where}; "
                f"{name!r} takes: {', '.join(allowed) or 'no specific parameters'}"
            )
    return PRESETS[name](**params, **common)


def _user_strategy(spec: str, params: dict[str, Any], common: dict[str, Any]) -> Strategy:
    from pollinate.imports import load_object

    factory = load_object(spec, "strategy.name =")
    try:
        strategy = factory(**params, **common)
    except TypeError as exc:
        raise ConfigError(
            f"strategy.name = {spec!r} could not be built ({exc}); it must accept FedAvg's "
            f"keywords: {', '.join(sorted(common))}"
        ) from exc
    if not isinstance(strategy, Strategy):
        raise ConfigError(
            f"strategy.name = {spec!r} returned {type(strategy).__name__}, not a Strategy"
        )
    return strategy
