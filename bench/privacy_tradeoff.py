"""Privacy: the utility/privacy trade-off of DP-FedAvg (``[privacy] mode = "central"``).

Fashion-MNIST's 60,000 training examples split IID among 1,000 clients (60 each, no client
test split), MLP 784-64-10 (``model.name = "mlp"``, as W2/W3). Every round samples clients
by Poisson sampling with q = 0.1 (100 expected; ``[privacy] sampling = "poisson"``, PLD
accountant), each trains 2 local epochs (batch 32, SGD lr 0.1, no momentum), the server
clips every update to L2 norm C = 0.3 (about the median update norm), adds N(0, (z·C)²) to
the sum and divides by the *expected* 100 clients (the noise on the mean is z·C/100 per
coordinate), then applies it with server learning rate 1 (FedAvg has no other). ε is
reported at δ = 1e-5 (add-or-remove-one adjacency) for the released models of all rounds.
The noise is seeded (``run.deterministic = true``) so the figures reproduce: fine for a
benchmark, not for a real release.

The plain baseline, run in the same invocation, is the same federation with no DP at all:
``privacy.mode = "none"`` with exactly 100 clients per round (``strategy.fraction_train =
0.1``), no clipping, no noise (z = 0, ε = ∞). Every configuration is a ``run_experiment``
call on ``config.load(overrides=[...])``, centralized evaluation on the 10,000 test images
after every round, no federated evaluation, sequential backend (faster than the process
backend for these 100 tiny tasks per round on 2 cores: see bench/README.md).

    python bench/privacy_tradeoff.py                 # z in 0, 0.5, 1, 2; 300 rounds each
    python bench/privacy_tradeoff.py --quick         # a smoke test (< 1 min)
    python bench/privacy_tradeoff.py --rounds 100 --noise 0,8,32 --model logreg --clip 0.5
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

DEFAULT_ROUNDS = 300
DEFAULT_NOISE = "0,0.5,1,2"
QUICK_ROUNDS = 3
QUICK_CLIENTS = 200  # --quick: 200 clients (300 examples each), 20 per round
NUM_CLIENTS = 1000
SAMPLING_RATE = 0.1  # q: Poisson sampling, 100 clients per round expected
DELTA = 1e-5


def overrides(args: argparse.Namespace, z: float, num_clients: int, output: Path) -> list[str]:
    """``--set``-style overrides for one configuration of the sweep (z = 0: no DP)."""
    common = [
        f"run.name='privacy-z{z:g}'",
        f"run.output='{output}'",
        f"run.rounds={args.rounds}",
        "run.seed=0",
        "run.deterministic=true",  # seeded noise: reproducible (so not secret: a benchmark)
        "data.dataset='fashion-mnist'",
        f"data.partition='{args.partition}'",
        f"data.num_clients={num_clients}",
        f"model.name='{args.model}'",
        f"model.hidden={args.hidden}",
        *c.sgd_overrides(args.epochs, args.lr),
        f"strategy.fraction_train={SAMPLING_RATE}",
        f"simulation.backend='{args.backend}'",
        "simulation.workers=2",
        "simulation.threads_per_worker=1",
    ]
    if z == 0:
        return [*common, "privacy.mode='none'"]
    return [
        *common,
        "privacy.mode='central'",
        f"privacy.noise_multiplier={z}",
        f"privacy.clip={args.clip}",
        "privacy.clip_on='server'",
        f"privacy.delta={DELTA}",
        "privacy.sampling='poisson'",
        "privacy.accountant='pld'",
    ]


def warm_up(args: argparse.Namespace) -> None:
    """One untimed 1-round run: pays this process's one-time imports (torch._dynamo on the
    first optimizer, matplotlib for the run folder's plots) before any timed run."""
    quick = argparse.Namespace(**{**vars(args), "rounds": 1})
    run_one(quick, 1.0, QUICK_CLIENTS)


def run_one(args: argparse.Namespace, z: float, num_clients: int) -> dict[str, Any]:
    """One configuration: final accuracy, ε, rounds, wall seconds (the whole run_experiment)."""
    from pollinate import config
    from pollinate.experiment import run_experiment

    with tempfile.TemporaryDirectory(prefix="pollinate-privacy-") as tmp:
        cfg = config.load(overrides=overrides(args, z, num_clients, Path(tmp)))
        load_before = c.load()
        start, cpu = time.perf_counter(), c.cpu_seconds()
        result = run_experiment(cfg, quiet=True)
        wall, cpu = time.perf_counter() - start, c.cpu_seconds() - cpu
    rounds = result.history.rounds
    accuracy = [r.get("centralized", {}).get("accuracy") for r in rounds]
    privacy = rounds[-1].get("privacy", {}) if rounds else {}
    sampled = [len(r.get("clients") or {}) for r in rounds]
    tail = [a for a in accuracy[-10:] if a is not None]
    return {
        "z": z,
        "epsilon": privacy.get("epsilon", math.inf) if z else math.inf,
        "accuracy": accuracy[-1] if accuracy else float("nan"),
        "accuracy_last10_mean": statistics.fmean(tail) if tail else float("nan"),
        "best_accuracy": max((a for a in accuracy if a is not None), default=float("nan")),
        "rounds": len(rounds),
        "wall_s": wall,
        "cpu_s": cpu,
        "clients_per_round_mean": statistics.fmean(sampled) if sampled else None,
        "load_before": load_before,
        "load_after": c.load(),
        "accuracy_by_round": accuracy,
    }


