"""The experiment in a few words, from the resolved config in history.json: data set, model,
partition, strategy (with its parameters), and privacy, secure aggregation, compression and
the simulated environment when they are on. Absent sections are left out, never guessed."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from pollinate.report.files import finite_number

# [strategy] keys that every strategy takes (sampling, deadlines, update bounds): the summary
# names a strategy's own parameters, so these are left out (sampling has its own words).
_COMMON_STRATEGY_KEYS = frozenset(
    {
        "name",
        "fraction_train",
        "min_train_clients",
        "min_available_clients",
        "fraction_evaluate",
        "min_evaluate_clients",
        "round_timeout_s",
        "selection",
        "candidates",
        "cooldown_rounds",
        "max_norm",
        "norm_factor",
        "max_examples",
        "examples_factor",
        "on_excess",
    }
)
# The partition keys each partitioner reads, and how they read in words.
_PARTITION_KEYS = {
    "dirichlet": (("alpha", "α = {}"), ("partition_by", "by {}")),
    "quantity": (("alpha", "α = {}"),),
    "shards": (("shards_per_client", "{} shards per client"),),
}


def describe_experiment(
    config: Mapping[str, Any], last_record: Mapping[str, Any] | None = None
) -> list[tuple[str, str]]:
    """(what, description) rows for the report's summary, e.g. ("partition", "dirichlet,
    α = 0.3; 20 clients, 20% of each held out for testing").

    ``last_record`` (the last history entry) gives the privacy budget spent, when recorded.
    """
    rows: list[tuple[str, str]] = []
    data = _section(config, "data")
    if "dataset" in data:
        rows.append(("dataset", _text(data["dataset"])))
    model = _section(config, "model")
    if "name" in model:
        rows.append(("model", _model(model)))
    if "partition" in data:
        rows.append(("partition", _partition(data)))
    strategy = _section(config, "strategy")
    if "name" in strategy:
        rows.append(("strategy", _strategy(strategy)))
    privacy = _privacy(_section(config, "privacy"), last_record)
    if privacy:
        rows.append(("privacy", privacy))
    secagg = _section(config, "secure_aggregation")
    if secagg.get("enabled") is True:
        rows.append(("secure aggregation", "SecAgg+ (the server sees only the sum of updates)"))
    compression = _compression(_section(config, "compression"))
    if compression:
        rows.append(("compression", compression))
    environment = _section(config, "environment")
    if environment.get("tiers") or environment.get("trace"):
        rows.append(("environment", _environment(environment)))
    return rows


def _section(config: Mapping[str, Any], name: str) -> Mapping[str, Any]:
    value = config.get(name) if isinstance(config, Mapping) else None
    return value if isinstance(value, Mapping) else {}


def _text(value: object) -> str:
    """A config value in words: strings bare, numbers with %g, anything else as JSON."""
    if isinstance(value, str):
        return value
    if isinstance(value, float):
        return f"{value:g}"
    return json.dumps(value, ensure_ascii=False, default=str)


# [model] keys that only some models read: shown only for those
_XGBOOST_MODEL_KEYS = ("max_depth", "eta", "local_rounds")


def _model(model: Mapping[str, Any]) -> str:
    name = _text(model["name"])
    xgboost = model.get("framework") == "xgboost"
    extras = [
        (key, value)
        for key, value in model.items()
        if key != "name"
        and (key != "hidden" or name == "mlp")  # only the MLP reads hidden
        and (key not in _XGBOOST_MODEL_KEYS or xgboost)  # only boosted trees read these
    ]
    if not extras:
        return name
    return f"{name} ({', '.join(f'{k} {_text(v)}' for k, v in extras)})"


def _partition(data: Mapping[str, Any]) -> str:
    name = _text(data["partition"])
    words = [
        template.format(_text(data[key]))
        for key, template in _PARTITION_KEYS.get(name, ())
        if data.get(key) not in (None, "")
    ]
    text = ", ".join([name, *words])
    clients = []
    if isinstance(data.get("num_clients"), int):
        clients.append(f"{data['num_clients']} clients")
    fraction = data.get("client_test_fraction")
    if isinstance(fraction, (int, float)) and not isinstance(fraction, bool):
        clients.append(f"{fraction * 100:g}% of each client's examples held out for testing")
    return "; ".join([text, ", ".join(clients)]) if clients else text


def _strategy(strategy: Mapping[str, Any]) -> str:
    name = _text(strategy["name"])
    own = [
        f"{key} = {_text(value)}"
        for key, value in strategy.items()
        if key not in _COMMON_STRATEGY_KEYS and value is not None
    ]
    text = f"{name} ({', '.join(own)})" if own else name
    sampling = [
        f"{key} = {_text(strategy[key])}"
        for key in ("fraction_train", "fraction_evaluate")
        if key in strategy
    ]
    selection = strategy.get("selection")
    if selection not in (None, "", "uniform"):
        sampling.append(f"selection = {_text(selection)}")
    return f"{text}; {', '.join(sampling)}" if sampling else text


def _privacy(privacy: Mapping[str, Any], last_record: Mapping[str, Any] | None) -> str:
    mode = privacy.get("mode")
    if mode in (None, "", "none"):
        return ""
    words = {"central": "central DP (DP-FedAvg)", "local": "local DP"}.get(str(mode), str(mode))
    parts = []
    target = privacy.get("target_epsilon")
    if isinstance(target, (int, float)) and target > 0:
        parts.append(f"target ε = {_text(target)}")
    elif "noise_multiplier" in privacy:
        parts.append(f"noise multiplier z = {_text(privacy['noise_multiplier'])}")
    if "clip" in privacy:
        where = (
            f" on the {privacy['clip_on']}" if mode == "central" and privacy.get("clip_on") else ""
        )
        adaptive = ", adaptive" if privacy.get("adaptive") is True else ""
        parts.append(f"clip C = {_text(privacy['clip'])}{where}{adaptive}")
    if "delta" in privacy:
        parts.append(f"δ = {_text(privacy['delta'])}")
    if isinstance(last_record, Mapping) and isinstance(last_record.get("privacy"), Mapping):
        spent = last_record["privacy"]
        epsilon = finite_number(spent.get("epsilon"))
        after = f"after round {last_record.get('round')}"
        if epsilon is not None:
            parts.append(f"ε = {epsilon:.3g} spent {after}")
        elif "epsilon" in spent:
            parts.append(f"ε unbounded {after}")
    return f"{words}: {', '.join(parts)}" if parts else words


def _compression(compression: Mapping[str, Any]) -> str:
    parts = []
    for direction in ("uplink", "downlink"):
        method = compression.get(direction)
        if method in (None, "", "none"):
            continue
        detail = ""
        if method == "qsgd" and "bits" in compression:
            detail = f" ({_text(compression['bits'])} bits)"
        elif method == "topk" and "topk_fraction" in compression:
            detail = f" (fraction {_text(compression['topk_fraction'])})"
        parts.append(f"{direction} {_text(method)}{detail}")
    return ", ".join(parts)


def _environment(environment: Mapping[str, Any]) -> str:
    tiers = environment.get("tiers")
    source = (
        f"{len(tiers)} device/network tiers"
        if isinstance(tiers, list) and tiers
        else f"profiles from {_text(environment.get('trace'))}"
    )
    deadline = environment.get("deadline_s")
    if isinstance(deadline, (int, float)) and deadline > 0:
        source += f", simulated deadline {_text(deadline)} s"
    return f"virtual clock: {source}"
