"""Shared pieces of the benchmarks: data, the plain PyTorch FedAvg loop, the pollinate run,
alternating timers, fresh-process memory probes and the machine/load report.

Every workload compares, in one run, pollinate's ``simulate()`` against a plain PyTorch loop
doing the same arithmetic with no framework:

    for each round:
        for each sampled client (in client-id order):
            load the global weights into one reused model, build the optimizer (SGD),
            train local epochs (randperm + tensor indexing, fixed batch size),
            read back the state_dict and fold it into an example-weighted running sum (float64)
        divide by the total example count -> next global model
        centralized evaluation on the test set (batches of 1024)

pollinate is configured to do exactly that work: IID partition with no client test split,
no federated evaluation (``fraction_evaluate=0``), no local evaluation, the same centralized
evaluation, and the same seeds: initial weights from ``torch.manual_seed(seed)``, clients
sampled by ``default_rng([seed, round, 0])`` and each client's shuffling seeded with the same
per-(seed, round, client) seed. Both final accuracies are printed, together with the largest
difference between the two final models, so a reader can see the same arithmetic was done.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


# --- data -----------------------------------------------------------------------------------


def use_shared_data() -> None:
    """Point POLLINATE_DATA at ../shared/data (Fashion-MNIST as npz) unless it is set."""
    if not os.environ.get("POLLINATE_DATA") and (SHARED_DATA / "fashion-mnist.npz").is_file():
        os.environ["POLLINATE_DATA"] = str(SHARED_DATA)


def fashion_mnist() -> Any:
    """Fashion-MNIST as a pollinate ``Dataset`` (60,000 train, 10,000 test, float32)."""
    from pollinate.data import load_dataset

    use_shared_data()
    return load_dataset("fashion-mnist")


def federate(dataset: Any, num_clients: int, seed: int) -> Any:
    """IID split into ``num_clients`` clients, no client test part (no federated evaluation)."""
    from pollinate.data import FederatedDataset, make_partitioner

    return FederatedDataset.build(
        dataset, make_partitioner("iid"), num_clients, test_fraction=0.0, seed=seed
    )


# --- the workload -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Spec:
    """One FedAvg workload: model, sampling and local training."""

    model: str  # logreg | mlp | cnn (pollinate.models)
    hidden: tuple[int, ...] = (64,)
    rounds: int = 1
    sampled: int = 0  # clients per round; 0: all
    epochs: int = 1
    batch_size: int = 32
    lr: float = 0.01
    seed: int = 0


@dataclass
class Result:
    """One timed run: wall seconds, final centralized accuracy/loss, final model."""

    seconds: float
    cpu_seconds: float  # this process and its finished children (process-backend workers)
    accuracy: float
    loss: float
    arrays: list[np.ndarray]
    steady_seconds: float | None = None  # pollinate: rounds only (after backend start-up)


def cpu_seconds() -> float:
    """CPU time of this process plus its reaped children (user + system)."""
    me = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def model_fn(spec: Spec, data: Any) -> Callable[[], Any]:
    """A picklable zero-argument builder of the workload's model (both sides use it)."""
    from pollinate.models import model_fn as make

    return make(spec.model, tuple(data.x_train.shape[1:]), data.num_classes, spec.hidden)


def sample(spec: Spec, num_clients: int, round_number: int) -> list[int]:
    """The clients of one round: all, or ``spec.sampled`` uniformly without replacement.

    Seeded as FedAvg seeds its sampling (``default_rng([seed, round, 0])``), so the plain loop
    trains exactly the clients pollinate trains.
    """
    if spec.sampled <= 0 or spec.sampled >= num_clients:
        return list(range(num_clients))
    rng = np.random.default_rng([spec.seed, round_number, 0])
    return [int(i) for i in np.sort(rng.choice(num_clients, size=spec.sampled, replace=False))]


