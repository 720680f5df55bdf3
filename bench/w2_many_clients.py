"""W2: many small clients.

Fashion-MNIST's 60,000 training examples split IID among 100 clients (600 each), MLP
784-64-10, 1 local epoch, batch 32, SGD lr 0.01, all clients every round, 5 rounds.
Targets: ``sequential`` within 1.3x of the plain PyTorch loop; ``process`` with 2 workers
(1 thread each) faster than the plain loop, which runs in one process with torch's default
thread settings. pollinate's times include starting and stopping its backend.
"""

from __future__ import annotations

import common as c

DEFAULT_ROUNDS = 5
DEFAULT_REPEATS = 3
TARGET_SEQUENTIAL = 1.3
TARGET_PROCESS = 1.0  # strictly faster


def main(argv: list[str] | None = None) -> dict:
    parser = c.base_parser(__doc__)
    args = parser.parse_args(argv)
    threads = c.apply_threads(args.threads)
    tl = c.threads_label(threads)
    rounds = args.rounds or DEFAULT_ROUNDS
    repeats = args.repeats or DEFAULT_REPEATS
    info = c.machine()
    c.say(f"W2 many clients: Fashion-MNIST, 100 IID clients x 600, mlp 784-64-10, {rounds} rounds")
    c.say(c.describe_machine(info))

    data = c.federate(c.fashion_mnist(), num_clients=100, seed=0)
    spec = c.Spec("mlp", hidden=(64,), rounds=rounds, epochs=1, batch_size=32, lr=0.01, seed=0)
    plain = c.Variant(f"plain loop ({tl})", lambda: c.plain_fedavg(spec, data))
    variants = [
        c.Variant(
            f"pollinate sequential ({tl})",
            lambda: c.pollinate_fedavg(spec, data, "sequential"),
            target=TARGET_SEQUENTIAL,
        ),
        c.Variant(
            "pollinate process (2 workers x 1 thread)",
            lambda: c.pollinate_fedavg(spec, data, "process", workers=2),
            target=TARGET_PROCESS,
            strict=True,
            steady_note=True,
        ),
    ]
    c.warm_up(spec, data)
    rows, results = c.compare(f"W2 100 clients, mlp, {rounds} rounds", plain, variants, repeats)
    return c.finish("W2", info, rows, results, args.json)


if __name__ == "__main__":  # the process backend starts worker processes
    main()
