"""W3: a large population, a small sample.

Fashion-MNIST's 60,000 training examples split IID among 10,000 clients (6 examples each),
100 clients sampled per round, 3 rounds, MLP 784-64-10 (as W2), 1 local epoch, batch 32,
SGD lr 0.01. Every client task is one tiny batch, so this measures pollinate's per-task cost.

Targets:
- time: the ``sequential`` backend within 2x of the plain PyTorch loop;
- memory: peak RSS of the 10,000-client run no higher than the same run with 100 clients
  (the same data, 600 examples each, all 100 sampled) plus 20%. Each memory variant runs in a
  fresh Python process that loads the data, runs, and reports its own peak RSS (VmHWM;
  getrusage is printed too, see bench/README.md).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import common as c

DEFAULT_ROUNDS = 3
DEFAULT_REPEATS = 5
POPULATION = 10_000
SAMPLED = 100
TARGET_TIME = 2.0
TARGET_MEMORY = 1.2


def spec(rounds: int, clients: int) -> c.Spec:
    sampled = SAMPLED if clients > SAMPLED else 0
    return c.Spec("mlp", hidden=(64,), rounds=rounds, sampled=sampled, lr=0.01, seed=0)


def child(args: list[str]) -> None:
    """One memory probe, in a fresh process: ``--child plain|pollinate CLIENTS ROUNDS BACKEND``."""
    kind, clients, rounds, backend = args[0], int(args[1]), int(args[2]), args[3]
    threads = int(args[4]) if len(args) > 4 else 0
    c.apply_threads(threads or None)
    data = c.federate(c.fashion_mnist(), num_clients=clients, seed=0)
    load_peak = c.status_mib("VmHWM")  # peak while loading and splitting the data
    before = c.status_mib("VmRSS")
    reset = c.reset_peak_rss()
    with c.TreeRssSampler() as tree:
        if kind == "plain":
            res = c.plain_fedavg(spec(rounds, clients), data)
        else:
            res = c.pollinate_fedavg(spec(rounds, clients), data, backend, workers=2)
    run_peak = c.status_mib("VmHWM") if reset else None
    peaks = [p for p in (load_peak, run_peak) if p is not None]
    out = {
        "kind": kind,
        "clients": clients,
        "backend": backend,
        "seconds": res.seconds,
        "accuracy": res.accuracy,
        "max_rss_mib": max(peaks) if peaks else c.getrusage_max_rss_mib(),  # whole life
        "rss_before_run_mib": before,
        "peak_during_run_mib": run_peak,  # from the start of the run to its end
        # this process and its workers, sampled every 20 ms
        "tree_peak_during_run_mib": None if tree.peak is None else round(tree.peak, 1),
        "getrusage_max_rss_mib": c.getrusage_max_rss_mib(),
    }
    print(json.dumps(out))


def main(argv: list[str] | None = None) -> dict:
    parser = c.base_parser(__doc__)
    parser.add_argument(
        "--backends",
        default="sequential",
        help="comma-separated pollinate backends to time (sequential,process)",
    )
    parser.add_argument("--no-memory", action="store_true", help="skip the memory probes")
    parser.add_argument(
        "--memory-backend", default="sequential", help="backend of the memory probes"
    )
    args = parser.parse_args(argv)
    threads = c.apply_threads(args.threads)
    tl = c.threads_label(threads)
    rounds = args.rounds or DEFAULT_ROUNDS
    repeats = args.repeats or DEFAULT_REPEATS
    info = c.machine()
    c.say(
        f"W3 population: Fashion-MNIST, {POPULATION} IID clients x 6, {SAMPLED} sampled per "
        f"round, mlp 784-64-10, {rounds} rounds"
    )
    c.say(c.describe_machine(info))

    data = c.federate(c.fashion_mnist(), num_clients=POPULATION, seed=0)
    w = spec(rounds, POPULATION)
    plain = c.Variant(f"plain loop ({tl})", lambda: c.plain_fedavg(w, data))
    variants = []
    for backend in [b.strip() for b in args.backends.split(",") if b.strip()]:
        sequential = backend == "sequential"
        variants.append(
            c.Variant(
                f"pollinate {backend} " + (f"({tl})" if sequential else "(2 workers x 1 thread)"),
                lambda b=backend: c.pollinate_fedavg(w, data, b, workers=2),
                target=TARGET_TIME if sequential else None,
                steady_note=not sequential,
            )
        )
    c.warm_up(w, data)
    workload = f"W3 {POPULATION} clients, {SAMPLED}/round, mlp, {rounds} rounds"
    rows, results = c.compare(workload, plain, variants, repeats)

    memory: dict[str, dict] = {}
    if not args.no_memory:
        script = Path(__file__).resolve()
        extra = [str(args.threads or 0)]
        probes = [
            ("pollinate", POPULATION, args.memory_backend),
            ("pollinate", SAMPLED, args.memory_backend),
            ("plain", POPULATION, "-"),
        ]
        for kind, clients, backend in probes:
            out = c.run_child(script, ["--child", kind, str(clients), str(rounds), backend, *extra])
            memory[f"{kind} {clients} clients"] = out
            peak = out["peak_during_run_mib"]
            c.say(
                f"  memory: {kind:<9s} {clients:>6d} clients ({backend}): max RSS "
                f"{out['max_rss_mib']:7.1f} MiB; before the run {out['rss_before_run_mib']:7.1f}"
                f" MiB, peak during the run {peak if peak is None else round(peak, 1)} MiB "
                f"(with workers {out['tree_peak_during_run_mib']} MiB); "
                f"accuracy {out['accuracy']:.4f}"
            )
        big = memory[f"pollinate {POPULATION} clients"]
        small = memory[f"pollinate {SAMPLED} clients"]
        ratio = big["max_rss_mib"] / small["max_rss_mib"]
        met = ratio <= TARGET_MEMORY
        c.say(
            f"  memory: {POPULATION} clients / {SAMPLED} clients max RSS = {ratio:.3f} "
            f"(target ≤ {TARGET_MEMORY}: {'met' if met else 'NOT met'})"
        )
        if all(m["peak_during_run_mib"] and m["rss_before_run_mib"] for m in (big, small)):
            growth = [m["peak_during_run_mib"] - m["rss_before_run_mib"] for m in (big, small)]
            c.say(
                f"  memory: growth during the run (peak - before): {growth[0]:.1f} MiB with "
                f"{POPULATION} clients, {growth[1]:.1f} MiB with {SAMPLED}"
            )
            info["memory_growth_mib"] = [round(g, 1) for g in growth]
        info["memory_big_mib"] = round(big["max_rss_mib"], 1)
        info["memory_small_mib"] = round(small["max_rss_mib"], 1)
        info["memory_ratio"] = round(ratio, 3)
        info["memory_met"] = met
    return c.finish("W3", info, rows, results, args.json, memory=memory)


if __name__ == "__main__":  # the process backend starts worker processes
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2:])
    else:
        main()