def task_seed(seed: int, round_number: int, client_id: int) -> int:
    """The per-task shuffling seed (the same derivation as ``pollinate.client.task_seed``)."""
    state = np.random.SeedSequence([seed, round_number, client_id]).generate_state(
        1, dtype=np.uint64
    )
    return int(state[0] >> np.uint64(1))


def warm_up(spec: Spec, data: Any) -> None:
    """Pay this process's one-time costs before timing anything.

    The first ``torch.optim`` optimizer built in a process imports ``torch._dynamo`` (1-2 s
    on two cores); the plain loop uses ``torch.optim``, so without a warm-up that lands on
    whichever variant happens to run first. pollinate's clients train with their own
    bit-identical SGD/Adam (``pollinate.frameworks.torch_optim``), which never import it, so
    process-backend workers (fresh processes in every run) do not pay it either.
    """
    import torch
    import torch.nn.functional as F

    import pollinate.frameworks.torch  # noqa: F401  (import pollinate's torch adapter too)

    model = model_fn(spec, data)()
    optimizer = torch.optim.SGD(model.parameters(), lr=spec.lr)
    x = torch.from_numpy(data.x_train[: spec.batch_size])
    y = torch.from_numpy(data.y_train[: spec.batch_size])
    optimizer.zero_grad()
    F.cross_entropy(model(x), y).backward()
    optimizer.step()


# --- the plain PyTorch loop -----------------------------------------------------------------


def plain_fedavg(spec: Spec, data: Any, torch_indexing: bool = False) -> Result:
    """FedAvg as a plain PyTorch loop: no framework, one model, torch's current threads.

    A client's examples are gathered from the global NumPy arrays with NumPy indexing, as
    pollinate's ``FederatedDataset`` gathers them. This matters for the CNN: the data set's
    1-channel images are ``x[:, None]`` views, and NumPy gives the gathered copy's channel
    axis stride 1, so torch sees a tensor that is also channels_last-contiguous and its
    convolutions take the channels_last path (about 20% faster on the benchmark machine, and
    rounded differently). ``torch_indexing=True`` gathers with torch instead (canonical NCHW
    strides), to show that difference.
    """
    import torch
    import torch.nn.functional as F

    x_all, y_all = data.x_train, data.y_train
    if torch_indexing:
        x_all, y_all = torch.from_numpy(x_all), torch.from_numpy(y_all)
    x_test = torch.from_numpy(data.x_test)
    y_test = torch.from_numpy(data.y_test)
    order = data.partition.order  # client i holds order[offsets[i]:offsets[i + 1]]
    if torch_indexing:
        order = torch.from_numpy(order.copy())
    offsets = data.partition.offsets
    build = model_fn(spec, data)

    start, cpu = time.perf_counter(), cpu_seconds()
    torch.manual_seed(spec.seed)
    model = build()
    global_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    accuracy = loss = float("nan")
    for rnd in range(1, spec.rounds + 1):
        sums = {k: torch.zeros(v.shape, dtype=torch.float64) for k, v in global_state.items()}
        total = 0
        for cid in sample(spec, data.num_clients, rnd):
            idx = order[offsets[cid] : offsets[cid + 1]]
            x, y = torch.as_tensor(x_all[idx]), torch.as_tensor(y_all[idx])  # client's data
            n = len(y)
            model.load_state_dict(global_state)
            model.train()
            optimizer = torch.optim.SGD(model.parameters(), lr=spec.lr)
            generator = torch.Generator().manual_seed(task_seed(spec.seed, rnd, cid))
            for _ in range(spec.epochs):
                perm = torch.randperm(n, generator=generator)
                for s in range(0, n, spec.batch_size):
                    b = perm[s : s + spec.batch_size]
                    optimizer.zero_grad()
                    F.cross_entropy(model(x[b]), y[b]).backward()
                    optimizer.step()
            for k, v in model.state_dict().items():
                sums[k].add_(v, alpha=n)  # computed and summed in float64
            total += n
        global_state = {k: (s / total).to(global_state[k].dtype) for k, s in sums.items()}
        # centralized evaluation on the test set
        model.load_state_dict(global_state)
        model.eval()
        loss_sum, correct = 0.0, 0
        with torch.no_grad():
            for s in range(0, len(y_test), 1024):
                out = model(x_test[s : s + 1024])
                yb = y_test[s : s + 1024]
                loss_sum += F.cross_entropy(out, yb, reduction="sum").item()
                correct += int((out.argmax(1) == yb).sum())
        loss, accuracy = loss_sum / len(y_test), correct / len(y_test)
    seconds, cpu = time.perf_counter() - start, cpu_seconds() - cpu
    arrays = [v.numpy().copy() for v in global_state.values()]
    return Result(seconds, cpu, accuracy, loss, arrays)


