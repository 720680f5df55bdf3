"""Real-world conditions: simulated time and bytes to a target accuracy on a device mix.

Fashion-MNIST's 60,000 training images split among 1,000 clients by Dirichlet(α = 0.5) label
proportions, an MLP (784-200-10), 50 clients sampled per round (``fraction_train = 0.05``),
2 local epochs of SGD (batch 32, lr 0.05), on the virtual clock (``[environment]``) with
three device tiers, every client offline in a round with probability 0.1:

| tier | share | compute (s per example) | downlink | uplink | latency |
| --- | ---: | ---: | ---: | ---: | ---: |
| fast | 60% | 0.001 | 20 Mbit/s | 10 Mbit/s | 50 ms |
| medium | 30% | 0.002 | 10 Mbit/s | 5 Mbit/s | 100 ms |
| slow | 10% | 0.01 (ten times the fast tier) | 2 Mbit/s | 1 Mbit/s | 300 ms |

Compute is given per example (not measured), so every deadline decision is reproducible.
Variants (``VARIANTS``; one entry each):

- ``fedavg``: synchronous FedAvg, no deadline (the round waits for its slowest client);
- ``fedavg p90``: the deadline at the 90th percentile of the client durations the first
  variant saw (the stragglers beyond it are dropped);
- ``oort p90``: Oort selection (``strategy.selection = "oort"``), same deadline, which is also
  Oort's preferred duration T;
- ``fp16``, ``qsgd8``, ``qsgd4``, ``top1%+ef``: FedAvg without a deadline, updates compressed
  on the uplink (float16; 8-bit and 4-bit QSGD; top-1% sparsification with error feedback);
- ``fedbuff``: asynchronous FedBuff (``strategy.name = "fedbuff"``, Nguyen et al. 2022):
  ``--concurrency`` K clients training at once (default: the synchronous sample,
  ``clients × fraction`` = 50), a server step every ``--buffer-size`` M = 10 results, each
  weighted by ``1/√(1 + staleness)``. Its clients get a per-task timeout, not a round
  deadline: twice the longest client duration the first variant saw, so that the timeout
  only catches a vanished client and the slow tier still counts (down-weighted when stale).
  Its "rounds" are server steps, its "clients/round" the results applied per step (M), and
  ``--max-rounds`` becomes ``ceil(max_rounds × K / M)`` steps: as many client results as
  ``--max-rounds`` synchronous rounds of K clients.

Reported per variant: the round (server step for fedbuff), simulated time and bytes (up and
down) at which the centralized test accuracy (10,000 images, after every round or step) first
reached the target (80%), the final accuracy, and the real wall time of the simulation. Each
run stops at the target or after ``--max-rounds``. Then the virtual clock's own cost: the
same rounds with the environment (every client online, no deadline: the same training work)
and without it, interleaved, and their wall-time ratio.

    python bench/conditions.py                    # the full size (see bench/README.md)
    python bench/conditions.py --fraction 0.02 --hidden 64 --epochs 1   # reduced
    python bench/conditions.py --smoke            # seconds (tests)
"""

from __future__ import annotations

import argparse
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import common as c
import numpy as np

from pollinate.server import Callback

TIERS: list[dict[str, Any]] = [
    {"name": "fast", "share": 0.6, "seconds_per_example": 0.001, "downlink_mbps": 20,
     "uplink_mbps": 10, "latency_ms": 50, "online": 0.9},
    {"name": "medium", "share": 0.3, "seconds_per_example": 0.002, "downlink_mbps": 10,
     "uplink_mbps": 5, "latency_ms": 100, "online": 0.9},
    {"name": "slow", "share": 0.1, "seconds_per_example": 0.01, "downlink_mbps": 2,
     "uplink_mbps": 1, "latency_ms": 300, "online": 0.9},
]  # fmt: skip


@dataclass(frozen=True)
class Variant:
    """One run: its name, ``--set`` overrides, whether the p90 deadline applies, and whether
    it is asynchronous (FedBuff: K and M from the arguments, a per-task timeout, server
    steps)."""

    name: str
    overrides: list[str] = field(default_factory=list)
    p90_deadline: bool = False
    asynchronous: bool = False


