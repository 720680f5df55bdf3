"""W1: the seed blog experiment with 1 local epoch.

Fashion-MNIST, 5 IID clients (12,000 examples each), the seed CNN, SGD lr 0.01, batch 32,
all clients every round. The blog runs 7 rounds; one round of this CNN over 60,000 examples
takes about 20-60 s on two cores, so the default here is 1 round (``--rounds 7`` for the full
experiment). Target: the ``sequential`` backend within 1.05x of the plain PyTorch loop.
"""

from __future__ import annotations

import common as c

DEFAULT_ROUNDS = 1
DEFAULT_REPEATS = 2
TARGET = 1.05


def main(argv: list[str] | None = None) -> dict:
    parser = c.base_parser(__doc__)
    parser.add_argument(
        "--process", action="store_true", help="also time the process backend (for information)"
    )
    parser.add_argument(
        "--default-threads",
        action="store_true",
        help="also time the sequential backend with its default threads_per_worker=1",
    )
    parser.add_argument(
        "--torch-indexing",
        action="store_true",
        help="also time the plain loop gathering client data with torch indexing (NCHW)",
    )
    args = parser.parse_args(argv)
    threads = c.apply_threads(args.threads)
    tl = c.threads_label(threads)
    rounds = args.rounds or DEFAULT_ROUNDS
    repeats = args.repeats or DEFAULT_REPEATS
    info = c.machine()
    c.say(f"W1 seed blog: Fashion-MNIST, 5 IID clients, cnn, 1 epoch, {rounds} round(s)")
    c.say(c.describe_machine(info))

    data = c.federate(c.fashion_mnist(), num_clients=5, seed=0)
    spec = c.Spec("cnn", rounds=rounds, epochs=1, batch_size=32, lr=0.01, seed=0)
    plain = c.Variant(f"plain loop ({tl})", lambda: c.plain_fedavg(spec, data))
    variants = [
        c.Variant(
            f"pollinate sequential ({tl})",
            lambda: c.pollinate_fedavg(spec, data, "sequential"),
            target=TARGET,
        )
    ]
    if args.torch_indexing:
        variants.append(
            c.Variant(
                f"plain loop, torch indexing, NCHW ({tl})",
                lambda: c.plain_fedavg(spec, data, torch_indexing=True),
            )
        )
    if args.default_threads:
        variants.append(
            c.Variant(
                "pollinate sequential (threads_per_worker=1, default)",
                lambda: c.pollinate_fedavg(spec, data, "sequential", threads_per_worker=1),
            )
        )
    if args.process:
        variants.append(
            c.Variant(
                "pollinate process (2 workers x 1 thread)",
                lambda: c.pollinate_fedavg(spec, data, "process", workers=2),
                steady_note=True,
            )
        )
    c.warm_up(spec, data)
    workload = f"W1 blog CNN, 5 clients, {rounds} round(s)"
    rows, results = c.compare(workload, plain, variants, repeats)
    return c.finish("W1", info, rows, results, args.json)


if __name__ == "__main__":  # the process backend starts worker processes
    main()