def eps_text(eps: float) -> str:
    return "∞ (no DP)" if math.isinf(eps) else f"{eps:.2f}"


def table(results: list[dict[str, Any]]) -> str:
    """The Markdown table: ratios are against the no-DP run (z = 0) of the same sweep."""
    base = next((r for r in results if r["z"] == 0), None)
    lines = [
        "| z | ε (δ=1e-5) | test accuracy | mean of last 10 rounds | rounds | wall s "
        "| accuracy / no-DP | wall / no-DP |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        acc_ratio = f"{r['accuracy'] / base['accuracy']:.3f}×" if base else "–"
        wall_ratio = f"{r['wall_s'] / base['wall_s']:.2f}×" if base else "–"
        lines.append(
            f"| {r['z']:g} | {eps_text(r['epsilon'])} | {r['accuracy']:.4f} | "
            f"{r['accuracy_last10_mean']:.4f} | {r['rounds']} | {r['wall_s']:.1f} | "
            f"{acc_ratio} | {wall_ratio} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, help=f"rounds per run (default {DEFAULT_ROUNDS})")
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"smoke test: {QUICK_CLIENTS} clients, {QUICK_ROUNDS} rounds, z in 0 and 1",
    )
    parser.add_argument("--noise", help=f"comma-separated noise multipliers ({DEFAULT_NOISE})")
    parser.add_argument("--model", default="mlp", help="pollinate.models name (mlp)")
    parser.add_argument("--hidden", default="[64]", help="mlp hidden sizes, TOML ([64])")
    parser.add_argument("--clip", type=float, default=0.3, help="L2 clip C (0.3)")
    parser.add_argument("--lr", type=float, default=0.1, help="local SGD learning rate (0.1)")
    parser.add_argument("--epochs", type=int, default=2, help="local epochs (2)")
    parser.add_argument("--partition", default="iid", help="iid (default) or dirichlet")
    parser.add_argument(
        "--backend", default="sequential", help="sequential (default) or process (2 workers)"
    )
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    args.rounds = args.rounds or (QUICK_ROUNDS if args.quick else DEFAULT_ROUNDS)
    noise = args.noise or ("0,1" if args.quick else DEFAULT_NOISE)
    zs = [float(z) for z in noise.split(",") if z.strip()]
    num_clients = QUICK_CLIENTS if args.quick else NUM_CLIENTS

    c.use_shared_data()
    info = c.machine()
    c.say(
        f"Privacy trade-off: Fashion-MNIST, {num_clients} {args.partition.upper()} clients, "
        f"Poisson sampling q = {SAMPLING_RATE} ({SAMPLING_RATE * num_clients:g} clients per round "
        f"expected; the no-DP baseline samples exactly that many), {args.model}, "
        f"{args.epochs} local epochs, batch 32, SGD lr {args.lr}, DP-FedAvg clip C = "
        f"{args.clip} (server-side), δ = {DELTA:g}, PLD accountant, {args.rounds} rounds, "
        f"{args.backend} backend"
    )
    c.say(c.describe_machine(info))
    warm_up(args)
    started = time.perf_counter()
    results = []
    for z in zs:
        r = run_one(args, z, num_clients)
        results.append(r)
        c.say(
            f"  z = {z:g}: ε = {eps_text(r['epsilon'])}, accuracy {r['accuracy']:.4f} "
            f"(last 10 rounds {r['accuracy_last10_mean']:.4f}, best {r['best_accuracy']:.4f}), "
            f"{r['rounds']} rounds, {r['wall_s']:.1f} s wall, {r['cpu_s']:.1f} s cpu, "
            f"clients/round {r['clients_per_round_mean']}, load {r['load_after'][0]:.2f}"
        )
    info["load_after"] = c.load()
    c.say(f"total {time.perf_counter() - started:.0f} s; load after: {info['load_after']}")
    c.say(
        f"noise std on the mean update: z·C/{SAMPLING_RATE * num_clients:g} per coordinate; "
        "ratios are against the no-DP run (z = 0) of this sweep"
    )
    c.say(table(results))
    payload = {
        "workload": "privacy_tradeoff",
        "machine": info,
        "args": vars(args) | {"json": str(args.json) if args.json else None},
        "results": results,
    }
    c.write_json(args.json, payload)
    return payload


if __name__ == "__main__":  # the process backend starts worker processes
    main()
