"""Robust aggregation against simulated attacks (``[attack]``): what each aggregator keeps.

Fashion-MNIST's 60,000 training examples split IID among 20 clients (3,000 each), all 20
train every round; 4 of them (20%, ``attack.fraction = 0.2``, the same seeded choice in every
run) attack. MLP 784-64-10, 1 local epoch, batch 32, SGD lr 0.1 without momentum, R rounds
(enough for clean FedAvg to settle), centralized accuracy on the 10,000 test images after
every round. For every attack kind

- ``sign_flip``: attackers send w − s·Δ (s = ``attack.scale``, 10);
- ``scale``: attackers send w + s·Δ (a boosted update, s = 10, and again with s = 100);
- ``gaussian``: noise as large as the update it replaces;
- ``label_flip``: attackers train on labels y → 9 − y;
- ``little_is_enough``: the colluding attackers' mean minus z_max standard deviations
  (Baruch et al. 2019);

and the clean run (no attack), each aggregator:

| strategy | aggregator | settings |
| --- | --- | --- |
| fedavg | weighted mean | — |
| fedmedian | coordinate-wise median | — |
| fedtrimmedavg | coordinate-wise trimmed mean | trim_fraction 0.2 (4 cut at each end) |
| krum | Krum | num_malicious 4, min_train_clients 11 |
| multikrum | Multi-Krum, m = n − f = 16 | num_malicious 4, min_train_clients 11 |
| bulyan | Bulyan | num_malicious 4, min_train_clients 19 (needs n >= 4f + 3 = 19) |

with the update bounds **off** (``strategy.norm_factor = 0``, ``examples_factor`` stays on but
no attack lies about its example count): the aggregator alone must stop the attack. Extra
rows run FedAvg with the default bounds on (``norm_factor = 100``: an update whose norm
exceeds 100 × the round's median is rejected) to show what they catch.

The final accuracy is printed against the clean run of the same aggregator and against clean
FedAvg. The issue's target: under ``sign_flip`` and ``scale``, at least one robust aggregator
keeps >= 90% of the clean accuracy where FedAvg falls below 50% of it; the script checks it.
Each run is one ``run_experiment`` call on ``config.load(None, [...])`` with
``run.deterministic = true``, sequential backend, into a temporary run folder.

    python bench/strategies_robustness.py                        # 20 rounds, all attacks
    python bench/strategies_robustness.py --rounds 10 --attacks sign_flip,scale:100
    python bench/strategies_robustness.py --dataset digits       # much faster, 1,797 images
    python bench/strategies_robustness.py --smoke                # tests: 1 round, 1 attack
"""

from __future__ import annotations

import argparse
import math
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import common as c

NUM_CLIENTS = 20
MALICIOUS = 4  # 20%
DEFAULT_ROUNDS = 20
ATTACKS = "sign_flip,scale,scale:100,gaussian,label_flip,little_is_enough"
AGGREGATORS: dict[str, list[str]] = {
    "fedavg": [],
    "fedmedian": [],
    "fedtrimmedavg": ["strategy.trim_fraction=0.2"],
    "krum": [f"strategy.num_malicious={MALICIOUS}", "strategy.min_train_clients=11"],
    "multikrum": [f"strategy.num_malicious={MALICIOUS}", "strategy.min_train_clients=11"],
    "bulyan": [f"strategy.num_malicious={MALICIOUS}", "strategy.min_train_clients=19"],
}
#: FedAvg with the default update bounds on (norm_factor 100): which attacks they catch
BOUNDS_ATTACKS = "sign_flip,scale,scale:1000"
TARGET_ATTACKS = ("sign_flip", "scale")  # the target is about these two


def parse_attack(text: str) -> tuple[str, float | None]:
    """``kind`` or ``kind:scale``."""
    kind, _, scale = text.partition(":")
    return kind, float(scale) if scale else None


def attack_label(kind: str, scale: float | None) -> str:
    if kind == "none":
        return "clean"
    return f"{kind} (s={scale:g})" if scale is not None else kind