VARIANTS: list[Variant] = [
    Variant("fedavg"),  # first: its durations give the p90 deadline and fedbuff's timeout
    Variant("fedavg p90", p90_deadline=True),
    Variant("oort p90", ["strategy.selection='oort'"], p90_deadline=True),
    Variant("fp16", ["compression.uplink='fp16'"]),
    Variant("qsgd8", ["compression.uplink='qsgd'", "compression.bits=8"]),
    Variant("qsgd4", ["compression.uplink='qsgd'", "compression.bits=4"]),
    Variant("top1%+ef", ["compression.uplink='topk'", "compression.topk_fraction=0.01"]),
    Variant("fedbuff", ["strategy.name='fedbuff'", "strategy.staleness='sqrt'"], asynchronous=True),
]


class Reached(Exception):
    """Raised by ``Tracker`` to end a run at the target accuracy."""


class Tracker(Callback):
    """Per round (or FedBuff server step): accuracy, simulated clock and bytes; stops the run
    at the target. Per-client durations come from the synchronous clock's records
    (``environment.clients``); a FedBuff step has none, and its ``async`` block instead."""

    def __init__(self, target: float) -> None:
        self.target = target
        self.rounds: list[dict[str, Any]] = []
        self.durations: list[float] = []
        self.bytes_up = 0
        self.bytes_down = 0

    def on_round_end(self, record: dict[str, Any], arrays: Any) -> None:
        env = record.get("environment", {})
        self.bytes_up += int(env.get("bytes_up", 0))
        self.bytes_down += int(env.get("bytes_down", 0))
        for client in env.get("clients", {}).values():
            train = client.get("train", {})
            if train.get("status") == "ok" and train.get("duration_s") is not None:
                self.durations.append(float(train["duration_s"]))
        accuracy = record.get("centralized", {}).get("accuracy", float("nan"))
        row = {
            "round": record["round"],
            "accuracy": accuracy,
            "clock_s": env.get("clock_s", float("nan")),
            "bytes_up": self.bytes_up,
            "bytes_down": self.bytes_down,
            "clients": record["train"]["clients"],  # FedBuff: the results applied (M)
            "timeouts": record["train"].get("timeouts", 0),
        }
        if "async" in record:
            row["staleness"] = record["async"]["mean_staleness"]
        self.rounds.append(row)
        if accuracy >= self.target:
            raise Reached


def base_overrides(args: argparse.Namespace, seed: int) -> list[str]:
    return [
        f"run.seed={seed}",
        "run.deterministic=true",
        "data.dataset='fashion-mnist'",
        "data.partition='dirichlet'",
        f"data.alpha={args.alpha}",
        f"data.num_clients={args.clients}",
        "model.name='mlp'",
        f"model.hidden=[{args.hidden}]",
        *c.sgd_overrides(args.epochs, args.lr),
        f"strategy.fraction_train={args.fraction}",
        "strategy.min_train_clients=1",
        "simulation.backend='sequential'",
    ]


def environment_overrides(args: argparse.Namespace, online: bool, deadline_s: float) -> list[str]:
    tiers = [{**t, "online": t["online"] if online else 1.0} for t in TIERS]
    text = ", ".join(
        "{" + ", ".join(f"{k} = {v!r}".replace("'", '"') for k, v in t.items()) + "}" for t in tiers
    )
    return [
        f"environment.seed={args.seed}",
        f"environment.tiers=[{text}]",
        f"environment.deadline_s={deadline_s}",
    ]


def simulate_run(cfg: Any, rounds: int, tracker: Tracker | None) -> float:
    """Run ``cfg`` for up to ``rounds`` rounds (less if ``tracker`` stops it); wall seconds."""
    from pollinate.experiment import build_run
    from pollinate.simulation import simulate
    from pollinate.simulation.environment import Environment

    run = build_run(cfg)
    environment = None
    if cfg.environment.tiers:
        environment = Environment.from_config(cfg.environment, run.data.num_clients)
    start = time.perf_counter()
    try:
        simulate(
            run.client_fn(),
            num_clients=run.data.num_clients,
            strategy=run.strategy,
            initial_arrays=run.initial_arrays,
            rounds=rounds,
            backend="sequential",
            seed=cfg.run.seed,
            deterministic=True,
            callbacks=[tracker] if tracker is not None else [],
            environment=environment,
            deadline_s=cfg.environment.deadline_s or None,
        )
    except Reached:
        pass
    return time.perf_counter() - start


