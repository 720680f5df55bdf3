"""Run the benchmarks (W1 seed blog, W2 many clients, W3 population) and print one table.

    python bench/run_all.py                  # all three, default sizes (4-8 min on 2 cores)
    python bench/run_all.py --only w2,w3     # some of them
    python bench/run_all.py --only fw        # Keras W1/W2 and JAX W2 (bench/frameworks.py)
    python bench/run_all.py --quick          # shorter runs, fewer repeats (a smoke test)
    python bench/run_all.py --threads 1      # plain loop and sequential backend on 1 thread

Every figure is measured in this run, pollinate against a plain PyTorch loop doing the same
arithmetic (see bench/README.md).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import common as c
import frameworks
import w1_blog
import w2_many_clients
import w3_population

WORKLOADS = {"w1": w1_blog, "w2": w2_many_clients, "w3": w3_population, "fw": frameworks}
QUICK = {  # --quick: rounds and repeats per workload
    "w1": ["--rounds", "1", "--repeats", "1"],
    "w2": ["--rounds", "2", "--repeats", "2"],
    "w3": ["--rounds", "2", "--repeats", "3"],
    "fw": ["--rounds", "1", "--repeats", "1"],
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--only", default="w1,w2,w3", help="comma-separated: w1,w2,w3,fw (fw: not by default)"
    )
    parser.add_argument("--quick", action="store_true", help="fewer rounds and repeats")
    parser.add_argument("--repeats", type=int, help="interleaved repetitions (every workload)")
    parser.add_argument("--threads", type=int, help="torch threads of the plain loop/sequential")
    parser.add_argument("--json", type=Path, help="write every workload's figures here")
    args = parser.parse_args(argv)
    names = [n.strip().lower() for n in args.only.split(",") if n.strip()]
    unknown = [n for n in names if n not in WORKLOADS]
    if unknown:
        parser.error(f"unknown workload(s) {', '.join(unknown)}; use {', '.join(WORKLOADS)}")

    started = time.perf_counter()
    payloads = []
    for name in names:
        sub = list(QUICK[name]) if args.quick else []
        if args.repeats:
            sub += ["--repeats", str(args.repeats)]
        if args.threads:
            sub += ["--threads", str(args.threads)]
        c.say(f"\n=== {name} {' '.join(sub)}")
        payloads.append(WORKLOADS[name].main(sub))

    c.say(f"\n=== all ({time.perf_counter() - started:.0f} s)")
    info = c.machine()
    c.say(c.describe_machine(info))
    c.say(
        "times: best of the interleaved repeats, wall seconds; ratio = pollinate / plain; "
        "median ratio and CPU-time ratio beside it"
    )
    c.say(c.TABLE_HEADER)
    for payload in payloads:
        for row in c.table_lines(payload["rows"]):
            c.say(row)
    for payload in payloads:
        memory = payload.get("memory") or {}
        if memory:
            m = payload["machine"]
            c.say(
                f"W3 memory: max RSS {m['memory_big_mib']:.0f} MiB with "
                f"{w3_population.POPULATION} clients vs {m['memory_small_mib']:.0f} MiB with "
                f"{w3_population.SAMPLED} clients: {m['memory_ratio']:.3f}× "
                f"(target ≤ {w3_population.TARGET_MEMORY}×: "
                f"{'met' if m['memory_met'] else 'NOT met'})"
            )
    if args.json is not None:
        args.json.write_text(json.dumps({"machine": info, "workloads": payloads}, indent=2))


if __name__ == "__main__":  # the process backend starts worker processes
    main()