def overrides(
    args: argparse.Namespace,
    aggregator: str,
    kind: str,
    scale: float | None,
    bounds: bool,
    output: Path,
) -> list[str]:
    """``--set``-style overrides for one run."""
    out = [
        f"run.name='robust-{aggregator}-{kind}'",
        f"run.output='{output}'",
        f"run.rounds={args.rounds}",
        f"run.seed={args.seed}",
        "run.deterministic=true",
        f"data.dataset='{args.dataset}'",
        "data.partition='iid'",
        f"data.num_clients={NUM_CLIENTS}",
        "model.name='mlp'",
        f"model.hidden={args.hidden}",
        *c.sgd_overrides(args.epochs, args.lr),
        f"strategy.name='{aggregator}'",
        "strategy.fraction_train=1.0",
        *AGGREGATORS[aggregator],
        "simulation.backend='sequential'",
        "simulation.threads_per_worker=1",
    ]
    if not bounds:
        out.append("strategy.norm_factor=0.0")
    if kind != "none":
        out += [f"attack.kind='{kind}'", f"attack.fraction={MALICIOUS / NUM_CLIENTS}"]
        if scale is not None:
            out.append(f"attack.scale={scale}")
    return out


def run_one(
    args: argparse.Namespace, aggregator: str, kind: str, scale: float | None, bounds: bool
) -> dict[str, Any]:
    """One run: accuracy after every round, rejected updates, wall seconds."""
    from pollinate import config
    from pollinate.experiment import run_experiment

    with tempfile.TemporaryDirectory(prefix="pollinate-robust-") as tmp:
        cfg = config.load(None, overrides(args, aggregator, kind, scale, bounds, Path(tmp)))
        start = time.perf_counter()
        error = None
        try:
            rounds = run_experiment(cfg, quiet=True).history.rounds
        except Exception as exc:  # a failing run is a finding: record it, go on
            error, rounds = f"{type(exc).__name__}: {exc}", []
        wall = time.perf_counter() - start
    accuracy = [r.get("centralized", {}).get("accuracy") for r in rounds]
    finite = [a if a is not None and math.isfinite(a) else float("nan") for a in accuracy]
    tail = finite[-5:]
    return {
        "aggregator": aggregator,
        "attack": kind,
        "scale": scale,
        "label": attack_label(kind, scale),
        "bounds": bounds,
        "final": finite[-1] if finite else float("nan"),
        "last5_mean": statistics.fmean(tail) if tail else float("nan"),
        "rejected": sum(r.get("train", {}).get("rejected", 0) for r in rounds),
        "rounds": len(rounds),
        "wall_s": wall,
        "error": error,
        "accuracy_by_round": accuracy,
    }


def ratio(a: float, b: float) -> float:
    return a / b if b and math.isfinite(b) else float("nan")