def fedbuff_sizes(args: argparse.Namespace) -> tuple[int, int, int]:
    """FedBuff's concurrency K, buffer size M and server steps: K defaults to the synchronous
    sample (``clients × fraction``), M is at most K, and the steps apply as many client
    results as ``--max-rounds`` synchronous rounds of K clients."""
    k = args.concurrency or max(1, round(args.clients * args.fraction))
    m = min(args.buffer_size, k)
    return k, m, math.ceil(args.max_rounds * k / m)


def run_variant(args: argparse.Namespace, variant: Variant, deadline_s: float) -> dict[str, Any]:
    """Run one variant; ``deadline_s``: the round deadline (0: none), or for an asynchronous
    variant each client task's timeout."""
    from pollinate import config

    sets = base_overrides(args, args.seed) + environment_overrides(args, True, deadline_s)
    rounds = args.max_rounds
    if variant.asynchronous:
        k, m, rounds = fedbuff_sizes(args)
        sets += [f"strategy.concurrency={k}", f"strategy.buffer_size={m}"]
    cfg = config.load(None, sets + variant.overrides)
    tracker = Tracker(args.target)
    wall = simulate_run(cfg, rounds, tracker)
    hit = next((r for r in tracker.rounds if r["accuracy"] >= args.target), None)
    last = tracker.rounds[-1]
    return {
        "name": variant.name,
        "deadline_s": deadline_s,
        "reached": hit,
        "last": last,
        "rounds": len(tracker.rounds),
        "asynchronous": variant.asynchronous,
        "timeouts": sum(r["timeouts"] for r in tracker.rounds),
        "mean_staleness": (
            float(np.mean([r["staleness"] for r in tracker.rounds]))
            if variant.asynchronous
            else None
        ),
        "wall_s": wall,
        "durations": tracker.durations,
        "mean_clients": float(np.mean([r["clients"] for r in tracker.rounds])),
    }


def clock_overhead(args: argparse.Namespace) -> tuple[float, float]:
    """Best wall seconds of ``--overhead-rounds`` rounds with and without the environment
    (every client online, no deadline: the same clients train the same way), interleaved."""
    from pollinate import config

    plain = config.load(None, base_overrides(args, args.seed))
    clocked = config.load(
        None, base_overrides(args, args.seed) + environment_overrides(args, False, 0.0)
    )
    with_env, without = [], []
    for _ in range(args.repeats):
        without.append(simulate_run(plain, args.overhead_rounds, None))
        with_env.append(simulate_run(clocked, args.overhead_rounds, None))
    return min(with_env), min(without)


def _mb(n: float) -> str:
    return f"{n / 1e6:.1f}"


