"""Strategies on non-IID data: FedAvg against its server-optimizer and drift-correcting variants.

Fashion-MNIST's 60,000 training examples split among 100 clients, 10 sampled per round
(``strategy.fraction_train = 0.1``), McMahan et al.'s "2NN" (MLP 784-200-200-10:
``model.name = "mlp"``, ``model.hidden = [200, 200]``), E local epochs of SGD (batch 32,
lr 0.1, **no momentum** for every strategy, so that the client optimizer is the same
everywhere and SCAFFOLD's and FedNova's corrections apply as published), R rounds, for each
partition:

- ``iid``: every client gets a uniform random 600 examples;
- ``dir0.5`` / ``dir0.1``: label proportions per client from Dirichlet(α) (``data.partition =
  "dirichlet"``), α = 0.5 mildly, α = 0.1 strongly skewed;
- ``shards2``: McMahan's pathological split, 2 label-sorted shards of 300 per client
  (``data.partition = "shards"``, ``shards_per_client = 2``): at most 2 labels a client.

and each strategy, with the server settings that suit this workload:

| strategy | settings |
| --- | --- |
| fedavg | — |
| fedavgm | server_lr 1.0, server_momentum 0.9 |
| fedprox | proximal_mu 0.01 |
| fedadam | server_lr 0.01, beta 0.9 / 0.99, tau 1e-3 |
| fedyogi | server_lr 0.01, beta 0.9 / 0.99, tau 1e-3 |
| scaffold | server_lr 1.0 (option II control variates) |
| fednova | — |

Reported per (partition, strategy), mean ± sd over seeds: the final and the best centralized
test accuracy (10,000 test images, after every round), and the rounds needed to first reach
70% and 80% (with how many seeds reached it). The FedAvg run of the same partition is the
baseline: final accuracy and wall time are also printed as ratios to it. Every run is one
``run_experiment`` call on ``config.load(None, [...])`` with ``run.deterministic = true``,
no federated evaluation (``fraction_evaluate = 0``), no client test split, into a temporary
run folder.

Run it with ``OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1`` on a shared machine (see
bench/README.md, "Strategy benchmarks"). The sequential backend is the default: it is faster
here (the process backend used to deadlock with SCAFFOLD on this model: problem 1 there).

    python bench/strategies_noniid.py --time-one           # time one round per backend, then stop
    python bench/strategies_noniid.py                      # the issue's size: 100 rounds x 3 seeds
    python bench/strategies_noniid.py --rounds 40 --seeds 0 --partitions iid,dir0.1,shards2
    python bench/strategies_noniid.py --smoke              # a few seconds per run (tests)
    python bench/strategies_noniid.py --partitions iid,dir0.5 --json a.json   # one core ...
    python bench/strategies_noniid.py --partitions dir0.1,shards2 --json b.json  # ... each
    python bench/strategies_noniid.py --merge a.json b.json   # one table from saved results

``--model cnn`` runs the seed CNN instead (``model.name = "cnn"``: two 3x3 convolutions with
32 and 64 channels, each followed by 2x2 max pooling, then 128 hidden units), with the same
client optimizer and server settings:

    python bench/strategies_noniid.py --model cnn --strategies fedavg,fedadam,fedyogi \
        --partitions dir0.1 --seeds 0 --rounds 40
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

NUM_CLIENTS = 100
FRACTION = 0.1  # 10 clients per round
LR = 0.1
BATCH = 32
THRESHOLDS = (0.7, 0.8)
PARTITIONS: dict[str, list[str]] = {
    "iid": ["data.partition='iid'"],
    "dir0.5": ["data.partition='dirichlet'", "data.alpha=0.5"],
    "dir0.1": ["data.partition='dirichlet'", "data.alpha=0.1"],
    "shards2": ["data.partition='shards'", "data.shards_per_client=2"],
}
STRATEGIES: dict[str, list[str]] = {
    "fedavg": [],
    "fedavgm": ["strategy.server_lr=1.0", "strategy.server_momentum=0.9"],
    "fedprox": ["strategy.proximal_mu=0.01"],
    "fedadam": ["strategy.server_lr=0.01", "strategy.tau=1e-3"],
    "fedyogi": ["strategy.server_lr=0.01", "strategy.tau=1e-3"],
    "scaffold": ["strategy.server_lr=1.0"],
    "fednova": [],
}
DEFAULT_ROUNDS = 100
DEFAULT_SEEDS = "0,1,2"
SMOKE_ROUNDS = 2


def overrides(
    args: argparse.Namespace, partition: str, strategy: str, seed: int, output: Path
) -> list[str]:
    """``--set``-style overrides for one run."""
    return [
        f"run.name='noniid-{partition}-{strategy}-s{seed}'",
        f"run.output='{output}'",
        f"run.rounds={args.rounds}",
        f"run.seed={seed}",
        "run.deterministic=true",
        f"data.dataset='{args.dataset}'",
        *PARTITIONS[partition],
        f"data.num_clients={args.clients}",
        f"model.name='{args.model}'",
        *([f"model.hidden={args.hidden}"] if args.model == "mlp" else []),
        *c.sgd_overrides(args.epochs, args.lr, BATCH),
        f"strategy.name='{strategy}'",
        f"strategy.fraction_train={args.fraction}",
        *STRATEGIES[strategy],
        f"simulation.backend='{args.backend}'",
        "simulation.workers=2",
        "simulation.threads_per_worker=1",
    ]


def run_one(args: argparse.Namespace, partition: str, strategy: str, seed: int) -> dict[str, Any]:
    """One run: accuracy after every round, wall seconds of the whole ``run_experiment``."""
    from pollinate import config
    from pollinate.experiment import run_experiment

    with tempfile.TemporaryDirectory(prefix="pollinate-noniid-") as tmp:
        cfg = config.load(None, overrides(args, partition, strategy, seed, Path(tmp)))
        start = time.perf_counter()
        error = None
        try:
            result = run_experiment(cfg, quiet=True)
            rounds = result.history.rounds
        except Exception as exc:  # a failing strategy is a finding: record it, go on
            error, rounds = f"{type(exc).__name__}: {exc}", []
        wall = time.perf_counter() - start
    accuracy = [r.get("centralized", {}).get("accuracy") for r in rounds]
    finite = [a for a in accuracy if a is not None and math.isfinite(a)]
    return {
        "partition": partition,
        "strategy": strategy,
        "seed": seed,
        "final": accuracy[-1] if accuracy and accuracy[-1] is not None else float("nan"),
        "best": max(finite, default=float("nan")),
        "reach": {
            f"{t:g}": next((i for i, a in enumerate(accuracy, 1) if a and a >= t), None)
            for t in THRESHOLDS
        },
        "rounds": len(rounds),
        "wall_s": wall,
        "error": error,
        "accuracy_by_round": accuracy,
    }


def mean_sd(values: list[float], digits: int = 4) -> str:
    values = [v for v in values if math.isfinite(v)]
    if not values:
        return "nan"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.fmean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def reach_text(runs: list[dict[str, Any]], threshold: float) -> str:
    hits = [r["reach"][f"{threshold:g}"] for r in runs if r["reach"][f"{threshold:g}"]]
    if not hits:
        return "—"
    text = mean_sd([float(h) for h in hits], digits=1 if len(hits) > 1 else 0)
    return text if len(hits) == len(runs) else f"{text} ({len(hits)}/{len(runs)} seeds)"


def table(results: list[dict[str, Any]], partitions: list[str], strategies: list[str]) -> str:
    """One row per (partition, strategy); ratios against FedAvg on the same partition."""
    lines = [
        "| partition | strategy | final accuracy | best accuracy | rounds to 70% "
        "| rounds to 80% | final / FedAvg | wall s per run | wall / FedAvg |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for p in partitions:
        base = [r for r in results if r["partition"] == p and r["strategy"] == "fedavg"]
        base_final = statistics.fmean([r["final"] for r in base]) if base else float("nan")
        base_wall = statistics.fmean([r["wall_s"] for r in base]) if base else float("nan")
        for s in strategies:
            runs = [r for r in results if r["partition"] == p and r["strategy"] == s]
            if not runs:
                continue
            errors = [r["error"] for r in runs if r["error"]]
            final = statistics.fmean([r["final"] for r in runs])
            wall = statistics.fmean([r["wall_s"] for r in runs])
            note = f" (**{len(errors)} failed**)" if errors else ""
            lines.append(
                f"| {p} | {s}{note} | {mean_sd([r['final'] for r in runs])} | "
                f"{mean_sd([r['best'] for r in runs])} | {reach_text(runs, 0.7)} | "
                f"{reach_text(runs, 0.8)} | {final / base_final:.3f}× | {wall:.1f} | "
                f"{wall / base_wall:.2f}× |"
            )
    return "\n".join(lines)


def merge(paths: list[Path]) -> str:
    """One table from the results that earlier ``--json`` runs saved, with a line per file."""
    import json

    lines, results = [], []
    for path in paths:
        try:
            payload = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise SystemExit(
                f"--merge: cannot read {path} ({exc}); pass files written by --json"
            ) from exc
        if payload.get("workload") != "strategies_noniid":
            raise SystemExit(f"--merge: {path} is not a strategies_noniid --json file")
        a, runs = payload["args"], payload["results"]
        model = a.get("model", "mlp")
        lines.append(
            f"{path}: {len(runs)} runs, {model}{' ' + a['hidden'] if model == 'mlp' else ''}, "
            f"E = {a['epochs']}, {a['rounds']} rounds, seeds run "
            f"{sorted({r['seed'] for r in runs})}, partitions {a['partitions']}"
        )
        results += runs
    partitions = [p for p in PARTITIONS if any(r["partition"] == p for r in results)]
    strategies = [s for s in STRATEGIES if any(r["strategy"] == s for r in results)]
    kept = []
    for p in partitions:  # a seed counts where every strategy ran it: like against like
        runs = [r for r in results if r["partition"] == p]
        seeds = sorted({r["seed"] for r in runs})
        whole = [
            d for d in seeds if {r["strategy"] for r in runs if r["seed"] == d} >= set(strategies)
        ]
        left = [d for d in seeds if d not in whole]
        kept += [r for r in runs if r["seed"] in whole]
        lines.append(
            f"{p}: seeds {whole}"
            + (f" (seeds {left} left out: not every strategy ran them)" if left else "")
        )
    return "\n".join([*lines, table(kept, partitions, strategies)])


def time_one_round(args: argparse.Namespace) -> None:
    """Time 1-round and 3-round runs of FedAvg per backend: the difference is 2 rounds."""
    for backend in ("sequential", "process"):
        timings = {}
        for rounds in (1, 3):
            a = argparse.Namespace(**{**vars(args), "backend": backend, "rounds": rounds})
            timings[rounds] = run_one(a, "dir0.1", "fedavg", 0)["wall_s"]
        per_round = (timings[3] - timings[1]) / 2
        c.say(
            f"  {backend}: 1 round {timings[1]:.2f} s, 3 rounds {timings[3]:.2f} s, "
            f"about {per_round:.2f} s per further round (load {c.load()[0]:.2f})"
        )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, help=f"rounds per run ({DEFAULT_ROUNDS})")
    parser.add_argument("--seeds", help=f"comma-separated seeds ({DEFAULT_SEEDS})")
    parser.add_argument("--epochs", type=int, default=1, help="local epochs E (1)")
    parser.add_argument(
        "--partitions", default=",".join(PARTITIONS), help=f"of {', '.join(PARTITIONS)}"
    )
    parser.add_argument(
        "--strategies", default=",".join(STRATEGIES), help=f"of {', '.join(STRATEGIES)}"
    )
    parser.add_argument("--lr", type=float, default=LR, help=f"local SGD learning rate ({LR})")
    parser.add_argument("--model", default="mlp", choices=("mlp", "cnn"), help="mlp or cnn")
    parser.add_argument("--hidden", default="[200, 200]", help="mlp hidden sizes ([200, 200])")
    parser.add_argument("--clients", type=int, default=NUM_CLIENTS, help="clients (100)")
    parser.add_argument("--fraction", type=float, default=FRACTION, help="sampled per round")
    parser.add_argument("--dataset", default="fashion-mnist", help="fashion-mnist (or digits)")
    parser.add_argument("--backend", default="sequential", help="sequential or process")
    parser.add_argument("--time-one", action="store_true", help="time a round per backend")
    parser.add_argument(
        "--smoke",
        action="store_true",
        help=f"{SMOKE_ROUNDS} rounds, 1 seed, iid and shards2, a [16] MLP (tests)",
    )
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument(
        "--merge", type=Path, nargs="+", metavar="JSON", help="print one table from --json files"
    )
    args = parser.parse_args(argv)
    if args.merge:
        c.say(merge(args.merge))
        return {}
    if args.smoke:
        args.rounds = args.rounds or SMOKE_ROUNDS
        args.seeds = args.seeds or "0"
        args.partitions, args.hidden = "iid,shards2", "[16]"
    args.rounds = args.rounds or DEFAULT_ROUNDS
    seeds = [int(s) for s in (args.seeds or DEFAULT_SEEDS).split(",")]
    partitions = [p for p in args.partitions.split(",") if p]
    strategies = [s for s in args.strategies.split(",") if s]
    for name in partitions:
        if name not in PARTITIONS:
            parser.error(f"unknown partition {name!r}; use {', '.join(PARTITIONS)}")
    for name in strategies:
        if name not in STRATEGIES:
            parser.error(f"unknown strategy {name!r}; use {', '.join(STRATEGIES)}")

    c.use_shared_data()
    info = c.machine()
    model_text = f"mlp {args.hidden}" if args.model == "mlp" else "cnn"
    c.say(
        f"Strategies on non-IID data: {args.dataset}, {args.clients} clients, "
        f"{args.fraction * args.clients:g} per round, {model_text}, E = {args.epochs}, "
        f"batch {BATCH}, SGD lr {args.lr} (no momentum), {args.rounds} rounds, seeds {seeds}, "
        f"{args.backend} backend"
    )
    c.say(c.describe_machine(info))
    if args.time_one:
        time_one_round(args)
        return {}
    started = time.perf_counter()
    results: list[dict[str, Any]] = []
    payload: dict[str, Any] = {
        "workload": "strategies_noniid",
        "machine": info,
        "args": vars(args) | {"json": str(args.json) if args.json else None},
        "results": results,
    }
    for seed in seeds:  # seeds outermost: a run stopped early still has whole seeds
        for p in partitions:
            for s in strategies:
                r = run_one(args, p, s, seed)
                results.append(r)
                c.write_json(args.json, payload)  # after every run: partial results survive
                reach = ", ".join(f"{k}: {v}" for k, v in r["reach"].items())
                c.say(
                    f"  {p:7s} {s:8s} seed {seed}: final {r['final']:.4f}, best {r['best']:.4f}, "
                    f"first round at ({reach}), {r['wall_s']:.1f} s, load {c.load()[0]:.2f}"
                    + (f", ERROR {r['error']}" if r["error"] else "")
                )
    info["load_after"] = c.load()
    c.say(f"total {time.perf_counter() - started:.0f} s; load after: {info['load_after']}")
    c.say(table(results, partitions, strategies))
    c.write_json(args.json, payload)
    return payload


if __name__ == "__main__":  # the process backend starts worker processes
    main()