# --- the same work through pollinate ----------------------------------------------------------


class _RunClock:
    """A pollinate callback timing the rounds alone (after the backend has started)."""

    def __init__(self) -> None:
        self.started = self.ended = 0.0

    def on_run_start(self, rounds: int, start_round: int) -> None:
        self.started = time.perf_counter()

    def on_round_start(self, round_number: int) -> None:
        pass

    def on_task_done(self, *args: Any) -> None:
        pass

    def on_round_end(self, record: dict[str, Any], arrays: Any) -> None:
        pass

    def on_run_end(self, history: Any, error: BaseException | None) -> None:
        self.ended = time.perf_counter()


def sgd_overrides(epochs: int, lr: float, batch_size: int = 32) -> list[str]:
    """``--set`` overrides for what the config-driven benchmarks share: local plain SGD (no
    momentum, no local evaluation) and central evaluation only."""
    return [
        "data.client_test_fraction=0.0",
        f"train.epochs={epochs}",
        f"train.batch_size={batch_size}",
        "train.optimizer='sgd'",
        f"train.lr={lr}",
        "train.momentum=0.0",
        "train.local_evaluation=false",
        "strategy.fraction_evaluate=0.0",
        "strategy.min_evaluate_clients=0",
    ]


def bench_fedavg(spec: Spec, evaluate_fn: Any, fraction_train: float = 1.0) -> Any:
    """The strategy every plain loop is compared with: FedAvg over ``spec``'s local SGD
    (no momentum, no weight decay), central evaluation only."""
    import pollinate

    return pollinate.FedAvg(
        fraction_train=fraction_train,
        min_train_clients=1,
        min_available_clients=1,
        fraction_evaluate=0.0,  # no federated evaluation
        min_evaluate_clients=0,
        train_config={
            "epochs": spec.epochs,
            "batch_size": spec.batch_size,
            "optimizer": "sgd",
            "lr": spec.lr,
            "momentum": 0.0,
            "weight_decay": 0.0,
            "local_evaluation": False,
        },
        evaluate_fn=evaluate_fn,
        seed=spec.seed,
    )


def simulate_timed(spec: Spec, prepare: Callable[[], dict[str, Any]], **options: Any) -> Result:
    """``pollinate.simulate(**prepare(), **options)`` for ``spec``'s rounds, timed from the
    preparation (building the model and the strategy counts, as in a plain loop)."""
    import pollinate

    clock = _RunClock()
    start, cpu = time.perf_counter(), cpu_seconds()
    result = pollinate.simulate(
        **prepare(),
        rounds=spec.rounds,
        seed=spec.seed,
        callbacks=[clock],  # type: ignore[list-item]
        **options,
    )
    seconds, cpu = time.perf_counter() - start, cpu_seconds() - cpu
    last = result.history.last["centralized"]
    return Result(
        seconds,
        cpu,
        last["accuracy"],
        last["loss"],
        result.arrays,
        steady_seconds=clock.ended - clock.started,
    )


