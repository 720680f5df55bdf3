"""The Keras and JAX adapters against plain loops of the same framework, in one run.

    keras-w1  W1 (the seed blog): Fashion-MNIST, 5 IID clients x 12,000, the blog's CNN,
              1 epoch, batch 32, SGD lr 0.01, 1 round (Keras, tensorflow backend)
    keras-w2  W2 (many small clients): 100 IID clients x 600, MLP 784-64-10, 1 epoch,
              batch 32, SGD lr 0.01, 5 rounds (Keras, tensorflow backend)
    jax-w2    W2 with JAX/Flax and optax

The plain loops do FedAvg with no framework of ours, the way a user of each library would
write it, and the same arithmetic as pollinate's ``sequential`` backend:

    for each round, for each client (in client-id order):
        load the global weights into one reused model, reset the optimizer,
        train 1 epoch on the client's examples in the order default_rng(task seed).permutation
        gives (Keras: ``model.fit(shuffle=False)`` with one-hot labels; JAX: one jit-compiled
        optax step per batch), read the weights back into an example-weighted float64 sum
    divide by the example count; centralized evaluation on the test set (batches of 1024)

The initial weights are the adapter's (``initial_arrays`` under the seed), so both runs start
from the same model; the largest difference between the two final models is printed. The
plain loops hold the data in their framework's layout (NHWC) from the start; pollinate
receives it as the data sets hold it (NCHW) and converts each client's part (its cost is
counted). Target: W2 with the sequential backend within 1.1x of the plain loop; W1 for
information.

    python bench/frameworks.py                          # all three
    python bench/frameworks.py --only keras-w2,jax-w2 --repeats 5
    python bench/frameworks.py --smoke                  # tiny sizes: that it runs
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

os.environ.setdefault("KERAS_BACKEND", "tensorflow")  # noqa: E402 - read when keras loads

import common as c
import numpy as np

TARGET_W2 = 1.1
WORKLOADS = {
    "keras-w1": ("keras", c.Spec("cnn", rounds=1, epochs=1, batch_size=32, lr=0.01, seed=0), 5),
    "keras-w2": (
        "keras",
        c.Spec("mlp", hidden=(64,), rounds=5, epochs=1, batch_size=32, lr=0.01, seed=0),
        100,
    ),
    "jax-w2": (
        "jax",
        c.Spec("mlp", hidden=(64,), rounds=5, epochs=1, batch_size=32, lr=0.01, seed=0),
        100,
    ),
}
DEFAULT_REPEATS = {"keras-w1": 2, "keras-w2": 3, "jax-w2": 5}
SMOKE_EXAMPLES = 2000


# --- pollinate ----------------------------------------------------------------------------------


def model_fn(framework: str, spec: c.Spec, data: Any) -> Callable[[], Any]:
    """The adapter's picklable builder of the workload's model."""
    from pollinate.config import ModelSection
    from pollinate.frameworks.base import get_framework

    section = ModelSection(name=spec.model, hidden=list(spec.hidden), framework=framework)
    fw = get_framework(framework)
    return fw.model_fn(section, tuple(data.x_train.shape[1:]), int(data.num_classes))


def initial(framework: str, spec: c.Spec, data: Any) -> list[np.ndarray]:
    from pollinate.frameworks.base import get_framework

    return get_framework(framework).initial_arrays(model_fn(framework, spec, data), spec.seed)


def pollinate_fedavg(framework: str, spec: c.Spec, data: Any) -> c.Result:
    """The workload through ``pollinate.simulate`` with the framework's adapter."""
    from pollinate.frameworks.base import get_framework

    fw = get_framework(framework)

    def prepare() -> dict[str, Any]:
        build = model_fn(framework, spec, data)
        return {
            "client_fn": fw.client_fn(build, data, "cpu"),
            "num_clients": data.num_clients,
            "strategy": c.bench_fedavg(spec, fw.evaluator(build, data.x_test, data.y_test, "cpu")),
            "initial_arrays": fw.initial_arrays(build, spec.seed),
        }

    return c.simulate_timed(spec, prepare, backend="sequential")


# --- plain loops ----------------------------------------------------------------------------


def _nhwc(data: Any) -> tuple[np.ndarray, np.ndarray]:
    """The training and test images in channels-last layout (a plain loop's own data)."""
    return (
        np.ascontiguousarray(data.x_train.transpose(0, 2, 3, 1)),
        np.ascontiguousarray(data.x_test.transpose(0, 2, 3, 1)),
    )