def long_table(results: list[dict[str, Any]]) -> str:
    """One row per run: final accuracy, against this aggregator's clean run and clean FedAvg."""
    clean = {r["aggregator"]: r for r in results if r["attack"] == "none" and not r["bounds"]}
    base = clean.get("fedavg", {}).get("final", float("nan"))
    lines = [
        "| attack | aggregator | update bounds | final accuracy | mean of last 5 "
        "| / clean, same aggregator | / clean FedAvg | updates rejected | wall s |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        own = clean.get(r["aggregator"], {}).get("final", float("nan"))
        name = r["aggregator"] + (f" (**failed**: {r['error'][:80]})" if r["error"] else "")
        lines.append(
            f"| {r['label']} | {name} | {'on (norm_factor 100)' if r['bounds'] else 'off'} | "
            f"{r['final']:.4f} | {r['last5_mean']:.4f} | {ratio(r['final'], own):.3f}× | "
            f"{ratio(r['final'], base):.3f}× | {r['rejected']} | {r['wall_s']:.1f} |"
        )
    return "\n".join(lines)


def matrix_table(results: list[dict[str, Any]], aggregators: list[str]) -> str:
    """Aggregator × attack: final accuracy (its ratio to this aggregator's clean run)."""
    runs = [r for r in results if not r["bounds"]]
    labels = list(dict.fromkeys(r["label"] for r in runs))
    lines = [
        "| aggregator | " + " | ".join(labels) + " |",
        "| --- |" + " ---: |" * len(labels),
    ]
    for agg in aggregators:
        own = {r["label"]: r for r in runs if r["aggregator"] == agg}
        clean = own.get("clean", {}).get("final", float("nan"))
        cells = []
        for label in labels:
            r = own.get(label)
            if r is None:
                cells.append("–")
            elif label == "clean":
                cells.append(f"{r['final']:.4f}")
            else:
                cells.append(f"{r['final']:.4f} ({ratio(r['final'], clean):.2f}×)")
        lines.append(f"| {agg} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def verdict(results: list[dict[str, Any]]) -> list[str]:
    """The issue's target for each sign_flip / scale run, in words."""
    runs = [r for r in results if not r["bounds"]]
    clean = {r["aggregator"]: r["final"] for r in runs if r["attack"] == "none"}
    base = clean.get("fedavg", float("nan"))
    lines = []
    for label in dict.fromkeys(r["label"] for r in runs if r["attack"] in TARGET_ATTACKS):
        attacked = {r["aggregator"]: r["final"] for r in runs if r["label"] == label}
        fedavg = attacked.get("fedavg", float("nan"))
        falls = ratio(fedavg, base) < 0.5
        keep_own = [
            a for a, v in attacked.items() if a != "fedavg" and ratio(v, clean.get(a, 0)) >= 0.9
        ]
        keep_base = [a for a, v in attacked.items() if a != "fedavg" and ratio(v, base) >= 0.9]
        met = falls and bool(keep_own)
        lines.append(
            f"{label}: FedAvg keeps {ratio(fedavg, base):.3f} of its clean accuracy "
            f"({'below' if falls else 'NOT below'} 0.5); robust aggregators keeping >= 0.9 of "
            f"their own clean run: {', '.join(keep_own) or 'none'}; of clean FedAvg's: "
            f"{', '.join(keep_base) or 'none'} -> target {'MET' if met else 'NOT MET'}"
        )
    return lines


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, help=f"rounds per run ({DEFAULT_ROUNDS})")
    parser.add_argument("--attacks", default=ATTACKS, help="kind or kind:scale, comma-separated")
    parser.add_argument(
        "--aggregators", default=",".join(AGGREGATORS), help=f"of {', '.join(AGGREGATORS)}"
    )
    parser.add_argument(
        "--bounds-attacks",
        default=BOUNDS_ATTACKS,
        help=f"attacks run again on FedAvg with the default bounds ({BOUNDS_ATTACKS}; '' none)",
    )
    parser.add_argument("--dataset", default="fashion-mnist", help="fashion-mnist or digits")
    parser.add_argument("--hidden", default="[64]", help="mlp hidden sizes ([64])")
    parser.add_argument("--epochs", type=int, default=1, help="local epochs (1)")
    parser.add_argument("--lr", type=float, default=0.1, help="local SGD learning rate (0.1)")
    parser.add_argument("--seed", type=int, default=0, help="run.seed (0)")
    parser.add_argument(
        "--smoke", action="store_true", help="1 round, sign_flip only, a [16] MLP (tests)"
    )
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    if args.smoke:
        args.rounds = args.rounds or 1
        args.attacks, args.hidden, args.bounds_attacks = "sign_flip", "[16]", "scale"
    args.rounds = args.rounds or DEFAULT_ROUNDS
    attacks = [parse_attack(a) for a in args.attacks.split(",") if a]
    bounds_attacks = [parse_attack(a) for a in args.bounds_attacks.split(",") if a]
    aggregators = [a for a in args.aggregators.split(",") if a]
    for name in aggregators:
        if name not in AGGREGATORS:
            parser.error(f"unknown aggregator {name!r}; use {', '.join(AGGREGATORS)}")

    c.use_shared_data()
    info = c.machine()
    c.say(
        f"Robustness: {args.dataset}, {NUM_CLIENTS} IID clients, all every round, "
        f"{MALICIOUS} attackers, mlp {args.hidden}, {args.epochs} local epoch(s), batch 32, "
        f"SGD lr {args.lr}, {args.rounds} rounds, update bounds off unless said"
    )
    c.say(c.describe_machine(info))
    started = time.perf_counter()
    results: list[dict[str, Any]] = []
    payload: dict[str, Any] = {
        "workload": "strategies_robustness",
        "machine": info,
        "args": vars(args) | {"json": str(args.json) if args.json else None},
        "results": results,
    }
    plan = [(agg, k, s, False) for k, s in [("none", None), *attacks] for agg in aggregators]
    plan += [("fedavg", k, s, True) for k, s in bounds_attacks]
    for agg, kind, scale, bounds in plan:
        r = run_one(args, agg, kind, scale, bounds)
        results.append(r)
        c.write_json(args.json, payload)  # after every run: partial results survive
        c.say(
            f"  {r['label']:22s} {agg:13s} bounds {'on ' if bounds else 'off'}: final "
            f"{r['final']:.4f}, last 5 {r['last5_mean']:.4f}, {r['rejected']} rejected, "
            f"{r['wall_s']:.1f} s, load {c.load()[0]:.2f}"
            + (f", ERROR {r['error']}" if r["error"] else "")
        )
    info["load_after"] = c.load()
    c.say(f"total {time.perf_counter() - started:.0f} s; load after: {info['load_after']}")
    c.say(long_table(results))
    c.say("")
    c.say(matrix_table(results, aggregators))
    c.say("")
    for line in verdict(results):
        c.say(line)
    c.write_json(args.json, payload)
    return payload


if __name__ == "__main__":  # the process backend starts worker processes
    main()