def pollinate_fedavg(
    spec: Spec,
    data: Any,
    backend: str = "sequential",
    workers: int = 2,
    threads_per_worker: int | None = None,
) -> Result:
    """The same workload through ``pollinate.simulate``.

    ``threads_per_worker=None`` gives the sequential backend torch's current thread count
    (the plain loop's), and process workers 1 thread each. torch's thread count is restored
    afterwards (the sequential backend sets it process-wide and leaves it set).
    """
    import torch

    from pollinate.frameworks.torch import classification_app, initial_arrays, torch_evaluator

    threads_before = torch.get_num_threads()
    if threads_per_worker is None:
        threads_per_worker = threads_before if backend == "sequential" else 1
    build = model_fn(spec, data)

    def prepare() -> dict[str, Any]:
        evaluate = torch_evaluator(build, data.x_test, data.y_test, batch_size=1024)
        return {
            "client_fn": classification_app(build, data),
            "num_clients": data.num_clients,
            "strategy": bench_fedavg(
                spec, evaluate, (spec.sampled / data.num_clients) if spec.sampled else 1.0
            ),
            "initial_arrays": initial_arrays(build, spec.seed),
        }

    try:
        return simulate_timed(
            spec, prepare, backend=backend, workers=workers, threads_per_worker=threads_per_worker
        )
    finally:
        torch.set_num_threads(threads_before)