def _sampled_clients(
    spec: c.Spec, data: Any, round_number: int, x_all: np.ndarray, y_all: np.ndarray
) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """Each client of round ``round_number`` (the sampler pollinate uses), with its rows."""
    order, offsets = data.partition.order, data.partition.offsets
    for cid in c.sample(spec, data.num_clients, round_number):
        idx = order[offsets[cid] : offsets[cid + 1]]
        yield cid, x_all[idx], y_all[idx]


class _WeightedMean:
    """FedAvg's mean of the clients' weights, weighted by example count, summed in float64."""

    def __init__(self, like: list[np.ndarray]) -> None:
        self.like = like
        self.sums = [np.zeros(w.shape, np.float64) for w in like]
        self.total = 0

    def add(self, n: int, weights: Iterable[Any]) -> None:
        for s, w in zip(self.sums, weights):
            s += n * np.asarray(w, np.float64)
        self.total += n

    def mean(self) -> list[np.ndarray]:
        return [(s / self.total).astype(w.dtype) for s, w in zip(self.sums, self.like)]


def plain_keras(spec: c.Spec, data: Any, start_arrays: list[np.ndarray], nhwc: Any) -> c.Result:
    """FedAvg as a plain Keras loop: one compiled model, ``fit`` per client."""
    import keras

    from pollinate.frameworks.keras import build_model

    x_all, x_test = nhwc
    y_all = data.y_train
    y_test = keras.utils.to_categorical(data.y_test, data.num_classes)

    start, cpu = time.perf_counter(), c.cpu_seconds()
    model = build_model(spec.model, x_all.shape[1:], int(data.num_classes), spec.hidden)
    optimizer = keras.optimizers.SGD(learning_rate=spec.lr)
    model.compile(optimizer=optimizer, loss="categorical_crossentropy", metrics=["accuracy"])
    global_weights = [np.array(w) for w in start_arrays]
    accuracy = loss = float("nan")
    for rnd in range(1, spec.rounds + 1):
        mean = _WeightedMean(global_weights)
        for cid, x, y in _sampled_clients(spec, data, rnd, x_all, y_all):
            n = len(y)
            model.set_weights(global_weights)
            optimizer.iterations.assign(0)  # plain SGD's only state
            perm = np.random.default_rng(c.task_seed(spec.seed, rnd, cid)).permutation(n)
            for _ in range(spec.epochs):
                model.fit(
                    x[perm],
                    keras.utils.to_categorical(y[perm], data.num_classes),
                    batch_size=spec.batch_size,
                    epochs=1,
                    shuffle=False,
                    verbose=0,
                )
            mean.add(n, model.get_weights())
        global_weights = mean.mean()
        model.set_weights(global_weights)
        loss, accuracy = model.evaluate(x_test, y_test, batch_size=1024, verbose=0)
    seconds, cpu = time.perf_counter() - start, c.cpu_seconds() - cpu
    return c.Result(seconds, cpu, float(accuracy), float(loss), global_weights)