def table(results: list[dict[str, Any]], target: float) -> str:
    pct = f"{target:.0%}"
    lines = [
        f"| variant | deadline s | clients/round | rounds to {pct} | simulated time to {pct} "
        f"| MB up to {pct} | MB down to {pct} | final accuracy | rounds run | wall s | "
        "sim time / fedavg |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    base = results[0]["reached"]["clock_s"] if results and results[0]["reached"] else math.nan
    for r in results:
        hit, last = r["reached"], r["last"]
        deadline = "off" if not r["deadline_s"] else f"{r['deadline_s']:.2f}"
        if r["asynchronous"]:
            deadline = f"{deadline} per task"
        if hit is None:  # not reached: what the run spent, as a lower bound
            reach = [
                f"> {r['rounds']}",
                f"> {last['clock_s']:.0f} s",
                f"> {_mb(last['bytes_up'])}",
                f"> {_mb(last['bytes_down'])}",
                f"> {last['clock_s'] / base:.2f}×",
            ]
        else:
            reach = [
                str(hit["round"]),
                f"{hit['clock_s']:.0f} s",
                _mb(hit["bytes_up"]),
                _mb(hit["bytes_down"]),
                f"{hit['clock_s'] / base:.2f}×",
            ]
        lines.append(
            f"| {r['name']} | {deadline} | {r['mean_clients']:.1f} | {reach[0]} | {reach[1]} "
            f"| {reach[2]} | {reach[3]} | {last['accuracy']:.4f} | {r['rounds']} "
            f"| {r['wall_s']:.1f} | {reach[4]} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--fraction", type=float, default=0.05, help="clients sampled a round")
    parser.add_argument("--hidden", type=int, default=200, help="the MLP's hidden units")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--alpha", type=float, default=0.5, help="Dirichlet concentration")
    parser.add_argument("--target", type=float, default=0.8)
    parser.add_argument(
        "--max-rounds", type=int, default=200, help="fedbuff: ceil(this × K / M) server steps"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", default="", help="comma-separated variant names")
    parser.add_argument(
        "--concurrency", type=int, default=0, help="fedbuff's K (0: clients × fraction)"
    )
    parser.add_argument("--buffer-size", type=int, default=10, help="fedbuff's M (at most K)")
    parser.add_argument("--overhead-rounds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=2, help="of the clock-overhead pair")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, seconds (tests)")
    parser.add_argument("--json", type=Path, help="also write every run's figures here")
    args = parser.parse_args(argv)
    if args.smoke:
        args.clients, args.fraction, args.hidden, args.max_rounds = 20, 0.25, 16, 2
        args.overhead_rounds, args.repeats = 1, 1
    c.use_shared_data()
    logging.getLogger("pollinate").setLevel(logging.ERROR)  # offline clients are expected
    info = c.machine()
    c.say(
        f"conditions: {args.clients} clients, Dirichlet α={args.alpha}, MLP 784-{args.hidden}-10, "
        f"fraction {args.fraction}, {args.epochs} epochs, target {args.target:.0%}, "
        f"at most {args.max_rounds} rounds, seed {args.seed}"
    )
    wanted = {n.strip() for n in args.only.split(",") if n.strip()}
    unknown = wanted - {v.name for v in VARIANTS}
    if unknown:
        parser.error(f"unknown variant(s) {sorted(unknown)}; use {[v.name for v in VARIANTS]}")
    results: list[dict[str, Any]] = []
    p90 = longest = math.nan
    for variant in VARIANTS:
        if wanted and variant.name not in wanted and variant is not VARIANTS[0]:
            continue
        deadline = p90 if variant.p90_deadline else 0.0
        if variant.asynchronous:
            deadline = 2 * longest  # a task timeout that only catches a vanished client
            k, m, steps = fedbuff_sizes(args)
            c.say(f"  {variant.name}: K = {k}, M = {m}, at most {steps} server steps")
        result = run_variant(args, variant, deadline)
        if variant is VARIANTS[0]:
            p90 = float(np.percentile(result["durations"], 90))
            longest = max(result["durations"])
            c.say(
                f"client durations without a deadline: 90th percentile {p90:.3f} s, "
                f"longest {longest:.3f} s"
            )
        results.append(result)
        reached = result["reached"]
        c.say(
            f"  {variant.name}: {result['rounds']} rounds, "
            + (
                f"{args.target:.0%} in round {reached['round']} at {reached['clock_s']:.0f} "
                "simulated s"
                if reached
                else f"{args.target:.0%} not reached"
            )
            + f", wall {result['wall_s']:.1f} s"
            + (
                f", mean staleness {result['mean_staleness']:.2f}, "
                f"{result['timeouts']} task timeouts"
                if variant.asynchronous
                else ""
            )
        )
    with_env, without = clock_overhead(args)
    c.say("")
    c.say(table(results, args.target))
    c.say("")
    c.say(
        f"virtual clock cost: {args.overhead_rounds} rounds with the environment "
        f"{with_env:.2f} s, without {without:.2f} s: ratio {with_env / without:.3f}× "
        f"(best of {args.repeats}, interleaved)"
    )
    c.say(c.describe_machine(info))
    payload = {
        "args": vars(args) | {"json": None},
        "machine": info,
        "results": [{k: v for k, v in r.items() if k != "durations"} for r in results],
        "overhead": {"with": with_env, "without": without},
    }
    c.write_json(args.json, payload)
    return payload


if __name__ == "__main__":
    main()