def max_weight_difference(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    """Largest absolute difference between two models' arrays."""
    return max(float(np.max(np.abs(x.astype(np.float64) - y))) for x, y in zip(a, b))


# --- timing -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Variant:
    """One way of running the workload: a name, how to run it, and its target ratio."""

    name: str
    run: Callable[[], Result]
    target: float | None = None  # pollinate / plain must be <= target; None: info only
    strict: bool = False  # the ratio must be < target
    steady_note: bool = False  # show the time of the rounds alone (after start-up)


def alternate(variants: list[Variant], repeats: int) -> dict[str, list[Result]]:
    """Run every variant ``repeats`` times, interleaved (order rotated every repeat)."""
    results: dict[str, list[Result]] = {v.name: [] for v in variants}
    width = max(len(v.name) for v in variants)
    for r in range(repeats):
        shift = r % len(variants)
        for v in variants[shift:] + variants[:shift]:
            res = v.run()
            results[v.name].append(res)
            steady = f", rounds only {res.steady_seconds:6.2f} s" if res.steady_seconds else ""
            say(
                f"  {r + 1}/{repeats}  {v.name:<{width}s} {res.seconds:7.2f} s (cpu "
                f"{res.cpu_seconds:6.2f} s{steady})  accuracy {res.accuracy:.4f}  "
                f"load {load()[0]:.2f}"
            )
    return results


def compare(
    workload: str, plain: Variant, variants: list[Variant], repeats: int
) -> tuple[list[Row], dict[str, list[Result]]]:
    """Time ``plain`` and ``variants`` interleaved; a table row per pollinate variant."""
    results = alternate([plain, *variants], repeats)
    summarize(results, plain.name)
    rows = []
    for v in variants:
        if not v.name.startswith("pollinate"):
            continue  # another plain loop: printed by summarize, not a row
        runs = results[v.name]
        note = ""
        if v.steady_note:
            best = min(r.steady_seconds or 0.0 for r in runs)
            note = f"rounds alone (after backend start-up): {best:.2f} s"
        rows.append(
            Row(
                workload,
                v.name.removeprefix("pollinate "),
                results[plain.name],
                runs,
                v.target,
                v.strict,
                note,
            )
        )
    return rows, results


def finish(
    name: str,
    info: dict[str, Any],
    rows: list[Row],
    results: dict[str, list[Result]],
    json_path: Path | None,
    **extra: Any,
) -> dict[str, Any]:
    """Print the table, write the JSON file if asked, return everything as a dict."""
    info["load_after"] = load()
    say(f"load after: {info['load_after']}")
    say(table(rows))
    payload = {
        "workload": name,
        "machine": info,
        "rows": [r.as_dict() for r in rows],
        "accuracy": {k: v[-1].accuracy for k, v in results.items()},
        **extra,
    }
    write_json(json_path, payload)
    return payload


@dataclass
class Row:
    """One line of the figures table: pollinate / plain must be <= target (< if strict).

    Times are best-of-N wall seconds (noise on a shared machine only ever adds time); the
    median ratio and the CPU-time ratio are shown beside them.
    """

    workload: str
    variant: str
    plain: list[Result]
    pollinate: list[Result]
    target: float | None  # None: for information only
    strict: bool = False
    note: str = ""

    @property
    def plain_s(self) -> float:
        return min(r.seconds for r in self.plain)

    @property
    def pollinate_s(self) -> float:
        return min(r.seconds for r in self.pollinate)

    @property
    def ratio(self) -> float:
        return self.pollinate_s / self.plain_s

    @property
    def median_ratio(self) -> float:
        return statistics.median(r.seconds for r in self.pollinate) / statistics.median(
            r.seconds for r in self.plain
        )

    @property
    def cpu_ratio(self) -> float:
        return min(r.cpu_seconds for r in self.pollinate) / min(r.cpu_seconds for r in self.plain)

    @property
    def met(self) -> bool | None:
        if self.target is None:
            return None
        return self.ratio < self.target if self.strict else self.ratio <= self.target

    @property
    def target_text(self) -> str:
        if self.target is None:
            return "(info)"
        return f"{'<' if self.strict else '≤'} {self.target:g}×"

    def as_dict(self) -> dict[str, Any]:
        return {
            "workload": self.workload,
            "variant": self.variant,
            "plain_s": round(self.plain_s, 3),
            "pollinate_s": round(self.pollinate_s, 3),
            "ratio": round(self.ratio, 3),
            "median_ratio": round(self.median_ratio, 3),
            "cpu_ratio": round(self.cpu_ratio, 3),
            "target": self.target_text,
            "met": self.met,
            "note": self.note,
            "plain_runs_s": [round(r.seconds, 3) for r in self.plain],
            "pollinate_runs_s": [round(r.seconds, 3) for r in self.pollinate],
        }


TABLE_HEADER = (
    "| workload | variant | plain s | pollinate s | ratio | median ratio | CPU ratio "
    "| target | met? | note |\n"
    "| --- | --- | ---: | ---: | ---: | ---: | ---: | --- | --- | --- |"
)


def table_lines(rows: list[dict[str, Any]]) -> list[str]:
    """Markdown table lines (no header) for rows as ``Row.as_dict()`` gives them."""
    lines = []
    for r in rows:
        met = {None: "–", True: "yes", False: "**no**"}[r["met"]]
        lines.append(
            f"| {r['workload']} | {r['variant']} | {r['plain_s']:.2f} | {r['pollinate_s']:.2f} | "
            f"{r['ratio']:.2f}× | {r['median_ratio']:.2f}× | {r['cpu_ratio']:.2f}× | "
            f"{r['target']} | {met} | {r['note']} |"
        )
    return lines


def table(rows: list[Row]) -> str:
    """Rows as a Markdown table."""
    return "\n".join([TABLE_HEADER, *table_lines([r.as_dict() for r in rows])])


def summarize(results: dict[str, list[Result]], reference: str) -> None:
    """Best and median times, final accuracies and model differences against ``reference``."""
    ref = results[reference][-1]
    width = max(len(name) for name in results)
    for name, runs in results.items():
        last = runs[-1]
        walls = [r.seconds for r in runs]
        steady = ""
        if last.steady_seconds is not None:
            best = min(r.steady_seconds or 0.0 for r in runs)
            steady = f", rounds only {best:.2f} s"
        diff = ""
        if name != reference:
            diff = f", max |Δw| vs plain {max_weight_difference(ref.arrays, last.arrays):.2g}"
        say(
            f"  {name:<{width}s} best {min(walls):7.2f} s, median {statistics.median(walls):7.2f}"
            f" s{steady}; final accuracy {last.accuracy:.4f}, loss {last.loss:.4f}{diff}"
        )


# --- memory -------------------------------------------------------------------------------------


def reset_peak_rss() -> bool:
    """Reset this process's peak RSS (VmHWM, via Linux ``clear_refs``); False if impossible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def status_mib(field: str) -> float | None:
    """A memory line of /proc/self/status (``VmHWM`` peak RSS, ``VmRSS`` current), MiB.

    VmHWM is this process's own peak since it started (its exec). ``getrusage``'s ru_maxrss
    is not: on Linux a child inherits the RSS its parent had when it forked, so a probe
    started from a big benchmark process would report the parent's size.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def getrusage_max_rss_mib(who: int = resource.RUSAGE_SELF) -> float:
    """``getrusage`` max RSS, MiB (see ``status_mib`` for why it can overstate)."""
    kib = resource.getrusage(who).ru_maxrss
    return kib / 1024 if sys.platform != "darwin" else kib / 2**20


class TreeRssSampler:
    """Samples the RSS of this process plus its children (workers) every ``interval`` s.

    RSS sums count pages shared between processes (torch's libraries, the memory-mapped data
    set) once per process, so for the process backend the figure is an upper bound. Needs
    psutil (a dev dependency); without it ``peak`` stays None.
    """

    def __init__(self, interval: float = 0.02) -> None:
        import threading

        self.interval = interval
        self.peak: float | None = None
        try:
            import psutil
        except ImportError:
            self._me = None
        else:
            self._me = psutil.Process()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _sample(self) -> float:
        assert self._me is not None
        total = self._me.memory_info().rss
        for child in self._me.children(recursive=True):
            try:
                total += child.memory_info().rss
            except Exception:  # the child just exited
                pass
        return total / 2**20

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak or 0.0, self._sample())
            self._stop.wait(self.interval)

    def __enter__(self) -> TreeRssSampler:
        if self._me is not None:
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()