def plain_jax(spec: c.Spec, data: Any, start_arrays: list[np.ndarray], nhwc: Any) -> c.Result:
    """FedAvg as a plain JAX loop: one jit-compiled optax step per batch."""
    import jax
    import jax.numpy as jnp
    import optax

    from pollinate.frameworks.jax import build_model

    x_all, x_test = nhwc
    y_all, y_test = data.y_train.astype(np.int32), data.y_test.astype(np.int32)

    start, cpu = time.perf_counter(), c.cpu_seconds()
    module = build_model(spec.model, x_all.shape[1:], int(data.num_classes), spec.hidden).module
    template = module.init(jax.random.PRNGKey(0), jnp.zeros((1, *x_all.shape[1:])))
    treedef = jax.tree_util.tree_structure(template)
    tx = optax.sgd(spec.lr)

    def loss_fn(params: Any, x: Any, y: Any) -> Any:
        logits = module.apply({"params": params}, x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    @jax.jit
    def step(params: Any, opt_state: Any, x: Any, y: Any) -> Any:
        grads = jax.grad(loss_fn)(params, x, y)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    @jax.jit
    def evaluate(params: Any, x: Any, y: Any) -> Any:
        logits = module.apply({"params": params}, x)
        losses = optax.softmax_cross_entropy_with_integer_labels(logits, y)
        return losses.sum(), (logits.argmax(-1) == y).sum()

    global_weights = [np.array(w) for w in start_arrays]
    accuracy = loss = float("nan")
    for rnd in range(1, spec.rounds + 1):
        mean = _WeightedMean(global_weights)
        for cid, x, y in _sampled_clients(spec, data, rnd, x_all, y_all):
            n = len(y)
            params = jax.tree_util.tree_unflatten(treedef, global_weights)["params"]
            opt_state = tx.init(params)
            rng = np.random.default_rng(c.task_seed(spec.seed, rnd, cid))
            for _ in range(spec.epochs):
                perm = rng.permutation(n)
                for s in range(0, n, spec.batch_size):
                    b = perm[s : s + spec.batch_size]
                    params, opt_state = step(params, opt_state, x[b], y[b])
            mean.add(n, jax.tree_util.tree_leaves({"params": params}))
        global_weights = mean.mean()
        params = jax.tree_util.tree_unflatten(treedef, global_weights)["params"]
        loss_sum = correct = 0.0
        for s in range(0, len(y_test), 1024):
            batch_loss, batch_correct = evaluate(params, x_test[s : s + 1024], y_test[s : s + 1024])
            loss_sum += float(batch_loss)
            correct += float(batch_correct)
        loss, accuracy = loss_sum / len(y_test), correct / len(y_test)
    seconds, cpu = time.perf_counter() - start, c.cpu_seconds() - cpu
    return c.Result(seconds, cpu, accuracy, loss, global_weights)


PLAIN = {"keras": plain_keras, "jax": plain_jax}


# --- the workloads --------------------------------------------------------------------------


def versions(framework: str) -> str:
    if framework == "keras":
        import keras
        import tensorflow as tf

        return f"keras {keras.__version__} ({keras.backend.backend()}), tensorflow {tf.__version__}"
    import flax
    import jax
    import optax

    return f"jax {jax.__version__}, flax {flax.__version__}, optax {optax.__version__}"


def subset(data_set: Any, n: int) -> Any:
    """The first ``n`` training and test examples of ``data_set``."""
    import dataclasses

    return dataclasses.replace(
        data_set,
        x_train=data_set.x_train[:n],
        y_train=data_set.y_train[:n],
        x_test=data_set.x_test[:n],
        y_test=data_set.y_test[:n],
    )


def run_workload(name: str, data_set: Any, repeats: int, rounds: int | None) -> list[c.Row]:
    framework, spec, num_clients = WORKLOADS[name]
    if rounds:
        spec = c.Spec(**{**spec.__dict__, "rounds": rounds})
    data = c.federate(data_set, num_clients=num_clients, seed=0)
    c.say(
        f"\n=== {name}: {num_clients} clients, {spec.model}, {spec.epochs} epoch, "
        f"{spec.rounds} round(s); {versions(framework)}"
    )
    start_arrays = initial(framework, spec, data)
    nhwc = _nhwc(data)
    plain_run = PLAIN[framework]
    plain = c.Variant(f"plain {framework} loop", lambda: plain_run(spec, data, start_arrays, nhwc))
    target = TARGET_W2 if name.endswith("w2") else None
    ours = c.Variant(
        "pollinate sequential", lambda: pollinate_fedavg(framework, spec, data), target=target
    )
    # warm up both (library imports, first-time set-up) outside the timings, on little data
    one = c.Spec(**{**spec.__dict__, "rounds": 1})
    small = c.federate(subset(data_set, 500), num_clients=2, seed=0)
    plain_run(one, small, start_arrays, _nhwc(small))
    pollinate_fedavg(framework, one, small)
    label = f"{name} ({num_clients} clients, {spec.model}, {spec.rounds} round(s))"
    rows, _ = c.compare(label, plain, [ours], repeats)
    return rows


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = c.base_parser(__doc__)
    parser.add_argument("--only", default=",".join(WORKLOADS), help="comma-separated workloads")
    parser.add_argument(
        "--smoke",
        action="store_true",
        help=f"a smoke run: the first {SMOKE_EXAMPLES} examples, 1 round, 1 repeat",
    )
    args = parser.parse_args(argv)
    names = [n.strip().lower() for n in args.only.split(",") if n.strip()]
    unknown = [n for n in names if n not in WORKLOADS]
    if unknown:
        parser.error(f"unknown workload(s) {', '.join(unknown)}; use {', '.join(WORKLOADS)}")
    info = c.machine()
    c.say(c.describe_machine(info))
    data_set = c.fashion_mnist()
    if args.smoke:
        data_set = subset(data_set, SMOKE_EXAMPLES)
        args.rounds, args.repeats = 1, 1
    rows: list[c.Row] = []
    for name in names:
        repeats = args.repeats or DEFAULT_REPEATS[name]
        rows += run_workload(name, data_set, repeats, args.rounds)
    return c.finish("frameworks", info, rows, {}, args.json)


if __name__ == "__main__":
    main()