def run_child(script: Path, args: list[str]) -> dict[str, Any]:
    """Run ``script args`` in a fresh Python process; its last stdout line is JSON."""
    proc = subprocess.run(
        [sys.executable, str(script), *args], capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{script.name} {' '.join(args)} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --- the machine ----------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    """What the figures were measured on, and how loaded the machine was."""
    import torch

    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "load_1_5_15": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "torch_threads": torch.get_num_threads(),
    }


def load() -> list[float]:
    """The 1, 5 and 15-minute load averages."""
    return [round(x, 2) for x in os.getloadavg()]


def describe_machine(info: dict[str, Any]) -> str:
    return (
        f"machine: {info['cpu']}, {info['cores']} cores, load {info['load_1_5_15']}, "
        f"python {info['python']}, torch {info['torch']} "
        f"(torch.get_num_threads() = {info['torch_threads']}), numpy {info['numpy']}"
    )


def base_parser(description: str | None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, help="interleaved repetitions of every variant")
    parser.add_argument("--rounds", type=int, help="rounds per run")
    parser.add_argument(
        "--threads",
        type=int,
        help="torch threads for the plain loop and the sequential backend "
        "(default: torch's default; process workers always use 1 thread each)",
    )
    parser.add_argument("--json", type=Path, help="also write the rows and details here")
    return parser


def threads_label(n: int) -> str:
    return f"{n} thread{'s' if n != 1 else ''}"


def apply_threads(threads: int | None) -> int:
    """Set torch's thread count if asked; return the count the plain loop will use."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    return torch.get_num_threads()


def write_json(path: Path | None, payload: dict[str, Any]) -> None:
    if path is not None:
        path.write_text(json.dumps(payload, indent=2, default=float))


def say(message: str) -> None:
    print(message, flush=True)
